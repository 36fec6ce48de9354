"""The device's audit ledger: hash chain, tamper detection, concurrency, Flower mod, gRPC
interceptor and the ``pfl audit`` commands. Fast: no model is loaded."""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing

import grpc
import numpy as np
import pytest
import torch

from edge_client.audit import (GENESIS_HASH, AuditClientInterceptor, AuditLedger,
                               add_audit_commands, audit_mod, canonical_json, describe_array,
                               entry_hash, note_consent_rule, read_entries, summary, verify)
from shared.errors import PflError


def raw_sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def fill(path, n: int = 4) -> AuditLedger:
    ledger = AuditLedger(path)
    for i in range(n):
        ledger.append("flower", "superlink", "train" if i % 2 == 0 else "evaluate",
                      {"w": np.full((2, 3), i, dtype=np.float32)}, "upload.stage1_lora",
                      {"num_examples": 10 + i})
    return ledger


def lines(path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


# ------------------------------------------------------------------------- the ledger
def test_append_and_verify_round_trip(tmp_path):
    path = tmp_path / "sub" / "ledger.jsonl"
    ledger = AuditLedger(path)
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    first = ledger.append("flower", "superlink run 1", "train",
                          {"lora/A": w, "blob": b"abc", "t": torch.ones(4, dtype=torch.bfloat16)},
                          "upload.stage1_lora",
                          {"num_examples": 12, "note": "private words", "loss": float("nan")})
    assert first["seq"] == 1 and first["prev_hash"] == GENESIS_HASH
    assert first["hash"] == entry_hash(first) and first["time"].endswith("Z")
    a, blob, t = first["arrays"]
    assert (a["name"], a["shape"], a["dtype"], a["bytes"]) == ("lora/A", [2, 3], "float32", 24)
    assert a["sha256"] == raw_sha(w)
    assert blob == {"name": "blob", "shape": [3], "dtype": "bytes", "bytes": 3,
                    "sha256": hashlib.sha256(b"abc").hexdigest()}
    assert (t["dtype"], t["bytes"]) == ("bfloat16", 8)
    assert first["payload_bytes"] == 24 + 3 + 8
    # text is summarized, never copied
    assert first["fields"]["note"] == {"type": "str", "chars": 13}
    assert first["fields"]["num_examples"] == 12 and first["fields"]["loss"] == "nan"
    assert "private" not in path.read_text()

    second = ledger.append("pool-grpc", "pool:50051", "/pfl.Pool/Submit", None, None)
    assert second["seq"] == 2 and second["prev_hash"] == first["hash"]
    assert [e["seq"] for e in ledger.entries()] == [1, 2]
    result = verify(path)
    assert result.ok and result.count == 2 and result.error_line is None
    assert result.head == second["hash"]
    assert verify(path, head=first["hash"][:12]).ok  # an older head is still in the chain


def test_verify_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert verify(empty).ok and verify(empty).count == 0
    with pytest.raises(PflError, match="no audit ledger"):
        verify(tmp_path / "missing.jsonl")


def test_verify_detects_edited_entry(tmp_path):
    path = tmp_path / "l.jsonl"
    fill(path)
    rows = lines(path)
    entry = json.loads(rows[1])
    entry["arrays"][0]["shape"] = [1, 1]
    rows[1] = json.dumps(entry) + "\n"
    path.write_text("".join(rows))
    result = verify(path)
    assert not result.ok and result.error_line == 2 and "edited" in result.message


def test_verify_detects_edited_and_rehashed_entry(tmp_path):
    path = tmp_path / "l.jsonl"
    fill(path)
    rows = lines(path)
    entry = json.loads(rows[1])
    entry["consent_rule"] = "upload.perpcs_pieces"
    entry["hash"] = entry_hash(entry)
    rows[1] = canonical_json(entry).decode() + "\n"  # a careful forger writes canonical form
    path.write_text("".join(rows))
    result = verify(path)
    assert not result.ok and result.error_line == 3 and "prev_hash" in result.message


def test_verify_detects_removed_entry(tmp_path):
    path = tmp_path / "l.jsonl"
    fill(path)
    rows = lines(path)
    path.write_text("".join(rows[:1] + rows[2:]))
    result = verify(path)
    assert not result.ok and result.error_line == 2 and "seq" in result.message


def test_verify_detects_reordered_pair(tmp_path):
    path = tmp_path / "l.jsonl"
    fill(path)
    rows = lines(path)
    rows[1], rows[2] = rows[2], rows[1]
    path.write_text("".join(rows))
    result = verify(path)
    assert not result.ok and result.error_line == 2


def test_verify_detects_inserted_forged_entry(tmp_path):
    path = tmp_path / "l.jsonl"
    fill(path)
    rows = lines(path)
    previous = json.loads(rows[1])
    forged = dict(previous, seq=3, prev_hash=previous["hash"], message_type="nothing")
    forged["hash"] = entry_hash(forged)
    path.write_text("".join(rows[:2] + [canonical_json(forged).decode() + "\n"] + rows[2:]))
    result = verify(path)
    assert not result.ok and result.error_line == 4  # the real 3rd entry no longer fits


def test_verify_detects_truncated_last_line_and_append_refuses(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger = fill(path)
    text = path.read_text()
    path.write_text(text[:-20])
    result = verify(path)
    assert not result.ok and result.error_line == 4 and "truncated" in result.message
    with pytest.raises(PflError, match="truncated"):
        ledger.append("flower", "superlink", "train", None, "upload.stage1_lora")


def test_verify_head_catches_entries_removed_from_the_end(tmp_path):
    path = tmp_path / "l.jsonl"
    fill(path)
    head = verify(path).head
    path.write_text("".join(lines(path)[:-1]))
    assert verify(path).ok  # a shorter chain alone is valid...
    result = verify(path, head=head)  # ...but the noted head is gone
    assert not result.ok and "head" in result.message


def _append_many(path: str, worker: int, n: int) -> None:
    ledger = AuditLedger(path)
    for i in range(n):
        ledger.append("flower", f"worker-{worker}", "train",
                      {"w": np.full(8, i, dtype=np.float32)}, "upload.stage1_lora")


def test_concurrent_appends_from_two_processes_keep_a_valid_chain(tmp_path):
    path = str(tmp_path / "l.jsonl")
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_append_many, args=(path, w, 25)) for w in range(2)]
    for proc in workers:
        proc.start()
    _append_many(path, 9, 10)  # and this process's threads-free appends at the same time
    for proc in workers:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    result = verify(path)
    assert result.ok, result.message
    assert result.count == 60


