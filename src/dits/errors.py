"""One exception type for bad user input.

Anything raised as :class:`UserError` (a ``ValueError``) is a mistake the user can fix;
the CLI prints its message as one line and exits with code 2.
"""


class UserError(ValueError):
    """Bad input from the user: wrong name, shape, path, or file."""
