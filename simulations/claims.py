"""The papers' claims, checked against a ``pfl eval`` results file (measured in one run).

- PER-PCS vs OPPU (Tan et al. 2024b): ~99% of OPPU's score, ~7x less compute per user,
  ~38x less storage per user.
- PerFit vs OPPU: matches or beats OPPU's score with ~92% fewer parameters, less training
  time per user.
- personalized methods vs the non-personalized model.
- with retrieval or a profile in the prompt (+rag1, +pag; rows only where the run has them):
  PER-PCS still ~99% of OPPU (PER-PCS paper), and the augmentation adds to OPPU (OPPU paper:
  OPPU+RAG and OPPU+PAG beat OPPU alone).

The score is the task's first metric (accuracy, MAE, ROUGE-1); for lower-is-better metrics
the ratio is inverted so that > 1 always means "better than the reference".

A score claim is judged on its 95% paired bootstrap interval over users where the results
keep every query (``pfl eval`` writes them): "held" when the whole interval satisfies the
claim, "did not hold" when none of it does, "within noise" otherwise. Results without
per-query data (older files) are judged on the point estimate, and the verdict says so.
Cost claims (seconds, bytes, parameters) are measured once per run: no interval.
"""

from __future__ import annotations

from shared import statistics
from shared.report import format_table

POINT = " (point estimate)"


def _score(results: dict, method: str) -> tuple[str, float] | None:
    entry = results["methods"].get(method)
    if entry is None or "metrics" not in entry:
        return None
    name, value = next(iter(entry["metrics"].items()))
    return name, value


def score_ratio(results: dict, method: str, reference: str) -> float | None:
    """method's score over reference's (inverted for lower-is-better metrics); a reference
    of 0 gives 1.0 for an equal score and infinity for a better one."""
    a, b = _score(results, method), _score(results, reference)
    if a is None or b is None:
        return None
    return statistics.score_ratio(a[1], b[1], a[0])


def score_ratio_interval(results: dict, method: str, reference: str) -> dict | None:
    """``{"value", "low", "high"}`` of :func:`score_ratio`, the interval a paired bootstrap
    over users (None bounds where the results keep no per-query data); None if not run."""
    value = score_ratio(results, method, reference)
    if value is None:
        return None
    a, b = results["methods"][method], results["methods"][reference]
    if "queries" not in a or "queries" not in b or not results.get("metric_task"):
        return {"value": value, "low": None, "high": None}
    metric = next(iter(a["metrics"]))
    return statistics.paired_ratio(statistics.metric_task(results), a["queries"],
                                   b["queries"], metric, a=method, b=reference,
                                   seed=results.get("seed", 0))


def score_difference_interval(results: dict, method: str, reference: str) -> dict | None:
    """``{"value", "low", "high"}``: how much better method's score is than reference's
    (signed by the metric's direction), with a paired bootstrap interval over users where the
    results keep per-query data; None if either was not run."""
    a, b = _score(results, method), _score(results, reference)
    if a is None or b is None:
        return None
    entries = results["methods"][method], results["methods"][reference]
    if all("queries" in e for e in entries) and results.get("metric_task"):
        comparison = statistics.paired_comparison(
            statistics.metric_task(results), entries[0]["queries"], entries[1]["queries"],
            a[0], a=method, b=reference, seed=results.get("seed", 0))
        return {"value": comparison.difference, "low": comparison.low, "high": comparison.high}
    sign = 1 if statistics.HIGHER_IS_BETTER.get(a[0], True) else -1
    return {"value": sign * (a[1] - b[1]), "low": None, "high": None}


def _ratio(results: dict, numerator: str, denominator: str, field: str) -> float | None:
    m = results["methods"]
    if numerator not in m or denominator not in m:
        return None
    top, bottom = m[numerator][field], m[denominator][field]
    return top / bottom if bottom else None


