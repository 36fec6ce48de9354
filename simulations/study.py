"""PER-PCS robustness studies (the PER-PCS paper's): the score against the number of sharers,
and against the sharing ratio, each point a ``pfl eval`` run with 95% intervals.

    pfl study sharers --task synthetic --values 5,10,20,max --out runs/study
    pfl study sharing-ratio --task synthetic --values 0.2,0.5,1.0 --out runs/study

Every point evaluates PER-PCS on the same targets with the same stage 1 as ``pfl eval`` with
the same ``--sharers`` (default 10): the collective users stay those of that run
(``sharer_slots``). Fewer sharers are the most active of its sharers, so 5 of them are
among the 10; more are its sharers plus the most active users after the collective ones, so
the 10 are among the 20. With the sharer cache (``shared.methods.perpcs.core.save_sharer_pieces``) each sharer
is trained once for the whole study; the sharing-ratio points reuse every sharer's pieces.
The first point also evaluates LoRA-C (stage 1 only, no per-user state), the reference line.

Each point is written to ``OUT/AXIS-VALUE.json`` as soon as it is done (a study that is cut
off resumes from there); the summary goes to ``OUT/AXIS.json``, ``OUT/AXIS.md`` (the table
and the command) and ``OUT/AXIS.png`` (score with 95% intervals against the axis).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from shared.data import load_dataset
from shared.errors import PflError
from shared.files import write_json
from shared.metrics import HIGHER_IS_BETTER
from shared.statistics import format_interval
from simulations.evaluate import EvalConfig, queries_per_user, resumable_methods, run_eval

log = logging.getLogger(__name__)

AXES = ("sharers", "sharing-ratio")
REFERENCE = "lora-c"  # stage 1 only: what PER-PCS assembles on top of


def max_sharers(config: EvalConfig) -> int:
    """The most sharers the data allows once the targets and collective users are set aside."""
    dataset = load_dataset(config.task, config.data, min_history=config.min_history,
                           queries_per_user=queries_per_user(config.task,
                                                             config.queries_per_user),
                           seed=config.seed)
    return max(0, len(dataset) - config.users - config.collective)


def study_points(axis: str, values: Sequence[str], config: EvalConfig) -> list[tuple[str, float]]:
    """(label, value) per point, in the order given; ``max`` (sharers) is the data's most."""
    if axis not in AXES:
        raise PflError(f"unknown study {axis!r} (known: {', '.join(AXES)})")
    points = []
    for text in values:
        text = str(text).strip()
        try:
            value = float(max_sharers(config)) if axis == "sharers" and text == "max" \
                else float(text)
        except ValueError:
            raise PflError(f"{axis}: {text!r} is not a number") from None
        if axis == "sharers" and (value < 1 or value != int(value)):
            raise PflError(f"sharers: {text} is not a whole number >= 1")
        if axis == "sharing-ratio" and not 0 < value <= 1:
            raise PflError(f"sharing-ratio: {text} is not in (0, 1]")
        points.append((text, value))
    if not points:
        raise PflError("give at least one value")
    return points


def point_config(base: EvalConfig, axis: str, value: float, slots: int, first: bool
                 ) -> EvalConfig:
    """The ``pfl eval`` settings of one point."""
    methods = (REFERENCE, "perpcs") if first else ("perpcs",)
    if axis == "sharers":
        return replace(base, methods=methods, sharers=int(value), sharer_slots=slots)
    options = json.loads(json.dumps(base.options))
    options.setdefault("perpcs", {})["sharing_ratio"] = value
    return replace(base, methods=methods, options=options)


