"""The device's audit ledger: every outbound payload, append-only and hash-chained.

One JSON object per line (JSONL), written in canonical form (sorted keys, no spaces)::

    {"seq": 1, "time": "2025-01-01T12:00:00.000Z", "channel": "flower",
     "destination": "superlink run 7", "message_type": "train",
     "arrays": [{"name": "lora/w", "shape": [8, 576], "dtype": "float32", "bytes": 18432,
                 "sha256": "..."}],
     "payload_bytes": 18560, "fields": {"metrics": {...}}, "meta": {"group_id": "3"},
     "consent_rule": "upload.stage1_lora", "prev_hash": "000...0", "hash": "..."}

``hash`` is the sha256 of the canonical JSON of the entry without ``hash`` (so it covers
``prev_hash``); ``prev_hash`` is the previous entry's hash, 64 zeros for the first entry;
``seq`` counts from 1 and equals the line number. :func:`verify` therefore finds an edited,
removed, inserted or reordered entry and a truncated last line. Removing whole entries from
the *end* leaves a valid shorter chain: note the head hash (``pfl audit summary``) and pass it
to ``pfl audit verify --head`` later to detect that too.

Array sha256s are over the array's raw elements in row-major order (what the tensor holds),
so a person can check them against a local tensor; Flower arrays also get the size and sha256
of their serialized wire bytes. Text is never copied into the ledger: other fields are
summarized as keys, types and sizes (numbers and booleans are kept as values).

Writers: :class:`AuditLedger` (thread- and process-safe appends), :func:`audit_mod` (a Flower
ClientApp mod), :class:`AuditClientInterceptor` (a gRPC client interceptor). Readers:
:func:`read_entries`, :func:`verify`, :func:`summary` and the ``pfl audit`` commands
(:func:`add_audit_commands`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import grpc
import numpy as np

from shared.errors import PflError

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
_REQUIRED = ("seq", "time", "channel", "destination", "message_type", "arrays",
             "consent_rule", "prev_hash", "hash")
_ARRAY_KEYS = ("shape", "dtype", "bytes", "sha256")
_MAX_DEPTH = 4


# --------------------------------------------------------------------------- encoding
def canonical_json(obj: Any) -> bytes:
    """The canonical UTF-8 JSON of ``obj``: sorted keys, no spaces, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """Hex sha256 over the canonical JSON of ``entry`` without its ``hash`` key."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ------------------------------------------------------------------------- describing
def _numpy_info(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":  # hash little-endian bytes on any machine
        array = array.astype(array.dtype.newbyteorder("<"))
    return {"shape": list(array.shape), "dtype": str(array.dtype), "bytes": int(array.nbytes),
            "sha256": hashlib.sha256(array.tobytes()).hexdigest()}


def _torch_info(tensor) -> dict:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(_torch().uint8).numpy().tobytes()  # raw bytes, bf16 included
    if sys.byteorder != "little" and tensor.element_size() > 1:  # pragma: no cover
        data = flat.numpy().byteswap().tobytes()
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _torch():
    import torch  # imported only when a tensor is described

    return torch


def _is_flower_array(value: Any) -> bool:
    return all(hasattr(value, a) for a in ("dtype", "shape", "stype", "data")) and \
        isinstance(getattr(value, "data"), (bytes, bytearray))


def describe_array(name: str, value: Any) -> dict:
    """``{name, shape, dtype, bytes, sha256}`` of one outbound array.

    ``value`` may be a numpy array, a torch tensor, raw bytes (dtype ``"bytes"``), a Flower
    ``Array`` (adds ``wire_bytes`` and ``wire_sha256`` of its serialized data), or an already
    described dict with at least shape, dtype, bytes and sha256 (e.g. from a protobuf piece).
    """
    if isinstance(value, np.ndarray):
        info = _numpy_info(value)
    elif type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        info = _torch_info(value)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        info = {"shape": [len(data)], "dtype": "bytes", "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest()}
    elif _is_flower_array(value):
        data = bytes(value.data)
        if value.stype == "numpy.ndarray":
            info = _numpy_info(value.numpy())
        else:
            info = {"shape": list(value.shape), "dtype": str(value.dtype), "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest()}
        info.update(wire_bytes=len(data), wire_sha256=hashlib.sha256(data).hexdigest())
    elif isinstance(value, Mapping):
        missing = [k for k in _ARRAY_KEYS if k not in value]
        if missing:
            raise ValueError(f"array {name!r}: a described array needs {', '.join(missing)}")
        info = {k: v for k, v in value.items() if k != "name"}
        info["shape"] = [int(d) for d in info["shape"]]
    else:
        raise TypeError(f"array {name!r}: cannot describe a {type(value).__name__}")
    return {"name": str(name), **info}


def describe_arrays(arrays: Mapping[str, Any] | None) -> list[dict]:
    """:func:`describe_array` for each item of ``arrays``, in the mapping's order."""
    return [describe_array(name, value) for name, value in (arrays or {}).items()]


