"""Scores as statistics: 95% bootstrap intervals over users and paired method comparisons.

A ``pfl eval`` results file keeps every query's prediction with its additive metric
statistics (:func:`shared.metrics.metric_stats` of that one query). From them:

- :func:`metric_interval`: a metric over all targets with a 95% confidence interval from a
  bootstrap over *users* (scipy.stats.bootstrap, percentile method, seeded): a user's queries
  are not independent of each other, so users, not queries, are resampled. The metric of a
  resample is computed from the summed statistics of its users, so macro F1 and RMSE are
  exactly the metric the table shows, not a mean of per-user values.
- :func:`paired_comparison`: method A against method B on the same users: the difference of
  the metric with a paired bootstrap interval (the same resampled users for both), the users
  on which A is better, equal or worse, and how many of the queries got identical outputs.

Intervals are None where they cannot be computed (fewer than two users).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats

from shared.metrics import HIGHER_IS_BETTER, add_stats, metrics_from_stats

CONFIDENCE = 0.95
RESAMPLES = 2000


def metric_task(results: dict) -> SimpleNamespace:
    """What :func:`shared.metrics.metrics_from_stats` needs of the task, from a results file."""
    spec = results.get("metric_task")
    if not spec:
        raise ValueError("these results keep no per-query statistics (made before pfl eval "
                         "recorded them): run the evaluation again")
    return SimpleNamespace(kind=spec["kind"], labels=tuple(spec["labels"]))


def user_stats(queries: Sequence[dict]) -> "OrderedDict[str, dict]":
    """Summed statistics per user, in the order users first appear."""
    per_user: OrderedDict[str, dict] = OrderedDict()
    for query in queries:
        add_stats(per_user.setdefault(query["user"], {}), query["stats"])
    return per_user


def _metric_of(task, per_user: Sequence[dict], metric: str):
    def statistic(indices) -> float:
        total: dict = {}
        for i in np.asarray(indices, dtype=int):
            add_stats(total, per_user[i])
        return metrics_from_stats(task, total)[metric]
    return statistic


def _bootstrap(statistic, n_users: int, seed: int) -> tuple[float, float] | None:
    if n_users < 2:
        return None
    result = scipy_stats.bootstrap((np.arange(n_users),), statistic, vectorized=False,
                                   n_resamples=RESAMPLES, confidence_level=CONFIDENCE,
                                   method="percentile", random_state=seed)
    low, high = result.confidence_interval
    return float(low), float(high)


def metric_interval(task, queries: Sequence[dict], metric: str, *,
                    seed: int = 0) -> dict:
    """``{"value", "low", "high"}``: the metric over all queries and its 95% interval."""
    return users_interval(task, list(user_stats(queries).values()), metric, seed=seed)


def users_interval(task, per_user: Sequence[dict], metric: str, *, seed: int = 0) -> dict:
    """:func:`metric_interval` from each user's summed statistics (what a federation's
    devices report) instead of per-query records."""
    per_user = list(per_user)
    statistic = _metric_of(task, per_user, metric)
    interval = _bootstrap(statistic, len(per_user), seed)
    value = statistic(range(len(per_user)))
    return {"value": value, "low": interval[0] if interval else None,
            "high": interval[1] if interval else None}


@dataclass
class Comparison:
    """Method ``a`` against ``b`` on one metric, signed so that > 0 means ``a`` is better."""

    a: str
    b: str
    metric: str
    difference: float  # a - b (b - a for lower-is-better metrics)
    low: float | None
    high: float | None
    wins: int  # users on which a is better
    ties: int
    losses: int
    identical: int  # queries with the same output from both
    queries: int

    @property
    def verdict(self) -> str:
        """"better" / "worse" when the interval excludes 0, else "within noise"."""
        if self.low is None:
            return "not enough users"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "within noise"


def _paired_metrics(task, queries_a: Sequence[dict], queries_b: Sequence[dict], metric: str,
                    a: str, b: str):
    """(number of users, metric of A on users, metric of B on users); raises unless A and B
    answered the same queries of the same users."""
    keys_a = [(q["user"], q["query"]) for q in queries_a]
    if keys_a != [(q["user"], q["query"]) for q in queries_b]:
        raise ValueError(f"{a} and {b} were not evaluated on the same queries")
    per_a = list(user_stats(queries_a).values())
    per_b = list(user_stats(queries_b).values())
    return len(per_a), _metric_of(task, per_a, metric), _metric_of(task, per_b, metric)


def score_ratio(value: float, reference: float, metric: str) -> float:
    """value over reference, inverted for lower-is-better metrics (> 1: better than the
    reference); a reference of 0 gives 1.0 for an equal score and infinity otherwise."""
    if not HIGHER_IS_BETTER.get(metric, True):
        value, reference = reference, value
    if reference == 0:
        return 1.0 if value == 0 else float("inf")
    return value / reference


def paired_ratio(task, queries_a: Sequence[dict], queries_b: Sequence[dict], metric: str, *,
                 a: str = "a", b: str = "b", seed: int = 0) -> dict:
    """``{"value", "low", "high"}``: A's score over B's (:func:`score_ratio`) with a paired
    bootstrap interval over users."""
    n, of_a, of_b = _paired_metrics(task, queries_a, queries_b, metric, a, b)

    def ratio(indices) -> float:
        return score_ratio(of_a(indices), of_b(indices), metric)

    interval = _bootstrap(ratio, n, seed)
    return {"value": ratio(range(n)), "low": interval[0] if interval else None,
            "high": interval[1] if interval else None}


def paired_comparison(task, queries_a: Sequence[dict], queries_b: Sequence[dict], metric: str,
                      *, a: str = "a", b: str = "b", seed: int = 0) -> Comparison:
    """A against B on the same users and queries (raises if they were not the same)."""
    n, of_a, of_b = _paired_metrics(task, queries_a, queries_b, metric, a, b)
    sign = 1.0 if HIGHER_IS_BETTER.get(metric, True) else -1.0

    def difference(indices) -> float:
        return sign * (of_a(indices) - of_b(indices))

    interval = _bootstrap(difference, n, seed)
    per_user = [difference([i]) for i in range(n)]
    return Comparison(
        a=a, b=b, metric=metric, difference=difference(range(n)),
        low=interval[0] if interval else None, high=interval[1] if interval else None,
        wins=sum(d > 1e-12 for d in per_user), ties=sum(abs(d) <= 1e-12 for d in per_user),
        losses=sum(d < -1e-12 for d in per_user),
        identical=sum(x["prediction"] == y["prediction"] for x, y in zip(queries_a, queries_b)),
        queries=len(queries_a))


def format_interval(value: float, low: float | None, high: float | None,
                    value_format: str = "{:.4f}", bound_format: str = "{:.3f}") -> str:
    """"0.5120 [0.431, 0.598]": a value and its interval (the value alone without one)."""
    text = value_format.format(value)
    if low is None or high is None:
        return text
    return f"{text} [{bound_format.format(low)}, {bound_format.format(high)}]"
