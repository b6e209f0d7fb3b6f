"""The harness's one exception type: its message is a one-line instruction to the user.

The harness stands alone (it imports nothing of qrobust), so it has its own error type; the
qrobust CLI reports it as it reports QrobustError (qrobust.errors.USER_ERRORS).
"""


class HarnessError(Exception):
    """A user-facing error: bad input to the harness (a missing file, an unknown benchmark)."""