def summarize_value(value: Any, depth: int = 0) -> Any:
    """A ledger-safe summary of a non-array field: numbers and booleans as they are, text
    and bytes as their sizes, containers as their keys / lengths (never raw text)."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return {"type": "str", "chars": len(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return {"type": "bytes", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if isinstance(value, np.generic):
        return summarize_value(value.item(), depth)
    if isinstance(value, Mapping):
        if depth >= _MAX_DEPTH:
            return {"type": "dict", "keys": len(value)}
        return {str(k): summarize_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in value})
        out = {"type": "list", "len": len(value), "of": kinds}
        if all(isinstance(v, (bool, int, float)) for v in value) and len(value) <= 16:
            out["values"] = [summarize_value(v) for v in value]
        elif any(isinstance(v, (str, bytes)) for v in value):
            out["bytes"] = sum(len(v) for v in value if isinstance(v, (str, bytes)))
        return out
    return {"type": type(value).__name__}


# ----------------------------------------------------------------------------- ledger
def _last_line(fd: int) -> bytes | None:
    """The last line of the open ledger (without its newline); None when empty."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    if os.pread(fd, 1, size - 1) != b"\n":
        raise PflError("the audit ledger's last line is truncated (a write was cut off; "
                       "`pfl audit verify` shows it): nothing more is sent until it is repaired")
    end, chunk, tail = size - 1, 4096, b""
    while end > 0:
        start = max(0, end - chunk)
        tail = os.pread(fd, end - start, start) + tail
        end = start
        if b"\n" in tail:
            break
    return tail.rsplit(b"\n", 1)[-1]


class AuditLedger:
    """An append-only, hash-chained JSONL ledger of one device's outbound payloads.

    Appends are serialized by a thread lock and an exclusive ``fcntl.flock`` on the file
    (so several processes may share one ledger), written with ``O_APPEND`` in one write and
    fsynced before :meth:`append` returns.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, channel: str, destination: str, message_type: str,
               arrays: Mapping[str, Any] | None = None, consent_rule: str | None = None,
               extra: Mapping[str, Any] | None = None, *, payload_bytes: int | None = None,
               meta: Mapping[str, str | int | float | bool | None] | None = None) -> dict:
        """Record one outbound payload and return the written entry.

        ``arrays`` are described (shape, dtype, bytes, sha256), ``extra`` is summarized
        (:func:`summarize_value`), ``meta`` holds identifiers kept verbatim (ids, rounds:
        never user text). ``payload_bytes`` defaults to the arrays' (wire) bytes.
        ``consent_rule`` is the consent rule that allowed the upload (None: not recorded).
        """
        described = describe_arrays(arrays)
        if payload_bytes is None:
            payload_bytes = sum(a.get("wire_bytes", a["bytes"]) for a in described)
        body = {"channel": str(channel), "destination": str(destination),
                "message_type": str(message_type), "arrays": described,
                "payload_bytes": int(payload_bytes), "consent_rule": consent_rule,
                "fields": summarize_value(dict(extra or {}))}
        if meta:
            for key, value in meta.items():
                if not (value is None or isinstance(value, (str, int, float, bool))):
                    raise TypeError(f"meta {key!r}: identifiers only, not {type(value).__name__}")
            body["meta"] = {str(k): v for k, v in meta.items()}
        canonical_json(body)  # fail before taking the lock if something cannot be encoded
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                last = _last_line(fd)
                if last is None:
                    seq, prev = 1, GENESIS_HASH
                else:
                    try:
                        previous = json.loads(last)
                        seq, prev = int(previous["seq"]) + 1, str(previous["hash"])
                    except (ValueError, KeyError, TypeError):
                        raise PflError(f"audit ledger {self.path} has a damaged last line: "
                                       "run `pfl audit verify` before anything else is sent")
                entry = {"seq": seq, "time": _utc_now(), **body, "prev_hash": prev}
                entry["hash"] = entry_hash(entry)
                line = canonical_json(entry) + b"\n"
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)  # also releases the flock
        return entry

    def entries(self) -> list[dict]:
        """All entries, oldest first (see :func:`read_entries`)."""
        return read_entries(self.path)

    def verify(self, head: str | None = None) -> "VerifyResult":
        """:func:`verify` on this ledger."""
        return verify(self.path, head=head)

    def __repr__(self) -> str:
        return f"AuditLedger({str(self.path)!r})"


def _open_ledger(path: str | os.PathLike):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise PflError(f"no audit ledger at {path}")
    except IsADirectoryError:
        raise PflError(f"{path} is a directory, not an audit ledger")


def _lines(path) -> Iterator[tuple[int, bytes]]:
    with _open_ledger(path) as handle:
        yield from enumerate(handle, 1)


def read_entries(path: str | os.PathLike) -> list[dict]:
    """Parse every line of a ledger (no chain check); PflError names a line that is not an
    entry."""
    out = []
    for lineno, raw in _lines(path):
        try:
            entry = json.loads(raw)
        except ValueError:
            raise PflError(f"{path}: line {lineno} is not valid JSON")
        if not isinstance(entry, dict):
            raise PflError(f"{path}: line {lineno} is not a ledger entry")
        out.append(entry)
    return out


# ---------------------------------------------------------------------------- verify
@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify`: ``count`` entries checked, ``error_line`` the first
    bad line (1-based; None when intact), ``message`` one line, ``head`` the last hash."""

    ok: bool
    count: int
    error_line: int | None
    message: str
    head: str = GENESIS_HASH
    warning: str | None = None


