"""User-facing errors: what was found, what was expected, what to do."""


class SoftpromptError(Exception):
    """An error the user can fix. The CLI prints its message on one line and exits with 2."""
