"""Resuming a study into an output folder: only with the settings that folder was made with."""
from __future__ import annotations

import json
from pathlib import Path

from qrobust.errors import QrobustError


def check_same_settings(record: Path, settings: dict, may_change: frozenset[str] = frozenset(),
                        what: str = "run") -> None:
    """Refuse to resume the run whose settings `record` (a JSON file with a "config" object) holds
    with other `settings` than those, except the keys in `may_change`: the folder's files would
    then mix results made two ways under one label. Keys the record lacks (written by an older
    version) are not compared."""
    if not record.exists():
        return
    try:
        stored = json.loads(record.read_text())["config"]
    except (ValueError, KeyError, TypeError):
        raise QrobustError(f"{record} is damaged: use a new --out, or delete it to start over") from None
    new = json.loads(json.dumps(settings))  # tuples as the lists the record holds
    changed = [f"{k} {stored[k]!r} -> {new[k]!r}" for k in new
               if k not in may_change and k in stored and stored[k] != new[k]]
    if changed:
        raise QrobustError(f"{record.parent} holds a {what} made with other settings ({'; '.join(changed)}): "
                           "resume it with the same ones, or use a new --out")