def verify(path: str | os.PathLike, head: str | None = None) -> VerifyResult:
    """Check every line: complete, valid JSON, the required keys, ``seq`` equal to the line
    number, ``prev_hash`` equal to the previous hash and ``hash`` equal to the recomputed one.

    ``head`` (a hash, or a prefix of at least 8 hex digits, noted earlier) must be the hash
    of some entry: this catches entries removed from the end.
    """
    prev, count = GENESIS_HASH, 0
    seen_head = head is None
    head = (head or "").strip().lower()
    if head and len(head) < 8:
        raise PflError("--head needs at least 8 hex digits of a hash")

    def bad(line: int, why: str) -> VerifyResult:
        return VerifyResult(False, count, line, f"line {line}: {why}", prev)

    for lineno, raw in _lines(path):
        if not raw.endswith(b"\n"):
            return bad(lineno, "truncated entry (no newline at the end of the file)")
        try:
            entry = json.loads(raw)
        except ValueError:
            return bad(lineno, "not valid JSON")
        if not isinstance(entry, dict):
            return bad(lineno, "not a ledger entry (not a JSON object)")
        missing = [k for k in _REQUIRED if k not in entry]
        if missing:
            return bad(lineno, f"missing {', '.join(missing)}")
        if entry["seq"] != lineno:
            return bad(lineno, f"seq {entry['seq']!r} where {lineno} was expected "
                               "(an entry was removed, inserted or reordered)")
        if entry["prev_hash"] != prev:
            return bad(lineno, "prev_hash does not match the previous entry's hash "
                               "(the chain is broken here)")
        try:
            recomputed = entry_hash(entry)
        except ValueError:
            return bad(lineno, "entry cannot be encoded canonically")
        if entry["hash"] != recomputed:
            return bad(lineno, "hash does not match the entry's content (the entry was edited)")
        if raw != canonical_json(entry) + b"\n":  # the bytes written, not just their meaning
            return bad(lineno, "not in the canonical form the ledger writes (the line was "
                               "re-serialized or edited)")
        prev, count = entry["hash"], count + 1
        seen_head = seen_head or prev.startswith(head)
    if not seen_head:
        return VerifyResult(False, count, count + 1,
                            f"line {count + 1}: the noted head {head[:16]} is not in the ledger "
                            "(entries were removed from the end, or this is another ledger)",
                            prev)
    if count == 0:
        return VerifyResult(True, 0, None, "empty: no entries", prev,
                            warning="the ledger is empty: nothing was ever sent, or it was "
                                    "emptied (compare with a head hash noted earlier)")
    return VerifyResult(True, count, None, f"intact: {count} entries, head {prev}", prev)


