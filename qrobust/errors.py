"""The one exception type users see: its message is a one-line instruction."""


class QrobustError(Exception):
    """A user-facing error. The CLI prints `qrobust: <message>` and exits with status 2."""
