"""The audit ledger itself: its format (see :mod:`edge_client.audit`), appends and readers."""
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
from typing import Any, Iterator, Mapping

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


# ---------------------------------------------------------------------------- phases
#: The federation phase of a Flower reply, by its message type.
PHASES = {"query.select": "selection", "train": "stage 1", "train.share": "share",
          "train.personalize": "personalize", "evaluate": "evaluate"}
PHASE_ORDER = ("selection", "stage 1 (lora)", "stage 1 (perfit)", "stage 1 (SecAgg+ keys)",
               "share", "personalize", "evaluate")


def flower_phase(entry: Mapping[str, Any]) -> str:
    """The phase of a Flower reply entry; stage 1 split by what was trained (the task LoRA,
    or PerFit's stage 1: by its arrays' names, or under secure aggregation, where the arrays
    left masked, by the consent rule of the upload); SecAgg+'s keys and shares apart."""
    phase = PHASES.get(entry["message_type"], entry["message_type"])
    if phase == "stage 1":
        meta = entry.get("meta") if isinstance(entry.get("meta"), Mapping) else {}
        if meta.get("secagg") is True:
            rule = str(entry.get("consent_rule") or "")
            if rule == "upload.perfit_stage1":
                return "stage 1 (perfit)"
            return "stage 1 (lora)" if rule == "upload.stage1_lora" else \
                "stage 1 (SecAgg+ keys)"
        names = " ".join(a["name"] for a in entry.get("arrays", []))
        phase = "stage 1 (perfit)" if "stage1.layers" in names else "stage 1 (lora)"
    return phase


def entry_phases(entries: list[Mapping[str, Any]]) -> list[str | None]:
    """Each entry's federation phase. A Flower reply has its own; another channel's entry (a
    pool call) belongs to the phase of the next Flower reply in the ledger, since the device
    made it while handling that message and the reply is written when the handler returns.
    None for entries after the last reply (outside a federation phase: a remote answer,
    say)."""
    out: list[str | None] = [None] * len(entries)
    current = None
    for i in range(len(entries) - 1, -1, -1):
        if entries[i].get("channel") == "flower":
            current = flower_phase(entries[i])
        out[i] = current
    return out


# --------------------------------------------------------------------------- summary
def entry_run(entry: Mapping[str, Any]) -> str | None:
    """The Flower run an entry belongs to (its ``meta.run_id``, as text), None if unknown."""
    meta = entry.get("meta")
    run = meta.get("run_id") if isinstance(meta, Mapping) else None
    return None if run is None or isinstance(run, bool) else str(run)


def is_refusal(entry: Mapping[str, Any]) -> bool:
    """Whether ``entry`` notes that an earlier request was refused by its receiver."""
    meta = entry.get("meta")
    return isinstance(meta, Mapping) and meta.get("outcome") == "refused"


def summary(path: str | os.PathLike, run: str | None = None) -> dict:
    """Totals of a ledger (with ``run``, of that Flower run's entries only): entries and
    payload bytes overall, per channel and per message type, per consent rule; the runs it
    holds; requests refused by their receiver; first and last time; the head hash and the
    verification result (of the whole chain). Lines that do not parse are skipped here
    (``intact`` is then False)."""
    result = verify(path)
    total = {"count": 0, "bytes": 0}
    channels: dict[str, dict] = {}
    rules: dict[str, int] = {}
    runs: dict[str, int] = {}
    refused = 0
    first = last = None
    for _, raw in _lines(path):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        runs[entry_run(entry) or "-"] = runs.get(entry_run(entry) or "-", 0) + 1
        if run is not None and entry_run(entry) != str(run):
            continue
        if is_refusal(entry):
            refused += 1
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
            "consent_rules": rules, "runs": runs, "run": run, "refused": refused,
            "head": result.head if result.ok else None,
            "intact": result.ok, "problem": None if result.ok else result.message}


