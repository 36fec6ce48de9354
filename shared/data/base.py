"""The dataset abstraction every loader returns, and cheap summary statistics over it.

A :class:`Dataset` is an indexable, deterministic sequence of :class:`~shared.types.User` for
one :class:`~shared.tasks.TaskSpec`. Small datasets live in memory (:class:`InMemoryDataset`);
huge ones (the synthetic population) build each user on demand, so nothing here may assume
that all users fit in memory.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Iterator, Sequence

from shared.tasks import TaskSpec
from shared.types import User


class Dataset:
    """A deterministic, indexable sequence of users of one task.

    Subclasses set ``task`` and ``name`` and implement ``__len__`` and ``_user(i)``.
    """

    task: TaskSpec
    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    def _user(self, i: int) -> User:
        raise NotImplementedError

    def user(self, i: int) -> User:
        """The ``i``-th user (0-based; negative indexes count from the end)."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"user index {i} out of range for {n} users")
        return self._user(i)

    def users(self, limit: int | None = None) -> Iterator[User]:
        """Users in the dataset's fixed order, the first ``limit`` of them if given."""
        n = len(self) if limit is None else min(limit, len(self))
        for i in range(n):
            yield self._user(i)

    def __iter__(self) -> Iterator[User]:
        return self.users()

    def head(self, n: int) -> "Dataset":
        """The first ``n`` users as a dataset (a view; nothing is copied or generated)."""
        return _Head(self, n)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} task={self.task.name} users={len(self)}>"


class InMemoryDataset(Dataset):
    """A dataset whose users are all held in a list (LaMP files, HuffPost)."""

    def __init__(self, task: TaskSpec, users: Sequence[User], name: str):
        self.task = task
        self.name = name
        self._users = list(users)

    def __len__(self) -> int:
        return len(self._users)

    def _user(self, i: int) -> User:
        return self._users[i]

    def head(self, n: int) -> "InMemoryDataset":
        return InMemoryDataset(self.task, self._users[:max(n, 0)], self.name)


class _Head(Dataset):
    """The first ``n`` users of another dataset."""

    def __init__(self, base: Dataset, n: int):
        self.task, self.name, self._base = base.task, base.name, base
        self._n = max(0, min(n, len(base)))

    def __len__(self) -> int:
        return self._n

    def _user(self, i: int) -> User:
        return self._base._user(i)


# ------------------------------------------------------------------------------ statistics
def dataset_stats(ds: Dataset, limit: int | None = None) -> dict:
    """Counts over the first ``limit`` users (all if None), streaming: O(distinct sizes) memory.

    Returns ``{"task", "users", "queries", "history_per_user": {"min", "median", "max",
    "mean"}}``; the history figures are 0 for an empty dataset.
    """
    sizes: Counter[int] = Counter()
    queries = 0
    for user in ds.users(limit):
        sizes[len(user.history)] += 1
        queries += len(user.queries)
    n = sum(sizes.values())
    if n:
        hist = {"min": min(sizes), "median": _median(sizes, n), "max": max(sizes),
                "mean": sum(k * c for k, c in sizes.items()) / n}
    else:
        hist = {"min": 0, "median": 0, "max": 0, "mean": 0.0}
    return {"task": ds.task.name, "users": n, "queries": queries, "history_per_user": hist}


def _median(counts: Counter[int], n: int) -> float:
    """Median of a multiset given as value -> count (same result as statistics.median)."""
    lo_rank, hi_rank = (n - 1) // 2, n // 2  # 0-based ranks of the middle element(s)
    lo = hi = None
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if lo is None and seen > lo_rank:
            lo = value
        if seen > hi_rank:
            hi = value
            break
    return statistics.mean([lo, hi])


def format_stats(stats: dict) -> str:
    """A small two-column text table of :func:`dataset_stats` output."""
    h = stats["history_per_user"]
    rows = [
        ("task", str(stats["task"])),
        ("users", f"{stats['users']:,}"),
        ("queries", f"{stats['queries']:,}"),
        ("history / user", f"min {h['min']}  median {h['median']:g}  max {h['max']}  "
                           f"mean {h['mean']:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
