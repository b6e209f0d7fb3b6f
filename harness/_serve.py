"""The untrusted side of an isolated run: load the candidate's solution, then serve calls.

Runs in the candidate's own process (see _launcher.py), so nothing here is trusted: the
candidate may rewrite this module, its codec or its file descriptors, and all it can reach
is the pair of pipes to the trusted side, which decodes every reply strictly (_wire.decode).
Requests: ["load", source] once, then ["call", name, args, kwargs]. Replies: ["ok"],
["returned", value], ["raised", type name, message] or ["not-plain", why].
"""
from __future__ import annotations

import builtins

import _wire

_MESSAGE_CHARS = 2000


def serve(requests: int, replies: int) -> None:
    """Answer requests until the trusted side closes the channel."""
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    _, source = _wire.receive(requests)
    try:
        exec(compile(source, "<solution>", "exec"), namespace)
    except BaseException as e:  # the trusted side decides what a failed import means
        _wire.send(replies, _raised(e))
        return
    _wire.send(replies, ["ok"])
    while True:
        try:
            _, name, args, kwargs = _wire.receive(requests)
        except EOFError:
            return
        _wire.send(replies, _call(namespace, name, _wire.decode(args), _wire.decode(kwargs)))


def _call(namespace: dict, name: str, args: tuple, kwargs: dict) -> list:
    if name not in namespace:
        return ["raised", "NameError", f"name {name!r} is not defined"]
    try:
        result = namespace[name](*args, **kwargs)
    except BaseException as e:
        return _raised(e)
    try:
        return ["returned", _wire.encode(result)]
    except _wire.NotPlain as e:
        return ["not-plain", f"{name} returned {e}"]
    except BaseException as e:  # RecursionError on a self-referencing value, MemoryError
        return _raised(e)


def _raised(e: BaseException) -> list:
    try:
        message = str(e)[:_MESSAGE_CHARS]
    except BaseException:
        message = ""
    return ["raised", type(e).__name__, message]
