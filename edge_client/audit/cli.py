"""``pfl audit show | summary | verify | report``: read devices' ledgers.

Each command takes ledger files, run folders or folders of ledgers collected from devices,
and ``--run RUN_ID`` keeps one Flower run's entries (a ledger holds every run its device
took part in). Strings a ledger holds are printed with control characters escaped
(:func:`visible`)."""

from __future__ import annotations

import json
import logging
import sys
import unicodedata
from pathlib import Path

from edge_client.audit.ledger import entry_run, is_refusal, read_entries, summary, verify
from edge_client.audit.report import cmd_audit_report, find_ledgers
from shared.errors import PflError
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
    """A readable table of ledger entries. A request its receiver refused is marked in the
    ``outcome`` column (the refusal's own zero-byte entry is folded into it)."""
    refused = {}
    for e in entries:
        if is_refusal(e) and isinstance(e.get("meta"), dict):
            refused[e["meta"].get("outcome_of")] = str(e["meta"].get("status", "refused"))
    rows = [[str(e.get("seq")), str(e.get("time", "")), str(e.get("channel", "")),
             str(e.get("destination", "")), str(e.get("message_type", "")),
             str(len(e.get("arrays") or [])), human_bytes(int(e.get("payload_bytes", 0) or 0)),
             str(e.get("consent_rule") or "-"),
             f"REFUSED ({refused[e.get('seq')]})" if e.get("seq") in refused else "sent",
             str(e.get("hash", ""))[:12]] for e in entries if not is_refusal(e)]
    return _table(["seq", "time (UTC)", "channel", "destination", "message", "arrays", "bytes",
                   "consent rule", "outcome", "hash"], [[visible(c) for c in r] for r in rows],
                  right={0, 5, 6})


def format_summary(info: dict) -> str:
    """A readable rendering of :func:`summary`."""
    rows = []
    for channel, c in sorted(info["channels"].items()):
        for kind, k in sorted(c["message_types"].items()):
            rows.append([channel, kind, str(k["count"]), human_bytes(k["bytes"])])
    rows.append(["total", "", str(info["entries"]), human_bytes(info["bytes"])])
    runs = info.get("runs") or {}
    lines = [f"ledger  {info['path']}",
             f"period  {info['first_time'] or '-'} .. {info['last_time'] or '-'}",
             "status  " + (f"intact, head {info['head']}" if info["intact"]
                           else f"BROKEN: {info['problem']}"),
             "runs    " + (", ".join(f"{run} ({n} entries)" for run, n in runs.items())
                           or "-")
             + (f"; shown: run {info['run']} only" if info.get("run") else "")]
    if info.get("refused"):
        lines.append(f"refused {info['refused']} request(s) left the device but their "
                     "receiver refused them (pfl audit show marks them)")
    lines += ["", _table(["channel", "message", "entries", "bytes"],
                         [[visible(c) for c in r] for r in rows], right={2, 3}), ""]
    rules = [[visible(rule), str(n)] for rule, n in sorted(info["consent_rules"].items())]
    lines.append(_table(["consent rule", "entries"], rules, right={1}))
    return "\n".join(lines)


def visible(text: str) -> str:
    """``text`` with control and bidirectional-override characters escaped (``\\x1b``,
    ``\\u202e``): a ledger's strings may come from a hostile server, and must not move the
    cursor, recolour or reorder what an auditor reads."""
    return "".join(ch if ch.isprintable() and unicodedata.category(ch) not in ("Cf",)
                   else (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
                   for ch in str(text))


def ledger_files(targets: list[str]) -> list[tuple[str, Path]]:
    """``(label, path)`` of every ledger the arguments name: files, run folders, or folders
    of collected ledgers (any ``ledger.jsonl`` or ``*.jsonl`` below)."""
    found: list[tuple[str, Path]] = []
    for target in targets:
        found += find_ledgers(target)
    return found


def _in_run(entries: list[dict], run: str | None) -> list[dict]:
    return entries if run is None else [e for e in entries if entry_run(e) == str(run)]


def cmd_audit_show(args) -> int:
    """Print the ledgers' entries (the last N with --last; one run's with --run) as a table
    or JSON."""
    ledgers = ledger_files(args.ledger)
    shown: dict[str, list[dict]] = {}
    for label, path in ledgers:
        entries = _in_run(read_entries(path), args.run)
        if args.last is not None:
            entries = entries[-args.last:] if args.last > 0 else []
        shown[str(path)] = entries
    if args.json:
        print(json.dumps(shown if len(ledgers) > 1 else next(iter(shown.values())), indent=2))
        return 0
    for (label, path), entries in zip(ledgers, shown.values()):
        if len(ledgers) > 1:
            print(f"== {visible(label)} ({path})")
        print(format_entries(entries))
    return 0


def cmd_audit_summary(args) -> int:
    """Print totals per channel, message type and consent rule, for each ledger (one run's
    entries with --run)."""
    infos = [summary(path, run=args.run) for _, path in ledger_files(args.ledger)]
    if args.json:
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=2))
    else:
        print("\n\n".join(format_summary(info) for info in infos))
    return 0


