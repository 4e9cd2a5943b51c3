"""The one exception type the CLI turns into a single clear line and an exit status."""


class QraError(Exception):
    """A problem with the user's input or environment, explained in one line.

    `exit_code` follows the CLI's contract: 2 for unusable input, 1 for a check that failed
    (over budget, fingerprint mismatch).
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
