"""Metrics exactly as LaMP's evaluation computes them.

- Classification (LaMP-1, LaMP-2, news-category): the stripped prediction must match a label
  exactly, else it is invalid (index -1). Accuracy, and macro F1 over the label list only, so
  an invalid prediction costs recall of the gold label and adds no false positive to any label.
- Rating (LaMP-3, synthetic): float(prediction); an unparsable prediction becomes whichever of
  1 and 5 is farther from the gold. MAE and RMSE.
- Both also report ``valid``: the share of outputs that parse (a label of the list, a finite
  number), which tells a model that has not learnt the output format from one that answers
  wrongly.
- Generation (LaMP-4/5/6/7, news-headline): ROUGE-1 and ROUGE-L F-measure (rouge-score, no
  stemmer), averaged over queries.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence


from shared.tasks import TaskSpec

#: Which way each metric improves (for tables and comparisons).
HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "mae": False, "rmse": False,
                    "rouge-1": True, "rouge-L": True, "valid": True}


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` (None: nothing yet; ties do not)."""
    if best is None:
        return True
    return value > best if HIGHER_IS_BETTER.get(metric, True) else value < best


def label_index(prediction: str, labels: Sequence[str]) -> int:
    """LaMP's mapping: exact match of the stripped text into the label list, else -1."""
    text = prediction.strip()
    return labels.index(text) if text in labels else -1


