"""Plain data across the sandbox's process boundary: a strict, tagged JSON, length-framed.

Scalars (None, bool, int, float, str) travel as JSON scalars; every other value is a one-key
JSON object whose key names its type: l list, t tuple, s set, f frozenset, d dict (as [key,
value] pairs), b bytes, y bytearray, c complex, i an int beyond 64 bits (hex, which Python
parses in linear time). Subclasses travel as their base type: only the data crosses, never a
method, so an `__eq__` that always says True stays behind. `decode` builds nothing but these
builtin types and raises NotPlain on anything else; it is what makes the untrusted side's
bytes safe to compare in the trusted one. Standard library only: the sandbox's launcher loads
this file by path, before any candidate code runs.
"""
from __future__ import annotations

import json
import os
import struct

MAX_MESSAGE = 64 << 20
_HEADER = struct.Struct(">I")
_SMALL_INT = 1 << 63
_SEQUENCES = ((list, "l"), (tuple, "t"), (set, "s"), (frozenset, "f"))
_DECODE_SEQUENCE = {"l": list, "t": tuple, "s": set, "f": frozenset}


class NotPlain(Exception):
    """A value that is not plain data (or bytes that do not decode to plain data)."""


def encode(value):
    """The JSON-ready form of a plain value; NotPlain for anything else."""
    if value is None or value is True or value is False or type(value) in (str, float):
        return value
    if isinstance(value, int):
        value = int(value)
        return value if -_SMALL_INT <= value < _SMALL_INT else {"i": hex(value)}
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    for kind, tag in _SEQUENCES:
        if isinstance(value, kind):
            return {tag: [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"d": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, bytes):
        return {"b": bytes(value).hex()}
    if isinstance(value, bytearray):
        return {"y": bytes(value).hex()}
    if isinstance(value, complex):
        return {"c": [complex(value).real, complex(value).imag]}
    raise NotPlain(f"a value of type {type(value).__name__}, which is not plain data")


def decode(node):
    """The plain value a JSON node stands for; NotPlain if it is not one this module writes."""
    kind = type(node)
    if node is None or kind in (str, int, float, bool):
        return node
    if kind is not dict or len(node) != 1:
        raise NotPlain(f"unexpected {kind.__name__} in a message")
    (tag, body), = node.items()
    try:
        if tag in _DECODE_SEQUENCE and type(body) is list:
            return _DECODE_SEQUENCE[tag](decode(v) for v in body)
        if tag == "d" and type(body) is list:
            return {decode(k): decode(v) for k, v in body}
        if tag in ("b", "y", "i") and type(body) is str:
            return bytes.fromhex(body) if tag == "b" else bytearray.fromhex(body) if tag == "y" else int(body, 16)
        if tag == "c" and type(body) is list and len(body) == 2 and all(type(x) in (int, float) for x in body):
            return complex(body[0], body[1])
    except (TypeError, ValueError) as e:  # unhashable keys or set members, bad hex, pairs that are not pairs
        raise NotPlain(f"malformed {tag!r} value: {e}") from None
    raise NotPlain(f"unknown tag {tag!r} in a message")


def send(fd: int, message) -> None:
    """Write one JSON message (already made of JSON-ready parts) with its length in front."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise NotPlain(f"a message of {len(data)} bytes is over the {MAX_MESSAGE}-byte limit")
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def receive(fd: int):
    """The next JSON message on fd; EOFError when the other side has gone, NotPlain when the
    bytes are not a message."""
    (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size))
    if size > MAX_MESSAGE:
        raise NotPlain(f"a message of {size} bytes is over the {MAX_MESSAGE}-byte limit")
    try:
        return json.loads(_read_exactly(fd, size))
    except (ValueError, RecursionError) as e:  # ValueError covers JSON and Unicode errors
        raise NotPlain(f"a message is not JSON: {str(e)[:100]}") from None


def _read_exactly(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the channel")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