def test_concurrent_appends_from_threads(tmp_path):
    import threading

    ledger = AuditLedger(tmp_path / "l.jsonl")
    threads = [threading.Thread(target=lambda: [ledger.append("c", "d", "m", None, "r")
                                                for _ in range(15)]) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert verify(ledger.path).count == 45 and verify(ledger.path).ok


def test_summary_totals(tmp_path):
    path = tmp_path / "l.jsonl"
    fill(path, 3)  # 2 train + 1 evaluate, 24 bytes each
    AuditLedger(path).append("pool-grpc", "pool", "/pfl.Pool/Submit", None, None,
                             payload_bytes=100)
    info = summary(path)
    assert info["entries"] == 4 and info["bytes"] == 3 * 24 + 100 and info["intact"]
    flower = info["channels"]["flower"]
    assert flower["count"] == 3 and flower["bytes"] == 72
    assert flower["message_types"]["train"] == {"count": 2, "bytes": 48}
    assert flower["message_types"]["evaluate"] == {"count": 1, "bytes": 24}
    assert info["channels"]["pool-grpc"]["message_types"]["/pfl.Pool/Submit"]["bytes"] == 100
    assert info["consent_rules"] == {"upload.stage1_lora": 3, "(none recorded)": 1}
    entries = read_entries(path)
    assert info["first_time"] == entries[0]["time"] and info["last_time"] == entries[-1]["time"]
    assert info["head"] == entries[-1]["hash"]


def test_describe_array_accepts_described_dicts_and_rejects_others():
    info = describe_array("p", {"shape": (2, 2), "dtype": "float16", "bytes": 8, "sha256": "ab"})
    assert info == {"name": "p", "shape": [2, 2], "dtype": "float16", "bytes": 8, "sha256": "ab"}
    with pytest.raises(ValueError, match="sha256"):
        describe_array("p", {"shape": [1], "dtype": "f", "bytes": 1})
    with pytest.raises(TypeError):
        describe_array("p", object())


# ------------------------------------------------------------------------ Flower mod
def instruction(content, message_type: str):
    """An instruction as a SuperNode hands it to the ClientApp (metadata set by the server)."""
    import time

    from flwr.app import Message, Metadata

    metadata = Metadata(run_id=11, message_id="msg-1", src_node_id=1, dst_node_id=7,
                        reply_to_message_id="", group_id="3", created_at=time.time(),
                        ttl=3600.0, message_type=message_type)
    return Message(content, metadata=metadata)


def test_flower_mod_records_the_arrays_of_a_reply(tmp_path):
    from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord,
                          RecordDict)

    a = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    b = np.arange(5, dtype=np.float16)
    incoming = instruction(RecordDict({"config": ConfigRecord({"lr": 0.1})}), "train")
    context = Context(run_id=11, node_id=7, node_config={"ledger": str(tmp_path / "l.jsonl")},
                      state=RecordDict(), run_config={})

    def call_next(msg, ctx):
        note_consent_rule(ctx, "upload.stage1_lora")
        content = RecordDict({
            "lora": ArrayRecord({"A": Array(a), "B": Array(b)}),
            "metrics": MetricRecord({"num-examples": 12, "loss": 0.5}),
            "meta": ConfigRecord({"comment": "secret text"}),
        })
        return Message(content, reply_to=msg)

    mod = audit_mod(lambda ctx, msg: ctx.node_config["ledger"])
    reply = mod(incoming, context, call_next)
    assert reply.content["lora"]["A"].numpy().shape == (4, 3)  # the reply passes unchanged

    (entry,) = read_entries(tmp_path / "l.jsonl")
    assert entry["channel"] == "flower" and entry["message_type"] == "train"
    assert entry["consent_rule"] == "upload.stage1_lora"
    assert entry["destination"] == "superlink run 11 node 1"
    from flwr.common.serde import message_to_proto

    assert entry["meta"] == {"run_id": 11, "node_id": 7, "group_id": "3", "reply_to": "msg-1",
                             "inbound_bytes": message_to_proto(incoming).ByteSize()}
    arrays = {x["name"]: x for x in entry["arrays"]}
    assert set(arrays) == {"lora/A", "lora/B"}
    for name, value in (("lora/A", a), ("lora/B", b)):
        wire = reply.content["lora"][name.split("/")[1]].data
        assert arrays[name]["shape"] == list(value.shape)
        assert arrays[name]["dtype"] == str(value.dtype)
        assert arrays[name]["bytes"] == value.nbytes
        assert arrays[name]["sha256"] == raw_sha(value)
        assert arrays[name]["wire_bytes"] == len(wire)
        assert arrays[name]["wire_sha256"] == hashlib.sha256(wire).hexdigest()
    # the whole serialized reply: its arrays plus metrics, config and metadata
    assert entry["payload_bytes"] == message_to_proto(reply).ByteSize()
    assert entry["payload_bytes"] > sum(x["wire_bytes"] for x in entry["arrays"])
    assert entry["fields"]["metrics/metrics"] == {"num-examples": 12, "loss": 0.5}
    assert entry["fields"]["config/meta"] == {"comment": {"type": "str", "chars": 11}}
    assert "secret" not in (tmp_path / "l.jsonl").read_text()
    assert "pfl.audit" not in context.state  # the noted rule is consumed
    assert verify(tmp_path / "l.jsonl").ok


