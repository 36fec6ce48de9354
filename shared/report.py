"""Results as readable tables."""

from __future__ import annotations

from typing import Sequence

from shared import statistics
from shared.files import human_bytes
from shared.metrics import HIGHER_IS_BETTER


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with right-aligned numeric columns."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _with_interval(result: dict, metric: str) -> str:
    """"0.5120 [0.431, 0.598]": the value and, where the result has one, its 95% interval."""
    interval = result.get("intervals", {}).get(metric) or {}
    return statistics.format_interval(result["metrics"][metric], interval.get("low"),
                                      interval.get("high"))


def methods_table(methods: dict) -> str:
    """One row per method: metrics (with 95% intervals over users where the results have
    them), parameters, bytes and seconds per user. A method entry with no ``metrics`` (e.g.
    ``{"error": ...}`` from a federation) gets dashes and a note; one that failed on some
    targets (``failures``) a note too."""
    scored = [r for r in methods.values() if "metrics" in r]
    metric_names = list(scored[0]["metrics"]) if scored else []
    headers = ["method"] + [f"{m} {'↑' if HIGHER_IS_BETTER.get(m, True) else '↓'}"
                            for m in metric_names] + ["params/user", "bytes/user", "s/user"]
    rows, notes = [], []
    for name, r in methods.items():
        if "metrics" not in r:
            rows.append([name] + ["-"] * (len(metric_names) + 3))
            notes.append(f"{name}: {r.get('error', 'no result')}")
            continue
        rows.append([name] + [_with_interval(r, m) for m in metric_names]
                    + [f"{r['params_per_user']:,.0f}", human_bytes(r["bytes_per_user"]),
                       f"{r['seconds_per_user']:.2f}"])
        if r.get("failures"):  # scored on the others; say on how many it failed
            notes.append(f"{name}: left out {r['failures']}")
    return "\n".join([format_table(headers, rows)] + notes)


def results_table(results: dict) -> str:
    """``pfl eval``'s results: a title line, then :func:`methods_table`."""
    title = (f"task {results['task']} | model {results['base_model']} | "
             f"{results['users']} users, {results.get('queries', '?')} queries")
    return title + "\n" + methods_table(results["methods"])


def comparison_pairs(results: dict, a: str | None = None, b: str | None = None,
                     against: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(a, b) pairs to compare: the one asked for, or every method against each reference in
    ``against`` that the results have."""
    methods = [name for name, r in results["methods"].items() if "queries" in r]
    if a is not None or b is not None:
        missing = [m for m in (a, b) if m not in methods]
        if missing:
            raise KeyError(f"no per-query results for {', '.join(map(str, missing))} "
                           f"(have: {', '.join(methods) or 'none'})")
        return [(a, b)]
    pairs: list[tuple[str, str]] = []
    for ref in (r for r in against if r in methods):
        pairs += [(name, ref) for name in methods
                  if name != ref and (ref, name) not in pairs]  # each pair once
    return pairs


def comparisons_table(results: dict, pairs: Sequence[tuple[str, str]],
                      metrics: Sequence[str] | None = None) -> str:
    """Paired comparisons on the same users: the difference of each metric (signed so that
    > 0 means the first method is better) with its 95% paired bootstrap interval, per-user
    wins/ties/losses, identical outputs, and whether the interval excludes 0."""
    task = statistics.metric_task(results)
    rows = []
    for a, b in pairs:
        ra, rb = results["methods"][a], results["methods"][b]
        for metric in metrics or list(ra["metrics"])[:1]:
            c = statistics.paired_comparison(task, ra["queries"], rb["queries"], metric, a=a,
                                             b=b, seed=results.get("seed", 0))
            shown = statistics.format_interval(c.difference, c.low, c.high, "{:+.4f}",
                                               "{:+.3f}")
            rows.append([f"{a} vs {b}", metric, shown, f"{c.wins}/{c.ties}/{c.losses}",
                         f"{c.identical}/{c.queries}", c.verdict])
    return format_table(["comparison", "metric", "difference (95% CI)", "users W/T/L",
                         "identical outputs", "verdict"], rows)
