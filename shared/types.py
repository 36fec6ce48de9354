"""The data model every loader produces and every method consumes.

A *user* has a chronological history (oldest first) of items they produced, and queries with
gold outputs that are held out for evaluation. Items keep their task's own field names
(``text``, ``title``, ``category``, ``score`` ...); a :class:`shared.tasks.TaskSpec` says how
to turn them into prompts, training examples and retrieval text.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping


@dataclass(frozen=True)
class HistoryItem:
    """One item of a user's history, in the task's own field names."""

    id: str
    fields: Mapping[str, str]

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.fields.get(key, default)


@dataclass(frozen=True)
class Query:
    """A held-out query: the full task input (instruction included, as LaMP writes it) and gold."""

    id: str
    input: str
    gold: str | None = None


@dataclass(frozen=True)
class User:
    """A user: id, chronological history (oldest first), held-out queries."""

    id: str
    history: tuple[HistoryItem, ...]
    queries: tuple[Query, ...] = field(default_factory=tuple)


def recent_history(user: User, limit: int | None) -> User:
    """The user with only their ``limit`` most recent history items (None: all)."""
    if limit is None or len(user.history) <= limit:
        return user
    return replace(user, history=user.history[-limit:])