def test_flower_mod_sends_only_a_code_when_no_ledger_path(tmp_path):
    from flwr.app import Context, Message, MetricRecord, RecordDict

    from shared.errors import NOT_CONFIGURED, device_error_reason

    incoming = instruction(RecordDict(), "query")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = audit_mod(lambda ctx, msg: None)(
        incoming, context,
        lambda m, c: Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=m))
    assert not reply.has_content() and reply.error.code == NOT_CONFIGURED
    assert reply.error.reason == device_error_reason(NOT_CONFIGURED)
    assert not list(tmp_path.iterdir())


def test_flower_mod_turns_a_crash_or_a_wordy_error_into_a_fixed_code(tmp_path):
    """What a handler raises, or an error text it writes, never leaves; the ledger shows the
    code that did."""
    from flwr.app import Context, Error, Message, RecordDict

    from shared.errors import FAILED, device_error_reason

    secret = "MY PRIVATE DIAGNOSIS: flu"
    ledger = tmp_path / "ledger.jsonl"
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    mod = audit_mod(lambda ctx, msg: ledger)

    def crash(m, c):
        raise ValueError(f"gold label {secret!r} is not in the label list")

    def wordy(m, c):
        return Message(Error(code=403, reason=f"refused: {secret}"), reply_to=m)

    replies = [mod(instruction(RecordDict(), "query"), context, handler)
               for handler in (crash, wordy)]
    assert [r.error.code for r in replies] == [FAILED, 403]
    assert [r.error.reason for r in replies] == [device_error_reason(FAILED),
                                                 device_error_reason(403)]
    assert secret not in ledger.read_text()
    assert [e["fields"]["error"]["code"] for e in read_entries(ledger)] == [FAILED, 403]


