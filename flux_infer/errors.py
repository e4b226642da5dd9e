"""A library's exception told in one line: what a client, a refusal or the log's summary shows of it.

Libraries' messages can be empty (`RuntimeError()`, a bare `OSError`), start with blank lines or run
to pages (compilers, cuDNN); the whole account goes to the log, this line to the user.
"""

from __future__ import annotations

# The most of a library's message one line of ours carries.
LIMIT = 300


def first_line(err: BaseException, limit: int = LIMIT) -> str:
    """The first line of `err`'s message that says something, cut at `limit` characters; the exception's
    type name when the message is empty."""
    line = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return line if len(line) <= limit else line[:limit - 3] + "..."
