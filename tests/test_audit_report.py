"""`pfl audit report`: the HTML page a person reads, rendered in a real headless browser
(Debian's Chromium, which ./dev test installs when it can), shows the figures of the ledgers
it was made from, flags a tampered ledger, and runs nothing a hostile ledger carries."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge_client.audit import AuditLedger, summary
from edge_client.audit.report import build_report, render_html
from edge_client.state import ledger_path
from simulations.cli import main

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no Chromium: `apt-get install chromium` (./dev test does it as root)")
    return path


def _browser(chromium: str, profile: Path, *args: str, timeout: float = 90) -> str:
    """Run headless Chromium with ``args``; return its stdout. Its whole process group is
    killed if it outlives ``timeout``."""
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}"
    return out


def _device(run_dir: Path, pid: int, *, hostile: bool = False) -> Path:
    """A device's ledger as a federation writes it: selection, stage 1, a sharer's pool
    upload and share reply, evaluation metrics, then a remote answer after the run."""
    ledger = AuditLedger(ledger_path(run_dir, pid))
    rng = np.random.default_rng(pid)
    ledger.append("flower", "superlink", "query.select",
                  {"cluster": np.zeros(1, np.int64)}, "upload.cluster_index")
    ledger.append("flower", "superlink", "train",
                  {"stage1.q_proj.lora_A": rng.standard_normal((8, 64), np.float32),
                   "stage1.q_proj.lora_B": rng.standard_normal((64, 8), np.float32)},
                  "upload.stage1_lora",
                  meta={"dp_clipping_norm": 1.0, "dp_noise_multiplier": 0.8,
                        "dp_epsilon": 2.5 + pid, "dp_delta": 1e-5, "secagg": True})
    ledger.append("pool-grpc", "<script>alert('pool')</script>" if hostile else "pool:50051",
                  "SubmitPieces", {"piece": rng.standard_normal(512, np.float32)},
                  "upload.perpcs_pieces")
    ledger.append("flower", "superlink", "train.share", None, "metrics.may_report",
                  {"metrics": {"pieces": 1}}, payload_bytes=120)
    ledger.append("flower", "superlink", "evaluate", None, "metrics.may_report",
                  {"metrics": {"mae": 0.5}}, payload_bytes=96)
    ledger.append("inference-grpc", "cloud:50071", "Generate", None, "inference.remote",
                  payload_bytes=300)
    return ledger.path


def test_report_in_a_real_browser_shows_the_ledgers_figures(chromium, tmp_path):
    run = tmp_path / "run"
    paths = [_device(run, 0), _device(run, 1, hostile=True), _device(run, 2)]
    # tamper with device 2: an edited size in its second entry
    lines = paths[2].read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"payload_bytes":', b'"payload_bytes":1')
    paths[2].write_bytes(b"".join(lines))
    out = tmp_path / "report.html"
    assert main(["audit", "report", str(run), "--out", str(out)]) == 1  # one is broken

    dom = _browser(chromium, tmp_path / "profile", "--dump-dom", out.as_uri())
    totals = [summary(p) for p in paths]
    expected_bytes = sum(t["bytes"] for t in totals)
    assert re.search(rf"id=\"total-bytes\" data-bytes=\"{expected_bytes}\"", dom)
    assert re.search(rf"id=\"total-entries\">{sum(t['entries'] for t in totals)}<", dom)
    assert re.search(r"id=\"ledgers-intact\" class=\"bad\">2 of 3<", dom)
    assert dom.count('data-intact="false"') == 1 and "NOT intact" in dom
    assert "line 2: hash does not match" in dom
    # per consent rule, what the ledgers say
    rules = {}
    for p in paths:
        for e in (json_lines(p)):
            rules[e["consent_rule"]] = rules.get(e["consent_rule"], 0) + e["payload_bytes"]
    for rule, size in rules.items():
        assert re.search(rf"<code>{re.escape(rule)}</code></td><td class=\"n\">\d+</td>"
                         rf"<td class=\"n\" data-bytes=\"{size}\">", dom), rule
    assert "ε = 4.5" in dom  # the largest epsilon any entry recorded
    assert re.search(r"id=\"secagg\">on<", dom)
    # the hostile destination is text, not markup: nothing ran, nothing was injected
    assert "<script>" not in dom and "&lt;script&gt;alert" in dom
    # the charts are there, one bar per phase with a payload
    assert dom.count("<svg") == 2
    for phase in ("selection", "stage 1 (lora)", "share", "evaluate",
                  "outside a federation phase"):
        assert f">{phase}</text>" in dom

    shot = tmp_path / "report.png"
    _browser(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,1500",
             out.as_uri())
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:4] == b"\x89PNG"


def json_lines(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def test_report_of_one_ledger_without_privacy_fields(tmp_path):
    ledger = AuditLedger(tmp_path / "ledger.jsonl")
    ledger.append("flower", "superlink", "train", {"w": np.ones(4, np.float32)},
                  "upload.stage1_lora")
    report = build_report(ledger.path)
    page = render_html(report)
    assert report["bytes"] == 16 and report["intact"] == 1
    assert report["secagg"] == {"masked_uploads": 0, "plain_uploads": 1}
    assert "id='secagg'>off<" in page and "id='dp-epsilon'>not recorded<" in page
    assert "Content-Security-Policy" in page and "<script" not in page
    assert main(["audit", "report", str(ledger.path)]) == 0
    assert (tmp_path / "ledger.html").is_file()
