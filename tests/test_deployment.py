"""A real deployment on loopback: `pfl certs`, the pool service, flower-superlink and five
flower-supernode processes, all with TLS and SuperNode authentication (each device's key
made on the device with `pfl node-key`, registered with `flwr supernode register`; a fifth,
unregistered SuperNode is refused), and `flwr run .` with stage 1 under secure aggregation
(SecAgg+); the ServerApp runs on the SuperLink's own, locked packages (nothing installed at
run time); every process is stopped by the test, even on failure."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import FAB_MAX_SIZE

from edge_client import audit

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NODES = 5  # 1 target, 1 sharer, 3 collective (SecAgg+ needs 3 a round)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited early:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on {port} after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def processes():
    """Start processes in their own groups; stop them all (TERM, then KILL) at the end."""
    started: list[subprocess.Popen] = []

    def start(args, log: Path, env=None):
        proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(started):
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def test_a_federation_runs_over_tls_superlink_and_supernodes(tmp_path, processes):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(tmp_path / "flwr-home"), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    certs = tmp_path / "certs"
    subprocess.run([str(BIN / "pfl"), "certs", str(certs), "--hosts", "localhost,127.0.0.1"],
                   check=True, env=env, capture_output=True)
    ca = certs / "ca.pem"

    pool_port, link_port = _free_port(), _free_port()
    pool = processes([str(BIN / "pfl"), "pool", "serve", "--db", str(tmp_path / "pool"),
                      "--port", str(pool_port), "--certs", str(certs),
                      "--model", "tiny"], tmp_path / "pool.log",
                     env)
    _wait_port(pool_port, pool, tmp_path / "pool.log")
    link = processes([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(ca),
                      "--ssl-certfile", str(certs / "server.pem"),
                      "--ssl-keyfile", str(certs / "server.key"), "--host", "127.0.0.1",
                      "--port", str(link_port), "--database", str(tmp_path / "link.db"),
                      "--enable-supernode-auth",  # only registered SuperNodes join
                      # the ServerApp runs in this (locked) environment: no uv sync of the
                      # app's dependencies from an index at run time
                      "--disable-runtime-dependency-installation"],
                     tmp_path / "superlink.log", env)
    _wait_port(link_port, link, tmp_path / "superlink.log")
    home = tmp_path / "flwr-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
        f'address = "127.0.0.1:{link_port}"\nroot-certificates = "{ca}"\n')
    policy = REPO / "simulations" / "consent_simulation.toml"

    def supernode(pid: int, key: Path, log: str):
        device = tmp_path / f"device-{pid}"
        device.mkdir(exist_ok=True)
        node_config = (f'partition-id={pid} num-partitions={NODES} '
                       f'ledger="{device / "ledger.jsonl"}" state-dir="{device}" '
                       f'pool-ca="{ca}" consent-policy="{policy}"')
        return processes([str(BIN / "flower-supernode"), "--root-certificates", str(ca),
                          "--superlink", f"127.0.0.1:{link_port}", "--port", str(_free_port()),
                          "--auth-supernode-private-key", str(key),
                          "--node-config", node_config], tmp_path / log, env)

    keys = []
    for pid in range(NODES + 1):  # each device makes its own key; the last stays unregistered
        key = tmp_path / f"device-keys/node-{pid}.key"
        subprocess.run([str(BIN / "pfl"), "node-key", str(key)], check=True, env=env,
                       capture_output=True)
        keys.append(key)
    for key in keys[:NODES]:  # the operator registers the public halves
        done = subprocess.run([str(BIN / "flwr"), "supernode", "register",
                               str(key.with_name(key.name + ".pub")), "deploy"],
                              env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "registered" in done.stdout, done.stdout + done.stderr
    intruder = supernode(NODES, keys[NODES], "supernode-unregistered.log")
    for pid in range(NODES):
        supernode(pid, keys[pid], f"supernode-{pid}.log")
    run_dir = tmp_path / "run"
    run_config = tmp_path / "run-config.toml"  # method settings: dotted keys
    run_config.write_text(
        f'methods = "nonpersonalized,oppu,perpcs,perfit"\ntargets = 1\nsharers = 1\n'
        f'num-clients = {NODES}\nmax-steps = 2\nrun-dir = "{run_dir}"\n'
        f'pool-address = "127.0.0.1:{pool_port}"\nmax-history = 6\npersonal-epochs = 1\n'
        f'perpcs.gate_steps = 3\nperfit.epochs = 1\nkmeans-iterations = 1\n'
        f'grant-key = "{certs / "federation.key"}"\n'  # the server signs sharer grants
        f'secagg = true\n')  # stage 1 under SecAgg+: the server sees only sums
    flwr = processes([str(BIN / "flwr"), "run", str(REPO), "deploy", "--stream",
                      "--run-config", str(run_config)], tmp_path / "flwr-run.log", env)
    deadline = time.monotonic() + 720  # 5 SuperNodes, SecAgg+ stage 1: ~4.5 min on 2 cores
    summary_path = run_dir / "federation.json"
    while not summary_path.is_file() and time.monotonic() < deadline and flwr.poll() is None:
        time.sleep(1.0)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
                     for p in sorted(tmp_path.glob("*.log")))
    assert summary_path.is_file(), f"no federation.json after the run:\n{logs}"
    time.sleep(0.5)  # the file is written in one go; let the writer finish
    summary = json.loads(summary_path.read_text())
    # nothing was installed at run time: the ServerApp used the SuperLink's own packages
    run_log = (tmp_path / "flwr-run.log").read_text(errors="replace")
    assert "Installing application dependencies" not in run_log, run_log[-3000:]
    assert not any((home / "runtime-envs").glob("*")), "a runtime environment was created"
    assert summary["nodes"] == NODES and len(summary["evaluated_targets"]) == 1
    # the unregistered SuperNode was refused and gave up; it answered nothing
    intruder.wait(timeout=60)
    refused = (tmp_path / "supernode-unregistered.log").read_text(errors="replace")
    assert intruder.returncode != 0 and "Failed to activate SuperNode" in refused, refused
    assert not (tmp_path / f"device-{NODES}" / "ledger.jsonl").exists()
    listing = subprocess.run([str(BIN / "flwr"), "supernode", "list", "deploy", "--format",
                              "json"], env=env, capture_output=True, text=True, timeout=60)
    nodes = json.loads(listing.stdout[listing.stdout.index("{"):])["nodes"]
    assert len(nodes) == NODES, listing.stdout  # only the registered ones exist
    for name in ("nonpersonalized", "oppu", "perpcs", "perfit"):
        assert "metrics" in summary["methods"][name], (name, summary["methods"][name], logs)
    assert sum(m["pieces-submitted"] for m in summary["shared"].values()) > 0

    # Each device wrote its own ledger; all intact; the sharer's pool upload is in it.
    ledgers = sorted(tmp_path.glob("device-*/ledger.jsonl"))
    assert len(ledgers) == NODES
    entries = []
    for path in ledgers:
        assert audit.verify(path).ok
        entries += audit.read_entries(path)
    types = {e["message_type"] for e in entries}
    assert {"query.select", "train", "train.share", "train.personalize", "evaluate"} <= types
    assert any(t.endswith("SubmitPieces") for t in types)
    # stage 1 ran under SecAgg+ over the real SuperLink: the collective devices' uploads
    # left as masked vectors only, every stage-1 entry is marked as part of the protocol
    for kind, part in summary["stage1"].items():
        assert part["secagg"]["devices_per_round"] == NODES - 2, (kind, part)
    stage1 = [e for e in entries if e["message_type"] == "train"]
    masked = [e for e in stage1 if e["meta"].get("secagg_stage") == "collect_masked_vectors"]
    assert stage1 and all(e["meta"].get("secagg") is True for e in stage1)
    assert len(masked) == (NODES - 2) * len(summary["stage1"])
    assert all(a["name"].startswith("masked/") for e in masked for a in e["arrays"])


def test_the_app_bundle_holds_the_code_and_stays_small():
    """`flwr run` refuses a FAB over 10 MiB: the committed results once made it 11 MiB and
    the deployment failed on a clean checkout. Built by Flower's own builder, as `flwr run`."""
    fab = build_fab_from_disk(REPO)
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    assert len(fab) < FAB_MAX_SIZE // 4, f"{len(fab)} bytes"
    code = {str(p.relative_to(REPO)) for pkg in ("cloud_server", "edge_client", "shared")
            for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts}
    assert code and code <= names, sorted(code - names)[:5]
    assert "shared/recipes/smollm2-135m/news-category.json" in names  # the apps read recipes
    assert not any(n.startswith(("simulations/", "tests/")) for n in names)