def cmd_audit_verify(args) -> int:
    """Exit 0 when every chain is intact, 1 (naming the first bad line) when one is not."""
    ledgers = ledger_files(args.ledger)
    if args.head is not None and len(ledgers) > 1:
        raise PflError("--head belongs to one ledger: give one ledger file with it")
    status = 0
    for _, path in ledgers:
        result = verify(path, head=getattr(args, "head", None))
        if result.ok:
            print(f"{path}: {result.message}")
            if result.warning:
                print(f"pfl: warning: {path}: {result.warning}", file=sys.stderr)
        else:
            print(f"{path}: NOT intact: {result.message}")
            status = 1
    return status


def add_audit_commands(subparsers) -> None:
    """Register ``audit show | summary | verify | report`` on the ``pfl`` command's
    subparsers."""
    audit = subparsers.add_parser(
        "audit", help="read, summarize and verify a device's audit ledger",
        description="Every payload a device sends is recorded in its hash-chained ledger.")
    commands = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)

    show = commands.add_parser("show", help="list the ledger's entries",
                               description=cmd_audit_show.__doc__)
    show.add_argument("ledger", metavar="LEDGER", nargs="+",
                     help="one or more ledger files, run folders or folders of collected ledgers")
    show.add_argument("--last", type=int, default=None, metavar="N", help="only the last N")
    show.add_argument("--run", default=None, metavar="RUN_ID",
                      help="only this Flower run's entries (pfl audit summary lists the runs)")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_audit_show)

    summ = commands.add_parser("summary", help="totals per channel and message type",
                               description=cmd_audit_summary.__doc__)
    summ.add_argument("ledger", metavar="LEDGER", nargs="+",
                     help="one or more ledger files, run folders or folders of collected ledgers")
    summ.add_argument("--run", default=None, metavar="RUN_ID",
                      help="only this Flower run's entries")
    summ.add_argument("--json", action="store_true", help="print JSON")
    summ.set_defaults(func=cmd_audit_summary)

    ver = commands.add_parser("verify", help="check the hash chain (exit 1 when broken)",
                              description=cmd_audit_verify.__doc__)
    ver.add_argument("ledger", metavar="LEDGER", nargs="+",
                     help="one or more ledger files, run folders or folders of collected ledgers")
    ver.add_argument("--head", default=None, metavar="HASH",
                     help="a head hash noted earlier (from `audit summary`); it must still be "
                          "in the chain, which catches entries removed from the end")
    ver.set_defaults(func=cmd_audit_verify)

    rep = commands.add_parser("report", help="one self-contained HTML page: what left, to "
                              "whom, when, under which rule; verification; DP and SecAgg",
                              description=cmd_audit_report.__doc__)
    rep.add_argument("target", metavar="RUN_DIR_OR_LEDGER",
                     help="a ledger file, or a run folder (every device's ledger)")
    rep.add_argument("--run", default=None, metavar="RUN_ID",
                     help="only this Flower run's entries")
    rep.add_argument("--out", default=None, help="the HTML file (default: LEDGER.html, or "
                     "RUN_DIR/audit-report.html)")
    rep.add_argument("--max-rows", type=int, default=2000,
                     help="entries listed (the totals cover all; default %(default)s)")
    rep.set_defaults(func=cmd_audit_report)
