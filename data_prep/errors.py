"""The two one-line errors every Kiln stage raises (the CLI maps them to exit codes 2 and 1).

They live at the bottom layer, data_prep, so corpus preparation needs nothing from pipeline;
pipeline.config re-exports them for the rest of the code.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A one-line, user-facing configuration or usage error (CLI exit code 2)."""


class KilnError(RuntimeError):
    """A one-line, user-facing runtime failure (CLI exit code 1): names the file/record/key."""


MAX_ERROR_CHARS = 500  # one error line; a longer one (a value echoed back, a huge input) is cut


def clip(line: str, limit: int = MAX_ERROR_CHARS) -> str:
    """One error line cut to `limit` characters, saying how much was left out."""
    return line if len(line) <= limit else f"{line[:limit]}… ({len(line) - limit} more characters)"


def first_line(err: BaseException) -> str:
    """The first non-blank line of an exception's message (its type name if it has none), clipped:
    what a one-line KilnError quotes of a library's multi-line error."""
    return clip(next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__))
