"""The trusted side of an isolated run: the tests, with the solution's functions as proxies.

Runs in its own process (see _launcher.py), apart from the candidate's: it reads the tests and
the verdict token from standard input after the candidate's process has been forked off, runs
the tests unchanged with each name in `calls` bound to a Proxy, and writes the token to the
verdict pipe only when the test code has run to its end and nothing went wrong on the channel.
Values from the candidate are decoded into builtin types only (_wire.decode); exceptions it
reports come back as builtin exceptions of the same name (or CandidateError), so `assert` and
`except ValueError` in the tests work as before, while a channel failure (the candidate's
process ended, answered out of protocol or returned what is not plain data) is a
CandidateFailure: a BaseException, so `except Exception` in a test cannot swallow it, and
remembered, so not even a bare `except:` turns it into a pass.
"""
from __future__ import annotations

import builtins
import json
import os
import sys
import traceback

import _wire

CANDIDATE_ENDED = 117  # exit status: the candidate's process went away; the launcher says how


class CandidateError(Exception):
    """An exception the candidate raised whose type the trusted side does not have."""


class CandidateFailure(BaseException):
    """The candidate's side failed in a way no test may catch."""


class Channel:
    def __init__(self, requests: int, replies: int):
        self.requests, self.replies = requests, replies
        self.failure = ""
        self.ended = False

    def fail(self, why: str, ended: bool = False) -> CandidateFailure:
        self.failure = self.failure or why
        self.ended = self.ended or ended
        return CandidateFailure(self.failure)

    def request(self, message: list) -> list:
        if self.failure:
            raise CandidateFailure(self.failure)
        try:
            _wire.send(self.requests, message)
            reply = _wire.receive(self.replies)
        except (EOFError, BrokenPipeError):
            raise self.fail("the candidate's process ended", ended=True) from None
        except _wire.NotPlain as e:
            raise self.fail(f"the candidate sent {e}") from None
        if type(reply) is not list or not reply or reply[0] not in _REPLIES or len(reply) != _REPLIES[reply[0]]:
            raise self.fail("the candidate answered outside the protocol")
        return reply

    def load(self, solution: str) -> None:
        reply = self.request(["load", solution])
        if reply[0] == "raised":
            raise self.exception(reply)
        if reply[0] != "ok":
            raise self.fail("the candidate answered outside the protocol")

    def call(self, name: str, args: tuple, kwargs: dict):
        try:
            message = ["call", name, _wire.encode(args), _wire.encode(kwargs)]
        except (_wire.NotPlain, RecursionError) as e:
            raise self.fail(f"the tests pass {name} {e}") from None
        reply = self.request(message)
        if reply[0] == "returned":
            try:
                return _wire.decode(reply[1])
            except (_wire.NotPlain, RecursionError) as e:
                raise self.fail(f"{name} returned {e}") from None
        if reply[0] == "raised":
            raise self.exception(reply)
        raise self.fail(str(reply[1]) if reply[0] == "not-plain" else "the candidate answered outside the protocol")

    def exception(self, reply: list) -> BaseException:
        """A builtin exception of the reported type, or CandidateError; never the candidate's."""
        _, name, message = reply
        if type(name) is not str or type(message) is not str:
            return self.fail("the candidate answered outside the protocol")
        kind = getattr(builtins, name, None) if name.isidentifier() else None
        if isinstance(kind, type) and issubclass(kind, BaseException) and not issubclass(kind, Exception):
            return self.fail(f"the candidate raised {name}: {message}")  # SystemExit and the like
        if isinstance(kind, type) and issubclass(kind, Exception):
            try:
                return kind(message)
            except Exception:  # constructors that need more than a message (UnicodeDecodeError)
                pass
        return CandidateError(f"{name}: {message}")


_REPLIES = {"ok": 1, "returned": 2, "raised": 3, "not-plain": 2}


class Proxy:
    """Stands for one of the solution's functions: calls cross to the candidate's process."""

    def __init__(self, channel: Channel, name: str):
        self._channel, self.__name__ = channel, name

    def __call__(self, *args, **kwargs):
        return self._channel.call(self.__name__, args, kwargs)

    def __repr__(self) -> str:
        return f"<proxy for the candidate's {self.__name__}>"


def judge(payload: dict, requests: int, replies: int, verdict: int) -> int:
    """Run the tests; write the token and return 0 only if they ran to their end."""
    channel = Channel(requests, replies)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    namespace.update({name: Proxy(channel, name) for name in payload["calls"]})
    try:
        channel.load(payload["solution"])
        exec(compile(payload["tests"], "<tests>", "exec"), namespace)
        if channel.failure:  # a test caught the failure, but it stands
            raise CandidateFailure(channel.failure)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        return CANDIDATE_ENDED if channel.ended else 1
    os.write(verdict, payload["token"].encode())
    return 0


def main(requests: int, replies: int, verdict: int) -> int:
    with open(0, "rb", closefd=False) as stdin:
        payload = json.loads(stdin.read())
    return judge(payload, requests, replies, verdict)