# --------------------------------------------------------------------------- summary
def summary(path: str | os.PathLike) -> dict:
    """Totals of a ledger: entries and payload bytes overall, per channel and per message
    type, per consent rule; first and last time; the head hash and the verification result.
    Lines that do not parse are skipped here (``intact`` is then False)."""
    result = verify(path)
    total = {"count": 0, "bytes": 0}
    channels: dict[str, dict] = {}
    rules: dict[str, int] = {}
    first = last = None
    for _, raw in _lines(path):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        size = int(entry.get("payload_bytes", 0) or 0)
        channel = channels.setdefault(str(entry.get("channel")),
                                      {"count": 0, "bytes": 0, "message_types": {}})
        kind = channel["message_types"].setdefault(str(entry.get("message_type")),
                                                   {"count": 0, "bytes": 0})
        for bucket in (total, channel, kind):
            bucket["count"] += 1
            bucket["bytes"] += size
        rule = entry.get("consent_rule") or "(none recorded)"
        rules[rule] = rules.get(rule, 0) + 1
        first = first or entry.get("time")
        last = entry.get("time", last)
    return {"path": str(path), "entries": total["count"], "bytes": total["bytes"],
            "first_time": first, "last_time": last, "channels": channels,
            "consent_rules": rules, "head": result.head if result.ok else None,
            "intact": result.ok, "problem": None if result.ok else result.message}


# ------------------------------------------------------------------------ Flower mod
_STATE_KEY = "pfl.audit"


def note_consent_rule(context, rule: str) -> None:
    """Tell :func:`audit_mod` which consent rule allowed the reply a handler is building
    (kept in ``context.state``, which never leaves the device)."""
    from flwr.app import ConfigRecord

    context.state[_STATE_KEY] = ConfigRecord({"consent_rule": str(rule)})


def _take_consent_rule(reply, context) -> str | None:
    """The rule noted with :func:`note_consent_rule`, consumed so it is not reused."""
    record = context.state.config_records.get(_STATE_KEY) if context.state else None
    if record is None:
        return None
    rule = record.get("consent_rule")
    del context.state[_STATE_KEY]
    return str(rule) if rule else None


