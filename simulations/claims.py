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
"""

from __future__ import annotations

from shared.metrics import HIGHER_IS_BETTER
from simulations.report import format_table


def _score(results: dict, method: str) -> tuple[str, float] | None:
    entry = results["methods"].get(method)
    if entry is None:
        return None
    name, value = next(iter(entry["metrics"].items()))
    return name, value


def score_ratio(results: dict, method: str, reference: str) -> float | None:
    """method's score over reference's (inverted for lower-is-better metrics); a reference
    of 0 gives 1.0 for an equal score and infinity for a better one."""
    a, b = _score(results, method), _score(results, reference)
    if a is None or b is None:
        return None
    metric, value = a
    ref = b[1]
    if not HIGHER_IS_BETTER.get(metric, True):
        value, ref = ref, value  # less error is better: compare the other way round
    if ref == 0:  # e.g. an accuracy of 0: equal if both are 0, else infinitely better
        return 1.0 if value == 0 else float("inf")
    return value / ref


def _ratio(results: dict, numerator: str, denominator: str, field: str) -> float | None:
    m = results["methods"]
    if numerator not in m or denominator not in m:
        return None
    top, bottom = m[numerator][field], m[denominator][field]
    return top / bottom if bottom else None


def paper_claims(results: dict) -> list[dict]:
    """One row per claim: what the paper says, what this run measured, whether it held."""
    rows = []

    def claim(text: str, measured: float | None, holds, fmt: str = "{:.3f}") -> None:
        rows.append({"claim": text, "measured": None if measured is None else measured,
                     "shown": "n/a" if measured is None else fmt.format(measured),
                     "held": None if measured is None else bool(holds(measured))})

    claim("PER-PCS score / OPPU score ~ 0.99", score_ratio(results, "perpcs", "oppu"),
          lambda r: r >= 0.95)
    claim("OPPU s/user / PER-PCS s/user ~ 7x",
          _ratio(results, "oppu", "perpcs", "seconds_per_user"), lambda r: r >= 7, "{:.1f}x")
    claim("OPPU bytes/user / PER-PCS bytes/user ~ 38x",
          _ratio(results, "oppu", "perpcs", "bytes_per_user"), lambda r: r >= 38, "{:.0f}x")
    claim("PER-PCS beats PEFT retrieval", score_ratio(results, "perpcs", "peft-retrieval"),
          lambda r: r > 1)
    claim("PerFit score / OPPU score >= 1", score_ratio(results, "perfit", "oppu"),
          lambda r: r >= 1)
    params = _ratio(results, "perfit", "oppu", "params_per_user")
    claim("PerFit parameters vs OPPU: ~92% fewer", None if params is None else 1 - params,
          lambda r: r >= 0.92, "{:.1%} fewer")
    claim("PerFit s/user < OPPU s/user", _ratio(results, "oppu", "perfit", "seconds_per_user"),
          lambda r: r > 1, "{:.1f}x faster")
    for method in ("oppu", "perpcs", "perfit"):
        claim(f"{method} beats non-personalized",
              score_ratio(results, method, "nonpersonalized"), lambda r: r > 1)
    for suffix in ("+rag1", "+pag"):
        if f"oppu{suffix}" not in results["methods"]:
            continue
        if f"perpcs{suffix}" in results["methods"]:
            claim(f"PER-PCS{suffix} score / OPPU{suffix} score ~ 0.99",
                  score_ratio(results, f"perpcs{suffix}", f"oppu{suffix}"), lambda r: r >= 0.95)
        claim(f"OPPU{suffix} beats OPPU", score_ratio(results, f"oppu{suffix}", "oppu"),
              lambda r: r > 1)
    return rows


def claims_table(results: dict) -> str:
    rows = paper_claims(results)
    verdict = {True: "held", False: "did not hold", None: "not measured"}
    body = [[r["claim"], r["shown"], verdict[r["held"]]] for r in rows]
    title = (f"paper claims on task {results['task']} ({results['base_model']}, "
             f"{results['users']} users)")
    return title + "\n" + format_table(["claim", "measured", "verdict"], body)
