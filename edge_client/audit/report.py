"""``pfl audit report RUN_DIR_OR_LEDGER``: one self-contained HTML page for a person who
audits a device or a whole run.

It shows what left, to whom, when and under which consent rule (every entry, and byte totals
per phase and channel as charts); whether each ledger verifies (the first bad line if not);
the differential-privacy parameters and epsilon that entries recorded; and whether secure
aggregation was on. The page carries everything inline (CSS, SVG charts; no script, no
network: its Content-Security-Policy forbids both), so it can be mailed or archived as is.

Ledgers are written by devices and may be damaged or hostile: every value is escaped, a
line that does not parse is counted and skipped (the ledger is then shown as not intact),
and at most ``max_rows`` entries are listed (the totals cover all of them).

Privacy fields are read from an entry's ``meta`` (identifiers only, see
:class:`edge_client.audit.ledger.AuditLedger`): :data:`DP_KEYS`, the differential-privacy
terms the server announced for the round the upload answered (``cloud_server.privacy``:
clipping norm, noise multiplier, delta, and the epsilon the run will have spent after that
round), and :data:`SECAGG_KEY` true when the upload left masked for secure aggregation.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_client.audit.ledger import PHASE_ORDER, _lines, entry_phases, entry_run, verify
from edge_client.state import ledger_paths
from shared.config import DP_ROUND_KEYS
from shared.errors import PflError
from shared.files import human_bytes

#: meta keys of a differentially private upload (clipping norm, noise multiplier, and the
#: (epsilon, delta) spent by the run so far, as the accountant reported it)
DP_KEYS = tuple(key.replace("-", "_") for key in DP_ROUND_KEYS)
#: meta key set true on an upload that left masked (SecAgg+)
SECAGG_KEY = "secagg"
OUTSIDE = "outside a federation phase"


@dataclass
class LedgerReport:
    """What the page says about one ledger."""

    label: str
    path: str
    entries: list[dict] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    unreadable_lines: int = 0
    intact: bool = False
    problem: str | None = None
    head: str | None = None

    @property
    def bytes(self) -> int:
        return sum(_size(e) for e in self.entries)


def _size(entry: dict) -> int:
    try:
        return max(0, int(entry.get("payload_bytes") or 0))
    except (TypeError, ValueError):
        return 0


def _read(label: str, path: Path, run: str | None = None) -> LedgerReport:
    report = LedgerReport(label, str(path))
    for _, raw in _lines(path):
        try:
            entry = json.loads(raw)
        except ValueError:
            report.unreadable_lines += 1
            continue
        if isinstance(entry, dict) and isinstance(entry.get("message_type"), str):
            if run is None or entry_run(entry) == str(run):
                report.entries.append(entry)
        else:
            report.unreadable_lines += 1
    report.phases = [p or OUTSIDE for p in entry_phases(report.entries)]
    result = verify(path)
    report.intact, report.head = result.ok, result.head if result.ok else None
    report.problem = None if result.ok else result.message
    return report


def find_ledgers(target: str | Path) -> list[tuple[str, Path]]:
    """``(label, path)`` of the ledgers to report: the file itself, or every device ledger
    of a run folder (``clients/partition-N/ledger.jsonl``), or any ``ledger.jsonl`` below a
    folder."""
    target = Path(target)
    if target.is_file():
        return [(target.name, target)]
    if not target.is_dir():
        raise PflError(f"{target}: no audit ledger there (no such file or folder)")
    found = [(f"device {pid}", path) for pid, path in ledger_paths(target).items()]
    if not found:
        found = [(str(p.parent.relative_to(target)) or p.name, p)
                 for p in sorted(target.rglob("ledger.jsonl"))]
    if not found:  # ledgers collected from devices, named as the collector chose
        found = [(str(p.relative_to(target)), p) for p in sorted(target.rglob("*.jsonl"))]
    if not found:
        raise PflError(f"{target}: no audit ledger (ledger.jsonl) in this folder")
    return found


def build_report(target: str | Path, run: str | None = None) -> dict[str, Any]:
    """Everything the page shows (with ``run``, that Flower run's entries only), as plain
    data (also what the tests read)."""
    ledgers = [_read(label, path, run) for label, path in find_ledgers(target)]
    by_phase: dict[str, dict[str, int]] = {}
    rules: dict[str, dict[str, int]] = {}
    destinations: dict[str, int] = {}
    dp: list[dict] = []
    masked = plain_uploads = 0
    for ledger in ledgers:
        for entry, phase in zip(ledger.entries, ledger.phases):
            size = _size(entry)
            channel = str(entry.get("channel"))
            by_phase.setdefault(phase, {}).setdefault(channel, 0)
            by_phase[phase][channel] += size
            rule = str(entry.get("consent_rule") or "(none recorded)")
            bucket = rules.setdefault(rule, {"entries": 0, "bytes": 0})
            bucket["entries"] += 1
            bucket["bytes"] += size
            destinations[str(entry.get("destination"))] = \
                destinations.get(str(entry.get("destination")), 0) + size
            meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
            if any(k in meta for k in DP_KEYS):
                dp.append({"ledger": ledger.label, "seq": entry.get("seq"), "phase": phase,
                           **{k: meta.get(k) for k in DP_KEYS}})
            if entry.get("arrays") and channel == "flower" and phase.startswith("stage 1"):
                if meta.get(SECAGG_KEY) is True:
                    masked += 1
                else:
                    plain_uploads += 1
    order = sorted(by_phase, key=lambda p: (PHASE_ORDER.index(p) if p in PHASE_ORDER
                                            else len(PHASE_ORDER), p))
    epsilons = [d["dp_epsilon"] for d in dp if isinstance(d.get("dp_epsilon"), (int, float))]
    return {
        "target": str(target),
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ledgers": ledgers,
        "entries": sum(len(ledger.entries) for ledger in ledgers),
        "bytes": sum(ledger.bytes for ledger in ledgers),
        "intact": sum(ledger.intact for ledger in ledgers),
        "phases": [(p, by_phase[p]) for p in order],
        "channels": sorted({c for p in by_phase.values() for c in p}),
        "rules": sorted(rules.items(), key=lambda kv: -kv[1]["bytes"]),
        "destinations": sorted(destinations.items(), key=lambda kv: -kv[1]),
        "dp": dp, "dp_epsilon_max": max(epsilons) if epsilons else None,
        "secagg": {"masked_uploads": masked, "plain_uploads": plain_uploads},
    }


# -------------------------------------------------------------------------------- HTML
_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1")
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.2em .6em;border-bottom:1px solid #eee;
text-align:left;vertical-align:top}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37;font-weight:600}.bad{color:#c62828;font-weight:600}.muted{color:#777}
.cards{display:flex;gap:1em;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;
padding:.6em 1em;min-width:10em}.card b{display:block;font-size:1.4em}
code{font-size:.9em}svg text{font:12px system-ui,sans-serif}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _bars(rows: list[tuple[str, dict[str, int]]], channels: list[str], title: str) -> str:
    """A horizontal stacked bar chart (inline SVG) of bytes per row and channel."""
    if not rows:
        return "<p class='muted'>nothing was sent</p>"
    width, label_w, bar_h, gap = 760, 170, 22, 8
    top = max(sum(parts.values()) for _, parts in rows) or 1
    height = len(rows) * (bar_h + gap) + 40
    out = [f"<svg role='img' aria-label='{_e(title)}' width='{width + 120}' "
           f"height='{height}' xmlns='http://www.w3.org/2000/svg'>"]
    for i, (name, parts) in enumerate(rows):
        y = i * (bar_h + gap)
        out.append(f"<text x='{label_w - 6}' y='{y + 15}' text-anchor='end'>{_e(name)}</text>")
        x = float(label_w)
        for j, channel in enumerate(channels):
            size = parts.get(channel, 0)
            if size:
                w = max(1.0, (width - label_w) * size / top)
                out.append(f"<rect x='{x:.1f}' y='{y}' width='{w:.1f}' height='{bar_h}' "
                           f"fill='{_PALETTE[j % len(_PALETTE)]}'><title>{_e(channel)}: "
                           f"{size} bytes</title></rect>")
                x += w
        out.append(f"<text x='{x + 6:.1f}' y='{y + 15}'>"
                   f"{_e(human_bytes(sum(parts.values())))}</text>")
    y = len(rows) * (bar_h + gap) + 10
    for j, channel in enumerate(channels):
        out.append(f"<rect x='{label_w + j * 130}' y='{y}' width='12' height='12' "
                   f"fill='{_PALETTE[j % len(_PALETTE)]}'/><text x='{label_w + j * 130 + 16}' "
                   f"y='{y + 11}'>{_e(channel)}</text>")
    out.append("</svg>")
    return "".join(out)


def render_html(report: dict[str, Any], *, max_rows: int = 2000) -> str:
    """The page (a complete HTML document) for :func:`build_report`'s ``report``."""
    ledgers: list[LedgerReport] = report["ledgers"]
    n_bad = len(ledgers) - report["intact"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; img-src data:\">",
        f"<title>pfl audit report: {_e(report['target'])}</title><style>{_CSS}</style>",
        "</head><body>",
        f"<h1>What left the device{'s' if len(ledgers) > 1 else ''}</h1>",
        f"<p class='muted'>Audit report of <code>{_e(report['target'])}</code>, made "
        f"{_e(report['generated'])} by <code>pfl audit report</code> from "
        f"{len(ledgers)} ledger{'s' if len(ledgers) != 1 else ''}. Every outbound payload "
        "of a device is a ledger entry, written before it leaves; the ledger keeps array "
        "names, shapes, sizes and hashes, never the user's text.</p>",
        "<div class='cards'>",
        f"<div class='card'>entries<b id='total-entries'>{report['entries']}</b></div>",
        f"<div class='card'>bytes out<b id='total-bytes' data-bytes='{report['bytes']}'>"
        f"{_e(human_bytes(report['bytes']))}</b><span class='muted'>{report['bytes']:,} B"
        "</span></div>",
        f"<div class='card'>ledgers verified<b id='ledgers-intact' class="
        f"'{'ok' if not n_bad else 'bad'}'>{report['intact']} of {len(ledgers)}</b></div>",
        "<div class='card'>differential privacy<b id='dp-epsilon'>"
        + (f"ε = {report['dp_epsilon_max']:.3g}" if report["dp_epsilon_max"] is not None
           else "not recorded") + "</b></div>",
        "<div class='card'>secure aggregation<b id='secagg'>"
        + ("on" if report["secagg"]["masked_uploads"] and not report["secagg"]["plain_uploads"]
           else "mixed" if report["secagg"]["masked_uploads"] else "off") + "</b></div>",
        "</div>",
        "<h2>Bytes out per phase</h2>",
        _bars(report["phases"], report["channels"], "bytes out per phase and channel"),
        "<h2>Bytes out per channel</h2>",
        _bars([(c, {c: sum(p.get(c, 0) for _, p in report["phases"])})
               for c in report["channels"]], report["channels"], "bytes out per channel"),
        "<h2>Under which consent rule</h2><table id='rules'><tr><th>consent rule</th>"
        "<th class='n'>entries</th><th class='n'>bytes</th></tr>",
    ]
    for rule, t in report["rules"]:
        parts.append(f"<tr><td><code>{_e(rule)}</code></td><td class='n'>{t['entries']}</td>"
                     f"<td class='n' data-bytes='{t['bytes']}'>{_e(human_bytes(t['bytes']))}"
                     "</td></tr>")
    parts.append("</table><h2>To whom</h2><table id='destinations'><tr><th>destination</th>"
                 "<th class='n'>bytes</th></tr>")
    for destination, size in report["destinations"]:
        parts.append(f"<tr><td><code>{_e(destination)}</code></td>"
                     f"<td class='n' data-bytes='{size}'>{_e(human_bytes(size))}</td></tr>")
    parts.append("</table><h2>Does each ledger verify?</h2><table id='ledgers'><tr>"
                 "<th>ledger</th><th>status</th><th class='n'>entries</th>"
                 "<th class='n'>bytes</th><th>head hash</th></tr>")
    for ledger in ledgers:
        status = ("<span class='ok'>intact</span>" if ledger.intact else
                  f"<span class='bad'>NOT intact</span>: {_e(ledger.problem)}")
        if ledger.unreadable_lines:
            status += f" <span class='muted'>({ledger.unreadable_lines} unreadable lines " \
                      "skipped)</span>"
        parts.append(f"<tr data-ledger='{_e(ledger.label)}' data-intact="
                     f"'{str(ledger.intact).lower()}'><td>{_e(ledger.label)}<br><code "
                     f"class='muted'>{_e(ledger.path)}</code></td><td>{status}</td>"
                     f"<td class='n'>{len(ledger.entries)}</td><td class='n' data-bytes="
                     f"'{ledger.bytes}'>{_e(human_bytes(ledger.bytes))}</td><td><code>"
                     f"{_e((ledger.head or '-')[:16])}</code></td></tr>")
    parts.append("</table><h2>Privacy of the collective updates</h2>")
    secagg = report["secagg"]
    parts.append(f"<p>Secure aggregation: {secagg['masked_uploads']} stage-1 uploads left "
                 f"masked (SecAgg+), {secagg['plain_uploads']} in the clear (protected on "
                 "the wire by TLS, readable by the server).</p>")
    if report["dp"]:
        parts.append("<table id='dp'><tr><th>ledger</th><th class='n'>entry</th><th>phase</th>"
                     "<th class='n'>clipping norm</th><th class='n'>noise multiplier</th>"
                     "<th class='n'>ε</th><th class='n'>δ</th></tr>")
        for d in report["dp"]:
            parts.append("<tr>" + "".join(
                f"<td{' class=n' if k not in ('ledger', 'phase') else ''}>{_e(d.get(k))}</td>"
                for k in ("ledger", "seq", "phase", *DP_KEYS)) + "</tr>")
        parts.append("</table>")
    else:
        parts.append("<p>Differential privacy: no entry recorded a clipping norm, noise "
                     "multiplier or ε: the updates were not noised.</p>")
    rows = [(ledger, entry, phase) for ledger in ledgers
            for entry, phase in zip(ledger.entries, ledger.phases)]
    parts.append(f"<h2>Every payload</h2><p class='muted'>{len(rows)} entries"
                 + (f"; the first {max_rows} are listed" if len(rows) > max_rows else "")
                 + ".</p><table id='entries'><tr><th>ledger</th><th class='n'>seq</th>"
                 "<th>time (UTC)</th><th>phase</th><th>channel</th><th>to</th>"
                 "<th>message</th><th>consent rule</th><th class='n'>arrays</th>"
                 "<th class='n'>bytes</th></tr>")
    for ledger, entry, phase in rows[:max_rows]:
        arrays = entry.get("arrays") if isinstance(entry.get("arrays"), list) else []
        names = ", ".join(str(a.get("name")) for a in arrays[:6] if isinstance(a, dict))
        names += f" (+{len(arrays) - 6})" if len(arrays) > 6 else ""
        parts.append(
            f"<tr><td>{_e(ledger.label)}</td><td class='n'>{_e(entry.get('seq'))}</td>"
            f"<td>{_e(entry.get('time'))}</td><td>{_e(phase)}</td>"
            f"<td>{_e(entry.get('channel'))}</td><td>{_e(entry.get('destination'))}</td>"
            f"<td>{_e(entry.get('message_type'))}</td>"
            f"<td><code>{_e(entry.get('consent_rule') or '-')}</code></td>"
            f"<td class='n' title='{_e(names)}'>{len(arrays)}</td>"
            f"<td class='n'>{_size(entry):,}</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def cmd_audit_report(args) -> int:
    """Write one self-contained HTML page about a device's ledger or a run's ledgers."""
    report = build_report(args.target, run=getattr(args, "run", None))
    page = render_html(report, max_rows=args.max_rows)
    out = Path(args.out or (Path(args.target).with_suffix(".html")
                            if Path(args.target).is_file()
                            else Path(args.target) / "audit-report.html"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    bad = len(report["ledgers"]) - report["intact"]
    print(f"{out}: {report['entries']} entries, {human_bytes(report['bytes'])} out, "
          f"{report['intact']} of {len(report['ledgers'])} ledgers intact")
    return 1 if bad else 0
