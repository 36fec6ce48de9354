"""``pfl audit show | summary | verify | report``: read a device's ledger."""

from __future__ import annotations

import json
import logging
import sys

from edge_client.audit.ledger import read_entries, summary, verify
from edge_client.audit.report import cmd_audit_report
from shared.files import human_bytes

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- CLI
def _table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [fmt(headers), fmt(["-" * w for w in widths])]
    return "\n".join(lines + [fmt(r) for r in rows])


def format_entries(entries: list[dict]) -> str:
    """A readable table of ledger entries."""
    rows = [[str(e.get("seq")), str(e.get("time", "")), str(e.get("channel", "")),
             str(e.get("destination", "")), str(e.get("message_type", "")),
             str(len(e.get("arrays") or [])), human_bytes(int(e.get("payload_bytes", 0) or 0)),
             str(e.get("consent_rule") or "-"), str(e.get("hash", ""))[:12]] for e in entries]
    return _table(["seq", "time (UTC)", "channel", "destination", "message", "arrays", "bytes",
                   "consent rule", "hash"], rows, right={0, 5, 6})


def format_summary(info: dict) -> str:
    """A readable rendering of :func:`summary`."""
    rows = []
    for channel, c in sorted(info["channels"].items()):
        for kind, k in sorted(c["message_types"].items()):
            rows.append([channel, kind, str(k["count"]), human_bytes(k["bytes"])])
    rows.append(["total", "", str(info["entries"]), human_bytes(info["bytes"])])
    lines = [f"ledger  {info['path']}",
             f"period  {info['first_time'] or '-'} .. {info['last_time'] or '-'}",
             "status  " + (f"intact, head {info['head']}" if info["intact"]
                           else f"BROKEN: {info['problem']}"),
             "", _table(["channel", "message", "entries", "bytes"], rows, right={2, 3}), ""]
    rules = [[rule, str(n)] for rule, n in sorted(info["consent_rules"].items())]
    lines.append(_table(["consent rule", "entries"], rules, right={1}))
    return "\n".join(lines)


def cmd_audit_show(args) -> int:
    """Print the ledger's entries (the last N with --last) as a table or JSON."""
    entries = read_entries(args.ledger)
    if args.last is not None:
        entries = entries[-args.last:] if args.last > 0 else []
    print(json.dumps(entries, indent=2) if args.json else format_entries(entries))
    return 0


def cmd_audit_summary(args) -> int:
    """Print totals per channel, message type and consent rule."""
    info = summary(args.ledger)
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


def cmd_audit_verify(args) -> int:
    """Exit 0 when the chain is intact, 1 (naming the first bad line) when it is not."""
    result = verify(args.ledger, head=getattr(args, "head", None))
    if result.ok:
        print(f"{args.ledger}: {result.message}")
        if result.warning:
            print(f"pfl: warning: {args.ledger}: {result.warning}", file=sys.stderr)
        return 0
    print(f"{args.ledger}: NOT intact: {result.message}")
    return 1


def add_audit_commands(subparsers) -> None:
    """Register ``audit show | summary | verify | report`` on the ``pfl`` command's
    subparsers."""
    audit = subparsers.add_parser(
        "audit", help="read, summarize and verify a device's audit ledger",
        description="Every payload a device sends is recorded in its hash-chained ledger.")
    commands = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)

    show = commands.add_parser("show", help="list the ledger's entries",
                               description=cmd_audit_show.__doc__)
    show.add_argument("ledger", metavar="LEDGER", help="the ledger file (.jsonl)")
    show.add_argument("--last", type=int, default=None, metavar="N", help="only the last N")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_audit_show)

    summ = commands.add_parser("summary", help="totals per channel and message type",
                               description=cmd_audit_summary.__doc__)
    summ.add_argument("ledger", metavar="LEDGER", help="the ledger file (.jsonl)")
    summ.add_argument("--json", action="store_true", help="print JSON")
    summ.set_defaults(func=cmd_audit_summary)

    ver = commands.add_parser("verify", help="check the hash chain (exit 1 when broken)",
                              description=cmd_audit_verify.__doc__)
    ver.add_argument("ledger", metavar="LEDGER", help="the ledger file (.jsonl)")
    ver.add_argument("--head", default=None, metavar="HASH",
                     help="a head hash noted earlier (from `audit summary`); it must still be "
                          "in the chain, which catches entries removed from the end")
    ver.set_defaults(func=cmd_audit_verify)

    rep = commands.add_parser("report", help="one self-contained HTML page: what left, to "
                              "whom, when, under which rule; verification; DP and SecAgg",
                              description=cmd_audit_report.__doc__)
    rep.add_argument("target", metavar="RUN_DIR_OR_LEDGER",
                     help="a ledger file, or a run folder (every device's ledger)")
    rep.add_argument("--out", default=None, help="the HTML file (default: LEDGER.html, or "
                     "RUN_DIR/audit-report.html)")
    rep.add_argument("--max-rows", type=int, default=2000,
                     help="entries listed (the totals cover all; default %(default)s)")
    rep.set_defaults(func=cmd_audit_report)
