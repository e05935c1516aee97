"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """Bad input, usage or environment. The CLI prints its message on one line and exits with `code`."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code
