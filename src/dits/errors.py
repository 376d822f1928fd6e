"""One exception type for bad user input.

Anything raised as :class:`UserError` (a ``ValueError``) is a mistake the user can fix;
the CLI prints its message as one line and exits with code 2.
"""


class UserError(ValueError):
    """Bad input from the user: wrong name, shape, path, or file."""


def first_line(e: BaseException | str, limit: int = 160) -> str:
    """The first line of an error message, shortened at a word boundary (never mid-word)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0].rstrip(",;:(")
    return cut + " ..."
