"""BM25 (Okapi, via rank-bm25 as LaMP uses it) over one user's own history.

One change from rank-bm25's BM25Okapi: the idf is Lucene's ``log(1 + (N - n + 0.5)/(n + 0.5))``,
which is always positive. The classic ``log((N - n + 0.5)/(n + 0.5))`` is 0 for a term in half
of the documents and negative above that (rank-bm25 then floors it at a small constant), so on
a user's history of a few items a query term shared by half of them counts for nothing.

``top_k(query, k, before=i)`` ranks only items 0..i-1, the items that existed before history
item i, with BM25 statistics (idf, average length) computed from those items alone, so a
training example never sees its own future. Ties keep the more recent item first.
"""

from __future__ import annotations

import math
import random
import re
from typing import Sequence

import numpy as np
from rank_bm25 import BM25Okapi

from shared.tasks import TaskSpec
from shared.types import HistoryItem

_TOKEN = re.compile(r"\w+")


class _LuceneIdfBM25(BM25Okapi):
    """BM25Okapi scoring (k1=1.5, b=0.75) with the always-positive Lucene idf."""

    def _calc_idf(self, nd: dict) -> None:
        self.idf = {word: math.log(1.0 + (self.corpus_size - freq + 0.5) / (freq + 0.5))
                    for word, freq in nd.items()}


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens (punctuation dropped)."""
    return _TOKEN.findall(text.lower())


class BM25Retriever:
    """BM25 over a user's history items (in the task's corpus fields)."""

    def __init__(self, task: TaskSpec, history: Sequence[HistoryItem]):
        self.task = task
        self.history = list(history)
        self._corpus = [tokenize(task.corpus_text(item)) or ["<empty>"] for item in self.history]
        self._full: _LuceneIdfBM25 | None = None  # the index over all items, reused by queries

    def scores(self, query: str, limit: int | None = None) -> np.ndarray:
        """BM25 scores of the first ``limit`` items (all by default) for ``query``."""
        limit = len(self._corpus) if limit is None else limit
        if limit <= 0:
            return np.zeros(0)
        if limit < len(self._corpus):  # a prefix (training on item `limit`): built once, used once
            index = _LuceneIdfBM25(self._corpus[:limit])
        else:
            if self._full is None:
                self._full = _LuceneIdfBM25(self._corpus)
            index = self._full
        return np.asarray(index.get_scores(tokenize(query)), dtype=float)

    def top_k(self, query: str, k: int, *, before: int | None = None) -> list[HistoryItem]:
        """The k best items for ``query``, best first, among items with index < ``before``."""
        limit = len(self.history) if before is None else min(before, len(self.history))
        if k <= 0 or limit <= 0:
            return []
        scores = self.scores(query, limit)
        # sort by score descending, then by recency (higher index first) for ties
        order = sorted(range(limit), key=lambda i: (-scores[i], -i))
        return [self.history[i] for i in order[:k]]


def random_k(history: Sequence[HistoryItem], k: int, seed: int | str) -> list[HistoryItem]:
    """k history items drawn at random (the 'random history' baseline), reproducibly."""
    rng = random.Random(str(seed))
    return rng.sample(list(history), min(k, len(history)))
