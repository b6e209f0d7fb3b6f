"""lm-evaluation-harness backend: any lm-eval task on any qrobust model, AR or diffusion, at any bit width.

Importing this package registers the lm-eval model `qrobust` (QrobustLM). TASKS_DIR holds the
offline, sandboxed code tasks (qrobust_humaneval, qrobust_mbpp and their instruct variants) and
the likelihood tasks built from local data; `task_manager()` indexes them.
"""
from pathlib import Path

from qrobust.lm_eval.model import QrobustLM

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def qrobust_task_names() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("qrobust_*.yaml"))


def task_manager(include_path: list[str] | None = None, include_defaults: bool = True):
    """lm-eval's TaskManager with qrobust's tasks (and lm-eval's own unless include_defaults is False:
    indexing lm-eval's ~14k built-in tasks takes several seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR), *(include_path or [])], include_defaults=include_defaults)


__all__ = ["QrobustLM", "TASKS_DIR", "qrobust_task_names", "task_manager"]
