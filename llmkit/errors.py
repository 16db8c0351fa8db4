"""User-facing errors.

Anything raised as `LLMKitError` is bad input or a bad environment that the user can fix:
the CLI prints its message on one line and exits non-zero, without a traceback.
"""


class LLMKitError(Exception):
    """An error whose message is meant for the user (one line, names the problem)."""


def closest(name: str, choices, n: int = 3) -> str:
    """'did you mean ...' suffix for an unknown name (empty when nothing is close)."""
    import difflib

    near = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in near)}?)" if near else ""
