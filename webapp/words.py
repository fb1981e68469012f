"""Words for people, shared by the volunteer page and the dashboard (pure Python, no browser imports)."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """ "1 task", "3 tasks" (``many`` for an irregular plural): never "task(s)"."""
    return f"{n} {word if n == 1 else many or word + 's'}"