def run_study(base: EvalConfig, axis: str, values: Sequence[str], out_dir: str | Path, *,
              metric: str | None = None, on_point: Callable[[dict], None] | None = None,
              command: str = "") -> dict:
    """Run every point (skipping those already in ``out_dir`` with the same settings) and
    write the summary, its table and its plot; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = study_points(axis, values, base)
    slots = base.sharers  # the collective users (and stage 1) of pfl eval's run
    rows, reference = [], None
    for index, (label, value) in enumerate(points):
        config = point_config(base, axis, value, slots, first=index == 0)
        path = out / f"{axis}-{label}.json"
        previous = json.loads(path.read_text()) if path.is_file() else None
        if previous is not None and set(resumable_methods(config, previous, config.methods)) \
                == set(config.methods):
            log.info("%s = %s: kept from %s", axis, label, path)
            results = previous
        else:
            log.info("%s = %s: evaluating %s", axis, label, ", ".join(config.methods))
            results = run_eval(config, on_method=lambda partial: write_json(path, partial),
                               previous=previous)
            write_json(path, results)
        name = metric or next(iter(results["methods"]["perpcs"]["metrics"]))
        if REFERENCE in results["methods"]:
            reference = _point(results["methods"][REFERENCE], name)
        row = {"label": label, "value": value, "sharers": results["sharers"],
               **_point(results["methods"]["perpcs"], name)}
        rows.append(row)
        if on_point is not None:
            on_point(row)
    summary = {"axis": axis, "metric": name, "task": results["task"],
               "users": results["users"], "queries": results["queries"],
               "reference": reference, "points": rows, "command": command}
    write_json(out / f"{axis}.json", summary)
    (out / f"{axis}.md").write_text(study_markdown(summary))
    plot_study(summary, out / f"{axis}.png")
    return summary


def _point(result: dict, metric: str) -> dict:
    interval = result.get("intervals", {}).get(metric) or {}
    return {"score": result["metrics"][metric], "low": interval.get("low"),
            "high": interval.get("high")}


def study_table(summary: dict) -> str:
    """The points as a plain-text table, with the reference row first."""
    metric = summary["metric"]
    arrow = "↑" if HIGHER_IS_BETTER.get(metric, True) else "↓"
    lines = [f"{summary['axis']:>14}  {metric + ' ' + arrow:>24}"]
    ref = summary.get("reference")
    if ref:
        shown = format_interval(ref["score"], ref["low"], ref["high"])
        lines.append(f"{'stage 1 only':>14}  {shown:>24}  (LoRA-C)")
    for row in summary["points"]:
        lines.append(f"{row['label']:>14}  "
                     f"{format_interval(row['score'], row['low'], row['high']):>24}")
    return "\n".join(lines)


def study_markdown(summary: dict) -> str:
    """``AXIS.md``: what was measured, the table, the command."""
    return (f"# PER-PCS: {summary['metric']} against {summary['axis']}\n\n"
            f"Task {summary['task']}, {summary['users']} targets, {summary['queries']} queries; "
            "95% bootstrap intervals over users; the same targets and stage 1 at every point. "
            f"![plot]({summary['axis']}.png)\n\n```\n{study_table(summary)}\n```\n\n"
            f"```bash\n{summary.get('command') or ''}\n```\n")


def plot_study(summary: dict, path: Path) -> Path:
    """Score with 95% intervals against the axis; the stage-1 reference as a band."""
    # lazy: matplotlib loads only when a figure is drawn
    from simulations.plots import new_figure, save_figure

    fig, ax = new_figure()
    points = summary["points"]
    xs = [p["value"] for p in points]
    ys = [p["score"] for p in points]
    low = [p["score"] - p["low"] if p["low"] is not None else 0 for p in points]
    high = [p["high"] - p["score"] if p["high"] is not None else 0 for p in points]
    ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=4, label="PER-PCS")
    ref = summary.get("reference")
    if ref:
        ax.axhline(ref["score"], color="grey", linestyle="--", label="stage 1 only")
        if ref["low"] is not None:
            ax.axhspan(ref["low"], ref["high"], color="grey", alpha=0.15)
    ax.set_xlabel("sharers" if summary["axis"] == "sharers" else "sharing ratio")
    ax.set_ylabel(summary["metric"])
    ax.set_title(f"PER-PCS on {summary['task']} ({summary['users']} targets)")
    ax.legend()
    return save_figure(fig, path)
