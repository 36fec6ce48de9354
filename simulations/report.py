"""Results as readable tables."""

from __future__ import annotations

from shared.metrics import HIGHER_IS_BETTER


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with right-aligned numeric columns."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def methods_table(methods: dict) -> str:
    """One row per method: metrics, parameters, bytes and seconds per user. A method entry
    with no ``metrics`` (e.g. ``{"error": ...}`` from a federation) gets dashes and a note."""
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
        rows.append([name] + [f"{r['metrics'][m]:.4f}" for m in metric_names]
                    + [f"{r['params_per_user']:,.0f}", _human_bytes(r["bytes_per_user"]),
                       f"{r['seconds_per_user']:.2f}"])
    return "\n".join([format_table(headers, rows)] + notes)


def results_table(results: dict) -> str:
    """``pfl eval``'s results: a title line, then :func:`methods_table`."""
    title = (f"task {results['task']} | model {results['base_model']} | "
             f"{results['users']} users, {results.get('queries', '?')} queries")
    return title + "\n" + methods_table(results["methods"])