def classification_metrics(predictions: Sequence[str], golds: Sequence[str],
                           labels: Sequence[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score  # 1.4 s to import: see _scorer

    labels = list(labels)
    pred_idx = [label_index(p, labels) for p in predictions]
    gold_idx = [label_index(g, labels) for g in golds]
    if -1 in gold_idx:
        bad = golds[gold_idx.index(-1)]
        raise ValueError(f"gold label {bad!r} is not in the task's label list")
    return {
        "accuracy": float(accuracy_score(gold_idx, pred_idx)),
        "f1": float(f1_score(gold_idx, pred_idx, labels=list(range(len(labels))),
                             average="macro", zero_division=0)),
        "valid": sum(i != -1 for i in pred_idx) / len(pred_idx),
    }


#: the rating scale of the rating tasks (LaMP-3, synthetic): 1 to 5 stars
RATING_RANGE = (1.0, 5.0)


def rating_value(prediction: str) -> float | None:
    """float(prediction) when it is a number on the rating scale (:data:`RATING_RANGE`),
    else None: "7" or "-3" is no more a rating than "great" is."""
    try:
        value = float(prediction.strip())
    except ValueError:
        return None
    low, high = RATING_RANGE
    return value if low <= value <= high else None


def parse_rating(prediction: str, gold: float) -> float:
    """float(prediction), or the one of 1 and 5 farther from the gold when it is not a
    rating (unparsable or off the scale): an answer's error is at most 4."""
    value = rating_value(prediction)
    if value is not None:
        return value
    return 1.0 if abs(1.0 - gold) > abs(5.0 - gold) else 5.0


def rating_metrics(predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    gold_values = [float(g) for g in golds]
    errors = [parse_rating(p, g) - g for p, g in zip(predictions, gold_values)]
    return {"mae": sum(abs(e) for e in errors) / len(errors),
            "rmse": math.sqrt(sum(e * e for e in errors) / len(errors)),
            "valid": sum(rating_value(p) is not None for p in predictions) / len(predictions)}


@functools.cache
def _scorer():
    """rouge-score's scorer, made on first use: importing rouge-score (nltk, scipy) takes a
    second, which a process that scores nothing (a federated device's every message starts
    one) need not pay."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def generation_metrics(predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    scores = [_scorer().score(target=g, prediction=p) for p, g in zip(predictions, golds)]
    return {"rouge-1": sum(s["rouge1"].fmeasure for s in scores) / len(scores),
            "rouge-L": sum(s["rougeL"].fmeasure for s in scores) / len(scores)}


def evaluate(task: TaskSpec, predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """The task's LaMP metrics for paired predictions and golds."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} golds")
    if not golds:
        raise ValueError("no predictions to evaluate")
    if task.kind == "classification":
        return classification_metrics(predictions, golds, task.labels)
    if task.kind == "rating":
        return rating_metrics(predictions, golds)
    return generation_metrics(predictions, golds)


# ------------------------------------------------------- additive form (federated evaluation)
#: Task kinds by code (a device reports its task's code with its statistics).
TASK_KINDS = ("classification", "rating", "generation")


def metric_stats(task: TaskSpec, predictions: Sequence[str],
                 golds: Sequence[str]) -> dict[str, float]:
    """Additive statistics of one user's predictions: counts and sums only, no text.

    A device reports these; the server adds them over users and :func:`metrics_from_stats`
    turns the total into exactly the metrics :func:`evaluate` gives on all queries at once
    (macro F1 needs per-label counts, so a mean of per-user F1s would be wrong).
    Classification: ``n``, ``correct``, ``valid`` and ``tp.I`` / ``fp.I`` / ``fn.I`` for
    *every* label index I of the task, zeros included: the keys are the same for every user,
    so they say nothing about which labels a user has (only the counts do); rating: ``n``,
    ``abs_error``, ``squared_error``, ``valid``;
    generation: ``n``, ``rouge-1``, ``rouge-L`` (sums of per-query F-measures).
    """
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} golds")
    stats: dict[str, float] = {"n": float(len(golds))}
    if task.kind == "classification":
        labels = list(task.labels)
        stats["correct"] = stats["valid"] = 0.0
        for i in range(len(labels)):
            stats[f"tp.{i}"] = stats[f"fp.{i}"] = stats[f"fn.{i}"] = 0.0
        for prediction, gold in zip(predictions, golds):
            p, g = label_index(prediction, labels), label_index(gold, labels)
            if g == -1:
                raise ValueError(f"gold label {gold!r} is not in the task's label list")
            stats["valid"] += p != -1
            if p == g:
                stats["correct"] += 1
                stats[f"tp.{g}"] += 1
            else:
                stats[f"fn.{g}"] += 1
                if p != -1:
                    stats[f"fp.{p}"] += 1
    elif task.kind == "rating":
        errors = [parse_rating(p, float(g)) - float(g) for p, g in zip(predictions, golds)]
        stats["abs_error"] = float(sum(abs(e) for e in errors))
        stats["squared_error"] = float(sum(e * e for e in errors))
        stats["valid"] = float(sum(rating_value(p) is not None for p in predictions))
    else:
        scores = [_scorer().score(target=g, prediction=p) for p, g in zip(predictions, golds)]
        stats["rouge-1"] = float(sum(s["rouge1"].fmeasure for s in scores))
        stats["rouge-L"] = float(sum(s["rougeL"].fmeasure for s in scores))
    return stats


#: Most queries one user's statistics may count (a bound on what one device can claim).
MAX_QUERIES_PER_USER = 10_000


def check_stats(task: TaskSpec, stats: dict[str, Any],
                max_queries: int = MAX_QUERIES_PER_USER) -> str | None:
    """Why one user's :func:`metric_stats` (as a device reported them) must not be added,
    or None. The keys must be exactly the task's; every value a finite number >= 0; ``n`` a
    whole number in 1..``max_queries``; counts and scores no larger than ``n`` allows (a
    rating error at most 10 per query). A hostile device can still lie within these bounds,
    but it cannot outweigh the others by claiming a billion queries or an infinite error."""
    expected = set(metric_stats(task, [], []))
    if task.kind == "classification":
        expected |= {f"{k}.{i}" for k in ("tp", "fp", "fn") for i in range(len(task.labels))}
    if set(stats) != expected:
        return f"statistics keys differ from the task's ({len(stats)} keys)"
    values = {}
    for key, value in stats.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(float(value)) or float(value) < 0:
            return f"statistic {key!r} is not a finite number >= 0"
        values[key] = float(value)
    n = values["n"]
    if n != int(n) or not 1 <= n <= max_queries:
        return f"n = {n:g} is not a whole number in 1..{max_queries}"
    per_query = {"abs_error": 10.0, "squared_error": 100.0}
    for key, value in values.items():
        if key != "n" and value > n * per_query.get(key, 1.0):
            return f"statistic {key!r} = {value:g} exceeds what {n:g} queries allow"
    return None


def add_stats(total: dict[str, float], stats: dict[str, float]) -> dict[str, float]:
    """``total`` += ``stats`` key by key (in place; returned)."""
    for key, value in stats.items():
        total[key] = total.get(key, 0.0) + float(value)
    return total


def metrics_from_stats(task: TaskSpec, stats: dict[str, float]) -> dict[str, float]:
    """The task's metrics from summed :func:`metric_stats`."""
    n = stats.get("n", 0.0)
    if n <= 0:
        raise ValueError("no predictions to evaluate")
    if task.kind == "classification":
        f1s = []
        for i in range(len(task.labels)):
            tp, fp, fn = (stats.get(f"{k}.{i}", 0.0) for k in ("tp", "fp", "fn"))
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        return {"accuracy": stats["correct"] / n, "f1": sum(f1s) / len(f1s),
                "valid": stats.get("valid", 0.0) / n}
    if task.kind == "rating":
        return {"mae": stats["abs_error"] / n, "rmse": math.sqrt(stats["squared_error"] / n),
                "valid": stats.get("valid", 0.0) / n}
    return {"rouge-1": stats["rouge-1"] / n, "rouge-L": stats["rouge-L"] / n}
