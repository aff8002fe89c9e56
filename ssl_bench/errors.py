"""The one exception users see: a single line naming the problem and the fix."""


class UserError(Exception):
    """Bad input or environment; the CLI prints ``str(err)`` as one line and exits 2."""
