"""The one exception type for user mistakes: printed as one line, exit code 2, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad recipe, missing file, ...).

    The message is one line naming the file and key at fault and how to fix it; the CLI prints it to
    stderr and exits with code 2.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


def problems(messages: list[str]) -> str:
    """Every problem found in one file, on one line: the message itself, or `N problems: a; b; c` (as litgpt's
    `validate_args` does: a user fixes them all in one go, not one per run)."""
    unique = list(dict.fromkeys(messages))
    return unique[0] if len(unique) == 1 else f"{len(unique)} problems: " + "; ".join(unique)
