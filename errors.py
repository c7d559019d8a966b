"""The one exception type users see, at the root of the package: every layer (calib first) can raise it."""


class RankwiseError(Exception):
    """Bad input or an unsupported case: the CLI prints the message on one line and exits with code 2."""


class RankwiseWarning(UserWarning):
    """A questionable but workable input: the CLI prints the message on one line and goes on."""


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name if it has none), cut to `limit` characters:
    what a one-line user error quotes from a library's multi-line exception."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