def describe_record_dict(content) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arrays, fields) of a Flower RecordDict: every Array as ``record/key`` (to describe),
    every MetricRecord as ``fields["metrics/<record>"]`` and every ConfigRecord as
    ``fields["config/<record>"]`` (mappings of its keys to values, summarized on append)."""
    arrays: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    for name, record in content.array_records.items():
        for key, array in record.items():
            arrays[f"{name}/{key}"] = array
    for kind, records in (("metrics", content.metric_records),
                          ("config", content.config_records)):
        for name, record in records.items():
            fields[f"{kind}/{name}"] = {str(k): v for k, v in record.items()}
    return arrays, fields


def message_bytes(msg) -> int:
    """Size of a Flower message as serialized for the wire (content, metadata, error)."""
    from flwr.common.serde import message_to_proto

    return int(message_to_proto(msg).ByteSize())


def audit_mod(ledger_path_fn: Callable[[Any, Any], str | os.PathLike | None], *,
              channel: str = "flower",
              consent_rule_fn: Callable[[Any, Any], str | None] | None = None):
    """A Flower ClientApp mod that records every reply the device sends.

    ``ledger_path_fn(context, incoming message)`` gives the ledger path for this node (e.g.
    from ``context.node_config``); None skips auditing for that node. ``consent_rule_fn(reply,
    context)`` gives the consent rule; by default the one a handler noted with
    :func:`note_consent_rule`. Use: ``ClientApp(mods=[audit_mod(fn), ...])``: put it first
    (outermost), so that it records the reply after any other mod (e.g. SecAgg+ masking)
    changed it, i.e. what actually leaves the device.
    """
    rule_of = consent_rule_fn or _take_consent_rule

    def mod(msg, context, call_next):
        from flwr.app import Error, Message

        from shared.errors import FAILED, NOT_CONFIGURED, device_error_reason

        def error(code):
            return Message(Error(code=code, reason=device_error_reason(code)), reply_to=msg)

        try:
            reply = call_next(msg, context)
        except Exception:  # never let Flower send a traceback: a code, and the ledger sees it
            log.exception("the ClientApp raised on %s", msg.metadata.message_type)
            reply = error(FAILED)
        path = ledger_path_fn(context, msg)
        if path is None:  # nothing unaudited leaves: a bare code at most
            log.warning("no audit ledger configured: replying with an error code only")
            return error(NOT_CONFIGURED)
        ledger = AuditLedger(path)  # nothing kept per device: a population stays flat
        if not reply.has_content() and reply.error.reason != device_error_reason(
                reply.error.code):
            reply = error(reply.error.code)  # only the fixed text of a code leaves
        meta = reply.metadata
        if reply.has_content():
            arrays, fields = describe_record_dict(reply.content)
        else:
            arrays = {}
            fields = {"error": {"code": reply.error.code, "reason": reply.error.reason or ""}}
        # payload_bytes: the whole serialized reply (arrays, metrics, metadata);
        # inbound_bytes: the message it answers (what came down), for traffic accounting.
        try:
            ledger.append(channel, f"superlink run {meta.run_id} node {meta.dst_node_id}",
                          meta.message_type, arrays, rule_of(reply, context), fields,
                          payload_bytes=message_bytes(reply),
                          meta={"run_id": meta.run_id, "node_id": context.node_id,
                                "group_id": meta.group_id,
                                "reply_to": meta.reply_to_message_id,
                                "inbound_bytes": message_bytes(msg)})
        except Exception:  # a ledger that cannot be written: send nothing it would not show
            log.exception("the audit ledger %s cannot be written", path)
            return error(FAILED)
        return reply

    return mod


# -------------------------------------------------------------------- gRPC interceptor
def _serialized(request: Any) -> bytes:
    if isinstance(request, (bytes, bytearray, memoryview)):
        return bytes(request)
    if hasattr(request, "SerializeToString"):
        return request.SerializeToString()
    raise TypeError(f"cannot serialize a {type(request).__name__} request for the audit")


class AuditClientInterceptor(grpc.UnaryUnaryClientInterceptor,
                             grpc.UnaryStreamClientInterceptor):
    """A gRPC client interceptor recording each outbound request before it is sent.

    Every entry has the request's serialized size (``payload_bytes``) and sha256 (in
    ``meta``), and the method as ``message_type``. ``describe_request_fn(method, request)``
    may return a dict with ``arrays`` (a mapping for :func:`describe_arrays`),
    ``consent_rule`` and ``extra`` (fields to summarize); it may also raise (e.g. a consent
    denial), and then nothing is recorded and nothing is sent. Use:
    ``grpc.intercept_channel(channel, AuditClientInterceptor(ledger, "pool-grpc", target))``.
    """

    def __init__(self, ledger: AuditLedger | str | os.PathLike, channel_name: str,
                 destination: str,
                 describe_request_fn: Callable[[str, Any], Mapping | None] | None = None):
        self.ledger = ledger if isinstance(ledger, AuditLedger) else AuditLedger(ledger)
        self.channel_name = channel_name
        self.destination = destination
        self.describe_request_fn = describe_request_fn

    def record(self, method: str | bytes, request: Any) -> dict:
        """Append the ledger entry for one request; return it."""
        method = method.decode() if isinstance(method, bytes) else str(method)
        data = _serialized(request)
        described = dict(self.describe_request_fn(method, request) or {}) \
            if self.describe_request_fn else {}
        return self.ledger.append(
            self.channel_name, self.destination, method, described.get("arrays"),
            described.get("consent_rule"), described.get("extra"), payload_bytes=len(data),
            meta={"request_bytes": len(data),
                  "request_sha256": hashlib.sha256(data).hexdigest()})

    def intercept_unary_unary(self, continuation, client_call_details, request):
        """Record, then send."""
        self.record(client_call_details.method, request)
        return continuation(client_call_details, request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        """Record, then send (server-streaming calls have one outbound request)."""
        self.record(client_call_details.method, request)
        return continuation(client_call_details, request)


# ------------------------------------------------------------------------------- CLI
def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


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
             str(len(e.get("arrays") or [])), _human_bytes(int(e.get("payload_bytes", 0) or 0)),
             str(e.get("consent_rule") or "-"), str(e.get("hash", ""))[:12]] for e in entries]
    return _table(["seq", "time (UTC)", "channel", "destination", "message", "arrays", "bytes",
                   "consent rule", "hash"], rows, right={0, 5, 6})


def format_summary(info: dict) -> str:
    """A readable rendering of :func:`summary`."""
    rows = []
    for channel, c in sorted(info["channels"].items()):
        for kind, k in sorted(c["message_types"].items()):
            rows.append([channel, kind, str(k["count"]), _human_bytes(k["bytes"])])
    rows.append(["total", "", str(info["entries"]), _human_bytes(info["bytes"])])
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
    """Register ``audit show | summary | verify`` on the ``pfl`` command's subparsers."""
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
