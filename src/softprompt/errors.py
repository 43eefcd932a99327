"""User-facing errors: what was found, what was expected, what to do."""


class SoftpromptError(Exception):
    """An error the user can fix. The CLI prints its message on one line and exits with 2."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors often run to many lines)."""
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
