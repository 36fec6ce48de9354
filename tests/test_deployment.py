"""A real deployment on loopback, as `pfl deploy local` starts it: certificates, the pool
service, flower-superlink and five flower-supernode processes, all with TLS and SuperNode
authentication (each device's key registered with `flwr supernode register`; a sixth,
unregistered SuperNode is refused), and `flwr run` with stage 1 under secure aggregation
(SecAgg+); the ServerApp runs on the SuperLink's own, locked packages (nothing installed at
run time); every process is stopped, even on failure."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import FAB_MAX_SIZE

from edge_client import audit
from shared.crypto import write_supernode_key
from simulations import cli
from simulations.deploy import LocalDeployment

REPO = Path(__file__).resolve().parents[1]
NODES = 5  # 1 target, 1 sharer, 3 collective (SecAgg+ needs 3 a round)


def test_a_federation_runs_over_tls_superlink_and_supernodes(tmp_path, capsys):
    """`pfl deploy local`'s deployment (simulations.deploy.LocalDeployment): every part is a
    separate process, from one run config that the pool reads too."""
    run_config = {"model": "tiny", "methods": "nonpersonalized,oppu,perpcs,perfit",
                  "targets": 1, "sharers": 1, "max-steps": 2, "max-history": 6,
                  "personal-epochs": 1, "perpcs.gate_steps": 3, "perfit.epochs": 1,
                  "kmeans-iterations": 1,
                  "secagg": True}  # stage 1 under SecAgg+: the server sees only sums
    with LocalDeployment(tmp_path / "deploy", NODES, run_config, say=lambda _: None) as dep:
        dep.prepare()
        dep.start_services()
        # a sixth device makes its own key but is not registered by the operator
        intruder_key, _ = write_supernode_key(tmp_path / "intruder" / "supernode.key")
        dep.start_devices()
        intruder = dep.start_device(NODES, key=intruder_key, name="unregistered")
        summary = dep.run(timeout=720)  # 5 SuperNodes, SecAgg+ stage 1: ~4.5 min on 2 cores
        logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
                         for p in sorted(dep.logs.glob("*.log")))
        assert summary is not None, f"no federation.json after the run:\n{logs}"
        # `pfl deploy status` while the services still run
        assert cli.main(["deploy", "status", "--dir", str(dep.directory)]) == 0
        status = capsys.readouterr().out
        assert "superlink" in status and "running" in status
        assert f"SuperLink: {NODES} registered node(s)" in status, status
        assert "run: finished" in status and "results:" in status
        listing = dep.flwr("supernode", "list", "deploy", "--format", "json", timeout=60)
        nodes = json.loads(listing.stdout[listing.stdout.index("{"):])["nodes"]
        assert len(nodes) == NODES, listing.stdout  # only the registered ones exist
        # the unregistered SuperNode was refused and gave up; it answered nothing
        intruder.popen.wait(timeout=60)
        refused = intruder.log.read_text(errors="replace")
        assert intruder.popen.returncode != 0 and "Failed to activate SuperNode" in refused
    assert all(p.popen.poll() is not None for p in dep.processes)  # every process stopped
    assert not (dep.device_dir(NODES) / "ledger.jsonl").exists()
    # nothing was installed at run time: the ServerApp used the SuperLink's own packages
    run_log = (dep.logs / "flwr-run.log").read_text(errors="replace")
    assert "Installing application dependencies" not in run_log, run_log[-3000:]
    assert not any((dep.directory / "flwr-home" / "runtime-envs").glob("*"))
    assert "DEPRECATED FEATURE" not in run_log  # the app uses Flower's current API
    assert summary["nodes"] == NODES and len(summary["evaluated_targets"]) == 1
    for name in ("nonpersonalized", "oppu", "perpcs", "perfit"):
        assert "metrics" in summary["methods"][name], (name, summary["methods"][name], logs)
    assert sum(m["pieces-submitted"] for m in summary["shared"].values()) > 0
    assert (dep.run_dir / "global_arrays.npz").is_file()  # what `pfl serve --run` loads

    # Each device wrote its own ledger; all intact; the sharer's pool upload is in it.
    ledgers = sorted(dep.directory.glob("devices/device-*/ledger.jsonl"))
    assert len(ledgers) == NODES
    entries = []
    for path in ledgers:
        assert audit.verify(path).ok
        entries += audit.read_entries(path)
    types = {e["message_type"] for e in entries}
    assert {"query.select", "train", "train.share", "train.personalize", "evaluate"} <= types
    assert any(t.endswith("SubmitPieces") for t in types)
    # every entry, pool calls included, names the Flower run it belongs to
    assert len({e["meta"]["run_id"] for e in entries}) == 1
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
