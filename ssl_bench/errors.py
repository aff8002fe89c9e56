"""The one exception users see: a single line naming the problem and the fix."""


class UserError(Exception):
    """Bad input or environment; the CLI prints ``str(err)`` as one line and exits 2. The message is kept to
    one line here, whatever it quotes (a database's multi-line schema, a file's text)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
