"""A run's outputs are usable by the next command: `pfl serve --run RUN_DIR` loads what the
run trained; `pfl audit` reads several ledgers or a folder of them and one run's entries; a
submission the pool refused is marked refused; a ledger's strings cannot hide rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cloud_server.inference_service import load_collectives
from cloud_server.pool_cli import serve_inputs
from cloud_server.pool_service import start_pool_server
from edge_client.audit import AuditClientInterceptor, AuditLedger, read_entries
from edge_client.audit.cli import format_entries
from edge_client.pool_client import PoolClient, PoolError
from shared import crypto
from shared.config import settings_keys
from shared.errors import PflError
from shared.methods.perpcs.pieces import Piece
from simulations import cli
from simulations.simulate import run_federation_simulation

FAST = {"max-steps": 2, **settings_keys({"max_history": 6, "personal_epochs": 1,
                                         "perfit": {"epochs": 1}})}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    run_federation_simulation(4, methods="nonpersonalized,oppu,perfit", targets=1, sharers=0,
                              run_dir=run_dir, options=FAST)
    return run_dir


def test_serve_loads_stage1_and_perfit_from_a_run_folder(run_dir, tiny):
    model, arrays = serve_inputs(str(run_dir), None, None)
    assert model == "tiny" and arrays == str(run_dir / "global_arrays.npz")
    stage1, perfit, _ = load_collectives(tiny, arrays)
    assert stage1 and perfit is not None  # both collective parts, not "stage 1 off"
    with pytest.raises(PflError, match="trained tiny"):
        serve_inputs(str(run_dir), "smollm2-135m", None)


def test_serve_refuses_what_is_not_a_run_in_one_line(run_dir, tmp_path, capsys):
    for args, expected in (
            (["--run", str(tmp_path / "nowhere")], "no run folder"),
            (["--run", str(tmp_path)], "no federation.json"),
            (["--arrays", str(tmp_path / "missing.npz")], "no arrays file"),
            # stage 1's own file has unprefixed keys: it used to serve "stage 1 off" silently
            (["--arrays", str(run_dir / "stage1-lora" / "global_arrays.npz"), "--model",
              "tiny"], "holds no stage-1 LoRA")):
        code = cli.main(["serve", "--certs", str(tmp_path), "--port", "0", *args])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and "Traceback" not in err, (args, err)


def _entry(ledger: AuditLedger, run: int, kind: str = "train", destination: str = "link"):
    ledger.append("flower", destination, kind, {"w": np.ones(3, np.float32)},
                  "upload.stage1_lora", meta={"run_id": run})


def test_audit_reads_several_ledgers_or_a_folder_and_one_run(tmp_path, capsys):
    collected = tmp_path / "collected"
    a, b = AuditLedger(collected / "phone.jsonl"), AuditLedger(collected / "laptop.jsonl")
    for run in (11, 11, 22):
        _entry(a, run)
    _entry(b, 22, "evaluate")
    assert cli.main(["audit", "summary", str(collected), "--run", "22", "--json"]) == 0
    infos = json.loads(capsys.readouterr().out)
    assert sorted((i["path"].rsplit("/", 1)[1], i["entries"]) for i in infos) == \
        [("laptop.jsonl", 1), ("phone.jsonl", 1)]
    assert {i["path"].rsplit("/", 1)[1]: i["runs"] for i in infos}["phone.jsonl"] == \
        {"11": 2, "22": 1}
    assert cli.main(["audit", "show", str(a.path), str(b.path), "--run", "11"]) == 0
    out = capsys.readouterr().out
    assert f"== phone.jsonl ({a.path})" in out and f"== laptop.jsonl ({b.path})" in out
    assert out.count("upload.stage1_lora") == 2  # run 11's two entries, none of run 22
    assert cli.main(["audit", "verify", str(collected)]) == 0
    assert capsys.readouterr().out.count("intact") == 2


def test_a_submission_the_pool_refused_is_marked_refused(tmp_path, capsys):
    certs = crypto.write_dev_certs(tmp_path / "certs").directory
    crypto.write_federation_key(certs)  # the pool takes pieces only with a grant
    ledger = AuditLedger(tmp_path / "ledger.jsonl")
    g = torch.Generator().manual_seed(0)
    piece = Piece("x", 1, "q_proj", torch.randn(2, 8, generator=g),
                  torch.randn(6, 2, generator=g) * 0.1, 0.5, torch.randn(8, generator=g))
    server = start_pool_server(tmp_path / "pool", certs, open_enrolment=False)
    try:
        audit = AuditClientInterceptor(ledger, "pool-grpc", server.target, meta={"run_id": 5})
        with PoolClient(server.target, certs, interceptors=[audit], timeout=20) as client:
            with pytest.raises(PoolError):
                client.submit([piece], crypto.generate_device_key(), {"pool": True})
    finally:
        server.stop(grace=0)
    request, refusal = read_entries(ledger.path)
    assert request["message_type"].endswith("SubmitPieces") and request["payload_bytes"] > 0
    assert refusal["meta"]["outcome"] == "refused" and refusal["payload_bytes"] == 0
    assert refusal["meta"]["outcome_of"] == request["seq"] and refusal["meta"]["run_id"] == 5
    assert "REFUSED (PERMISSION_DENIED)" in format_entries([request, refusal]) or \
        "REFUSED (UNAUTHENTICATED)" in format_entries([request, refusal])
    assert cli.main(["audit", "summary", str(ledger.path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["refused"] == 1 and info["entries"] == 1


def test_audit_show_and_summary_escape_control_characters(tmp_path, capsys):
    ledger = AuditLedger(tmp_path / "ledger.jsonl")
    hostile = "pool\x1b[2J\x1b[1A\u202eevil\r"
    _entry(ledger, 1, destination=hostile)
    _entry(ledger, 1, kind="train\x1b[8m")
    for command in ("show", "summary"):
        assert cli.main(["audit", command, str(ledger.path)]) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\u202e" not in out and "\r" not in out, command
    assert cli.main(["audit", "show", str(ledger.path)]) == 0
    out = capsys.readouterr().out
    assert "pool\\x1b[2J\\x1b[1A\\u202eevil\\x0d" in out
