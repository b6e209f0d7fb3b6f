"""The one exception type users see: its message is a one-line instruction."""
from harness.errors import HarnessError


class QrobustError(Exception):
    """A user-facing error. The CLI prints `qrobust: <message>` and exits with status 2."""


# What the CLI reports as `qrobust: <message>` with exit status 2: qrobust's errors and those of
# the harness below it, which imports nothing of qrobust and so has its own type.
USER_ERRORS = (QrobustError, HarnessError)