def paper_claims(results: dict) -> list[dict]:
    """One row per claim: what the paper says, what this run measured, whether it held."""
    rows = []

    def claim(text: str, measured, holds, fmt: str = "{:.3f}") -> None:
        """``measured``: a number (a cost, measured once) or a :func:`score_ratio_interval`
        dict; ``holds(value)`` is monotone (a threshold that larger values pass)."""
        interval = measured if isinstance(measured, dict) else None
        value = interval["value"] if interval else measured
        row = {"claim": text, "measured": value, "low": None, "high": None}
        if value is None:
            row.update(shown="n/a", held=None, verdict="not measured")
        elif interval and interval["low"] is not None:
            row.update(low=interval["low"], high=interval["high"],
                       shown=statistics.format_interval(value, interval["low"],
                                                        interval["high"], fmt, fmt))
            if holds(interval["low"]):
                row.update(held=True, verdict="held")
            elif not holds(interval["high"]):
                row.update(held=False, verdict="did not hold")
            else:
                row.update(held=None, verdict="within noise")
        else:
            held = bool(holds(value))
            row.update(shown=fmt.format(value), held=held,
                       verdict=("held" if held else "did not hold")
                       + (POINT if interval else ""))
        rows.append(row)

    claim("PER-PCS score / OPPU score ~ 0.99", score_ratio_interval(results, "perpcs", "oppu"),
          lambda r: r >= 0.95)
    claim("OPPU s/user / PER-PCS s/user ~ 7x",
          _ratio(results, "oppu", "perpcs", "seconds_per_user"), lambda r: r >= 7, "{:.1f}x")
    claim("OPPU bytes/user / PER-PCS bytes/user ~ 38x",
          _ratio(results, "oppu", "perpcs", "bytes_per_user"), lambda r: r >= 38, "{:.0f}x")
    claim("PER-PCS beats PEFT retrieval",
          score_difference_interval(results, "perpcs", "peft-retrieval"), lambda d: d > 0,
          "{:+.3f}")
    claim("PerFit score / OPPU score >= 1", score_ratio_interval(results, "perfit", "oppu"),
          lambda r: r >= 1)
    params = _ratio(results, "perfit", "oppu", "params_per_user")
    claim("PerFit parameters vs OPPU: ~92% fewer", None if params is None else 1 - params,
          lambda r: r >= 0.92, "{:.1%} fewer")
    claim("PerFit s/user < OPPU s/user", _ratio(results, "oppu", "perfit", "seconds_per_user"),
          lambda r: r > 1, "{:.1f}x faster")
    for method in ("oppu", "perpcs", "perfit"):
        claim(f"{method} beats non-personalized",
              score_difference_interval(results, method, "nonpersonalized"), lambda d: d > 0,
              "{:+.3f}")
        if "lora-c" in results["methods"]:
            claim(f"{method} beats the stage-1 model (LoRA-C)",
                  score_difference_interval(results, method, "lora-c"), lambda d: d > 0,
                  "{:+.3f}")
    if "lora-p" in results["methods"]:
        claim("OPPU beats LoRA-P (personal LoRA without stage 1)",
              score_difference_interval(results, "oppu", "lora-p"), lambda d: d > 0, "{:+.3f}")
    for suffix in ("+rag1", "+pag"):
        if f"oppu{suffix}" in results["methods"] and f"perpcs{suffix}" in results["methods"]:
            claim(f"PER-PCS{suffix} score / OPPU{suffix} score ~ 0.99",
                  score_ratio_interval(results, f"perpcs{suffix}", f"oppu{suffix}"),
                  lambda r: r >= 0.95)
        for method, name in (("oppu", "OPPU"), ("perfit", "PerFit")):
            if f"{method}{suffix}" in results["methods"]:
                claim(f"{name}{suffix} beats {name}",
                      score_difference_interval(results, f"{method}{suffix}", method),
                      lambda d: d > 0, "{:+.3f}")
    return rows


def claims_table(results: dict) -> str:
    rows = paper_claims(results)
    body = [[r["claim"], r["shown"], r["verdict"]] for r in rows]
    title = (f"paper claims on task {results['task']} ({results['base_model']}, "
             f"{results['users']} users)")
    return title + "\n" + format_table(["claim", "measured", "verdict"], body)
