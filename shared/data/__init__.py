"""Datasets of users: LaMP files, HuffPost per-author tasks and synthetic personas.

:func:`load_dataset` is the one entry point the CLI uses; every loader returns a
:class:`Dataset` of :class:`~shared.types.User` in a deterministic order.
"""

from __future__ import annotations

from pathlib import Path

from shared.data.base import Dataset, InMemoryDataset, dataset_stats, format_stats
from shared.data.huffpost import load_huffpost
from shared.data.lamp import load_lamp
from shared.data.synthetic import SyntheticDataset
from shared.errors import PflError
from shared.tasks import TASK_NAMES, lamp_task

__all__ = ["Dataset", "InMemoryDataset", "SyntheticDataset", "dataset_stats", "format_stats",
           "load_dataset", "load_huffpost", "load_lamp"]

HUFFPOST_TASKS = ("news-headline", "news-category")


def load_dataset(task: str, path: str | Path | None = None, *, split: str = "dev",
                 min_history: int | None = None, queries_per_user: int | None = None,
                 users: int | None = None, seed: int = 0, num_users: int = 1000) -> Dataset:
    """Load the users of ``task``.

    - ``synthetic``: lazy persona users (``path`` ignored); ``num_users`` of them, ``seed``
      decides everything; ``queries_per_user`` defaults to 2; ``min_history`` raises the
      smallest history size (default 8).
    - ``news-headline`` / ``news-category``: HuffPost ``path`` (directory or .jsonl);
      ``min_history`` defaults to 10, ``queries_per_user`` to 1.
    - LaMP tasks (``LaMP-1`` .. ``LaMP-7``, ``LaMP-2N``, aliases such as ``lamp4``): ``path``
      is a questions file or a directory searched for ``{split}_questions.json``; one query
      per user; ``min_history`` (default 0) drops users with smaller profiles.

    ``users`` keeps only the first N users of the deterministic order. Raises
    :class:`PflError` for a bad task name, path or file.
    """
    if users is not None and users < 0:
        raise PflError(f"number of users must be >= 0, got {users}")
    key = task.strip().lower()
    if key == "synthetic":
        hist = 8 if min_history is None else max(1, min_history)
        ds: Dataset = SyntheticDataset(
            num_users if users is None else min(users, num_users), seed=seed,
            queries_per_user=2 if queries_per_user is None else queries_per_user,
            min_history=hist, max_history=max(40, hist))
        return ds
    if key in HUFFPOST_TASKS:
        ds = load_huffpost(_need_path(task, path), key,
                           min_history=10 if min_history is None else min_history,
                           queries_per_user=1 if queries_per_user is None else queries_per_user)
        return ds if users is None else ds.head(users)
    try:
        spec = lamp_task(task)
    except PflError:
        raise PflError(f"unknown task {task!r}; known: {', '.join(TASK_NAMES)}") from None
    if queries_per_user not in (None, 1):
        raise PflError(f"LaMP defines one query per user; queries_per_user={queries_per_user} "
                       f"does not apply to {spec.name}")
    return load_lamp(_need_path(task, path), spec, split=split,
                     min_history=0 if min_history is None else min_history, users=users)


def _need_path(task: str, path: str | Path | None) -> Path:
    if path is None or str(path).strip() == "":
        raise PflError(f"task {task} needs a data path (a directory or file); none given")
    return Path(path).expanduser()
