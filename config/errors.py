"""The one user-facing error type.

Everything a user can cause or fix (a bad file, a missing device, a model that does not fit) is
raised as `DuplexError` with one plain sentence; the CLI prints it without a traceback and exits
non-zero. Anything else is a bug and keeps its traceback.
"""


class DuplexError(Exception):
    """A problem the user can understand and act on.

    `message` is one sentence saying what is wrong; `hint` (optional) says what to do about it.
    """

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"