# ------------------------------------------------------------------- gRPC interceptor
def test_grpc_interceptor_records_request_before_sending(tmp_path):
    from concurrent import futures

    received = []

    def echo(request: bytes, context) -> bytes:
        received.append(request)
        return b"ok:" + request

    handler = grpc.method_handlers_generic_handler("pfl.Test", {
        "Submit": grpc.unary_unary_rpc_method_handler(
            echo, request_deserializer=None, response_serializer=None)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        ledger = AuditLedger(tmp_path / "l.jsonl")
        piece = np.ones((2, 4), dtype=np.float32)
        seen_at_record = []

        def describe(method, request):
            seen_at_record.append(len(received))  # nothing sent yet when recorded
            return {"arrays": {"piece/A": piece}, "consent_rule": "upload.perpcs_pieces",
                    "extra": {"layer": 3}}

        interceptor = AuditClientInterceptor(ledger, "pool-grpc", f"127.0.0.1:{port}", describe)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = grpc.intercept_channel(channel, interceptor).unary_unary("/pfl.Test/Submit")
            payload = b"\x01\x02piece-bytes"
            assert call(payload, timeout=10) == b"ok:" + payload
    finally:
        server.stop(None)
    assert seen_at_record == [0] and received == [payload]
    (entry,) = ledger.entries()
    assert entry["channel"] == "pool-grpc" and entry["message_type"] == "/pfl.Test/Submit"
    assert entry["payload_bytes"] == len(payload) == entry["meta"]["request_bytes"]
    assert entry["meta"]["request_sha256"] == hashlib.sha256(payload).hexdigest()
    assert entry["arrays"][0]["sha256"] == raw_sha(piece)
    assert entry["consent_rule"] == "upload.perpcs_pieces" and entry["fields"] == {"layer": 3}


def test_grpc_interceptor_denial_sends_nothing(tmp_path):
    ledger = AuditLedger(tmp_path / "l.jsonl")

    def deny(method, request):
        raise PflError("consent denied")

    interceptor = AuditClientInterceptor(ledger, "pool-grpc", "pool", deny)
    sent = []
    with pytest.raises(PflError):
        interceptor.intercept_unary_unary(lambda details, req: sent.append(req),
                                          argparse.Namespace(method="/x/Y"), b"data")
    assert sent == [] and not ledger.path.exists()


# ------------------------------------------------------------------------------- CLI
@pytest.fixture()
def parser():
    root = argparse.ArgumentParser(prog="pfl")
    add_audit_commands(root.add_subparsers(dest="command", required=True))
    return root


def run_cli(parser, argv):
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_show_summary_verify(tmp_path, parser, capsys):
    path = tmp_path / "l.jsonl"
    fill(path, 3)
    assert run_cli(parser, ["audit", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "consent rule" in out and out.count("upload.stage1_lora") == 3
    assert run_cli(parser, ["audit", "show", str(path), "--last", "1", "--json"]) == 0
    assert [e["seq"] for e in json.loads(capsys.readouterr().out)] == [3]
    assert run_cli(parser, ["audit", "summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert "intact" in out and "total" in out
    assert run_cli(parser, ["audit", "summary", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 3
    assert run_cli(parser, ["audit", "verify", str(path)]) == 0
    assert "intact" in capsys.readouterr().out

    rows = lines(path)
    path.write_text(rows[0] + rows[2])
    assert run_cli(parser, ["audit", "verify", str(path)]) == 1
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and "line 2" in out
    with pytest.raises(PflError, match="no audit ledger"):
        run_cli(parser, ["audit", "verify", str(tmp_path / "missing.jsonl")])
