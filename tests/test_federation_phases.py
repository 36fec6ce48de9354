"""A whole federation (every phase) in one process: roles, pool, ledgers, faults, leaks, and
the same metrics as the in-process `pfl eval`."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from cloud_server.federation import NothingEvaluated, format_results
from edge_client import audit
from shared.config import settings_keys
from edge_client.state import ledger_paths
from simulations.simulate import LocalGrid, run_federation_simulation

FAST = {"max-steps": 2, **settings_keys(
    {"max_history": 6, "personal_epochs": 1, "perpcs": {"gate_steps": 3},
     "perfit": {"epochs": 1}})}
METHODS = "nonpersonalized,oppu,perpcs,perfit"


def _outbound(reply) -> list[bytes]:
    """Every byte string a Flower reply carries (array data, metric and config values)."""
    out: list[bytes] = []
    if not reply.has_content():
        return [reply.error.reason.encode()]
    content = reply.content
    for record in content.array_records.values():
        out += [bytes(array.data) for array in record.values()]
    for records in (content.metric_records, content.config_records):
        for record in records.values():
            out.append(repr(sorted(dict(record).items())).encode())
    return out


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("federation")
    replies: list = []
    summary = run_federation_simulation(
        7, methods=METHODS, targets=2, sharers=2, run_dir=run_dir, options=FAST,
        node_configs={6: {"partition-id": 99}},  # a broken device: every call fails
        on_reply=replies.append)
    return summary, replies, run_dir


def test_every_phase_runs_and_roles_stay_disjoint(federation):
    summary, _, _ = federation
    targets, sharers, collective = (set(summary[k]) for k in ("targets", "sharers", "collective"))
    assert len(targets) == 2 and len(sharers) == 2
    assert not (targets & sharers or targets & collective or sharers & collective)
    assert summary["pool_pieces"] > 0  # sharers really submitted to the TLS pool
    assert all(m["pieces-submitted"] == m["pieces-trained"] for m in summary["shared"].values())
    assert set(summary["stage1"]) == {"lora", "perfit"}
    for name in METHODS.split(","):
        result = summary["methods"][name]
        assert result["queries"] > 0 and set(result["metrics"]) == {"mae", "rmse", "valid"}
    # Costs per user as pfl eval reports them: PER-PCS stores a recipe of bytes, OPPU a LoRA.
    methods = summary["methods"]
    assert 0 < methods["perpcs"]["bytes_per_user"] < methods["oppu"]["bytes_per_user"] / 50
    assert methods["nonpersonalized"]["params_per_user"] == 0
    assert "perfit" in format_results(summary)


def test_a_failing_device_does_not_stop_the_run(federation):
    summary, replies, _ = federation
    broken = LocalGrid.FIRST_NODE_ID + 6
    errors = [r for r in replies if not r.has_content()]
    assert errors and all(r.metadata.src_node_id == broken for r in errors)
    assert broken not in summary["sharers"] and broken not in summary["evaluated_targets"]
    assert len(summary["evaluated_targets"]) >= 1


def test_ledgers_record_every_reply_and_no_history_leaves_a_device(federation):
    summary, replies, run_dir = federation
    from shared.data import load_dataset
    from shared.embeddings import encode
    from shared.models import load_model

    # 1. Every Flower reply is in its device's ledger, with the same array hashes.
    by_node: dict[int, list] = {}
    for reply in replies:
        by_node.setdefault(int(reply.metadata.src_node_id), []).append(reply)
    assert len(summary["ledgers"]) == 7  # the broken device too (its error replies)
    for path in summary["ledgers"].values():
        assert audit.verify(path).ok
        entries = [e for e in audit.read_entries(path) if e["channel"] == "flower"]
        nodes = {e["meta"]["node_id"] for e in entries}
        assert len(nodes) == 1  # one device, one ledger
        sent = by_node.get(nodes.pop(), [])
        assert len(entries) == len(sent) > 0
        for entry, reply in zip(entries, sent):
            assert entry["message_type"] == reply.metadata.message_type
            hashes = sorted(a["wire_sha256"] for a in entry["arrays"])
            data = [bytes(a.data) for r in reply.content.array_records.values()
                    for a in r.values()] if reply.has_content() else []
            assert hashes == sorted(hashlib.sha256(d).hexdigest() for d in data)
    # Pool uploads are in the sharers' ledgers, with the consent rule that allowed them.
    submits = [e for path in summary["ledgers"].values() for e in audit.read_entries(path)
               if e["message_type"].endswith("SubmitPieces")]
    assert len(submits) == len(summary["sharers"])
    assert all(e["consent_rule"] == "upload.perpcs_pieces" and e["arrays"] for e in submits)

    # 2. No history text, token ids of a history item or per-item embedding in any outbound
    # byte: Flower replies and everything the pool received (its blobs).
    blobs = [b for r in replies for b in _outbound(r)]
    blobs += [p.read_bytes() for p in (run_dir / "pool").rglob("*") if p.is_file()]
    haystack = b"\x00".join(blobs)
    dataset = load_dataset("synthetic", None, num_users=7, seed=0)
    tokenizer = load_model("tiny").tokenizer
    needles = []
    for pid in range(6):
        for item in dataset.user(pid).history:
            text = dataset.task.corpus_text(item)
            needles.append(text[:24].encode())
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:8]
            needles += [np.asarray(ids, dtype=t).tobytes() for t in ("<i8", "<i4")]
            needles.append(encode([text])[0][:4].astype("<f4").tobytes())
    assert len(needles) > 100
    leaked = [n for n in needles if n in haystack]
    assert not leaked, f"{len(leaked)} history fragments left a device, e.g. {leaked[0]!r}"


def test_a_device_without_sharing_consent_submits_nothing(tmp_path):
    policy = tmp_path / "consent.toml"
    policy.write_text("version = 1\n[upload]\nperpcs_pieces = false\n")
    with pytest.raises(NothingEvaluated):  # PER-PCS alone, and nothing to assemble from
        run_federation_simulation(5, methods="perpcs", targets=1, sharers=2,
                                  run_dir=tmp_path / "run", options=FAST,
                                  consent_policy=policy)
    summary = json.loads((tmp_path / "run" / "federation.json").read_text())
    assert summary["shared"] == {} or not any(m.get("pieces-submitted")
                                             for m in summary["shared"].values())
    assert "error" in summary["methods"]["perpcs"]  # nothing to assemble from: reported
    assert not [p for p in (tmp_path / "run" / "pool").rglob("*") if p.is_file()
                and "blobs" in p.parts]  # the pool stayed empty
    for path in ledger_paths(tmp_path / "run").values():
        assert not any(e["message_type"].endswith("SubmitPieces")
                       for e in audit.read_entries(path))


@pytest.mark.slow
def test_a_federated_run_gives_the_same_metrics_as_pfl_eval(tmp_path, huffpost_dir):
    """SmolLM2 on real HuffPost users: the devices' metrics, summed by the server, equal what
    `pfl eval`'s in-process code computes for the same users, seeds and collective parts."""
    from shared.methods.perfit import perfit_from_arrays
    from shared.data import load_dataset
    from shared.generation import GenerationConfig
    from shared.methods.base import Runtime, parse_method
    from shared.methods.oppu import merge_lora, stage1_lora
    from shared.models import load_model
    from shared.recipes import over_recipe, resolve_recipe
    from simulations.evaluate import evaluate_method

    # A large PerFit lr so that one epoch visibly changes the answers.
    method_options = {"max_history": 3, "personal_epochs": 1, "perpcs": {"gate_steps": 2},
                      "perfit": {"epochs": 1, "lr": 0.05}}
    summary = run_federation_simulation(
        5, methods=METHODS, targets=2, sharers=1, model="smollm2-135m", task="news-headline",
        data_path=str(huffpost_dir), run_dir=tmp_path,
        options={"max-steps": 1, **settings_keys(method_options)})

    # The federation trains with the shipped recipe under the run's settings; so does pfl eval.
    expected = over_recipe(resolve_recipe("tuned", "smollm2-135m", "news-headline")[1],
                           method_options)
    assert summary["recipe"]["options"] == expected
    method_options = summary["recipe"]["options"]
    dataset = load_dataset("news-headline", huffpost_dir, users=5)
    user = {n: dataset.user(n - LocalGrid.FIRST_NODE_ID) for n in range(1001, 1006)}
    roles = {role: [user[n] for n in summary[role]]
             for role in ("targets", "sharers", "collective")}
    loaded = load_model("smollm2-135m")
    runtime = Runtime(loaded=loaded, task=dataset.task, seed=0, progress=False,
                      options=method_options, roles=roles)
    with np.load(tmp_path / "stage1-lora" / "global_arrays.npz") as data:
        lora = {k: __import__("torch").from_numpy(data[k]) for k in data.files}
    runtime.cache.stage1 = merge_lora(loaded.model, lora, stage1_lora())
    with np.load(tmp_path / "stage1-perfit" / "global_arrays.npz") as data:
        runtime.cache.perfit_stage1 = perfit_from_arrays({k: data[k] for k in data.files})
    generation = GenerationConfig(max_new_tokens=dataset.task.max_new_tokens, batch_size=8)
    for name in METHODS.split(","):
        local = evaluate_method(runtime, parse_method(name), dataset, roles["targets"], {}, 0.0,
                                generation)
        federated = summary["methods"][name]
        for metric, value in local["metrics"].items():
            assert federated["metrics"][metric] == pytest.approx(value, abs=1e-9), (name, metric)
        assert federated["params_per_user"] == local["params_per_user"]
    # Personalization really changed answers (else equal metrics would prove little).
    scores = {m: summary["methods"][m]["metrics"]["rouge-1"] for m in METHODS.split(",")}
    assert len(set(scores.values())) > 1, scores


def test_consented_embeddings_move_the_kmeans_centroids(tmp_path, tiny):
    """With a policy that lets embeddings leave, each candidate sends exactly one vector, its
    mean MiniLM history embedding (audited under the embeddings rule); by default none does."""
    from shared.data import load_dataset
    from shared.embeddings import user_embedding

    policy = tmp_path / "embeddings.toml"
    policy.write_text("version = 1\n[upload]\nperpcs_pieces = true\n[sharing]\nratio = 1.0\n"
                      "[embeddings]\nmay_leave_device = true\n")
    summary = run_federation_simulation(
        6, methods="perpcs", targets=1, sharers=2, run_dir=tmp_path / "run", options=FAST,
        consent_policy=policy)
    selection = summary["selection"]
    candidates = 6 - 1
    assert selection["embeddings_received"] == candidates  # in the last k-means iteration
    assert sum(selection["cluster_sizes"]) == candidates
    users = load_dataset("synthetic", None, users=6)
    task = users.task
    sent = 0
    for pid, path in summary["ledgers"].items():
        for entry in audit.read_entries(path):
            if entry["message_type"] != "query.select":
                continue
            # one vector, never per-item embeddings, and the device key its grant is bound to
            by_name = {a["name"].rsplit("/", 1)[-1]: a for a in entry["arrays"]}
            assert set(by_name) == {"user-embedding", "sharer-key"}, by_name
            array = by_name["user-embedding"]
            assert array["shape"] == [384] and by_name["sharer-key"]["shape"] == [32]
            assert "embeddings" in entry["consent_rule"]
            expected = user_embedding(task, users.user(int(pid))).astype(np.float32)
            assert array["sha256"] == hashlib.sha256(expected.tobytes()).hexdigest()
            sent += 1
    assert sent == candidates * 3  # kmeans-iterations (default 3)


def test_default_policy_keeps_embeddings_on_the_device(federation):
    summary, _, _ = federation
    assert summary["selection"]["embeddings_received"] == 0
    for path in summary["ledgers"].values():
        for entry in audit.read_entries(path):
            if entry["message_type"] == "query.select":  # at most the device key leaves
                assert [a["name"] for a in entry["arrays"]] in ([], ["arrays/sharer-key"])
                if entry["arrays"]:
                    assert "perpcs_pieces" in entry["consent_rule"]


def test_pfl_simulate_on_flowers_engine_equals_the_inprocess_grid(tmp_path):
    """`pfl simulate` runs every phase over Ray (Flower's simulation engine) and gives the
    same pool, stage-1 arrays and results as the deterministic in-process grid with the same
    users in the same roles (Ray's node ids are random, so the roles are mapped back to data
    partitions through the ledgers, which record each device's node id)."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "ray.json"
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--clients", "6",
               "--targets", "2", "--sharers", "1", "--rounds", "1", "--max-steps", "2",
               "--max-history", "6", "--personal-epochs", "1", "--set", "perpcs.gate_steps=3",
               "--set", "perfit.epochs=1", "--run-dir", str(tmp_path / "ray"),
               "--out", str(out)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"},
                             start_new_session=True)  # the real command, its own group
    try:
        output, _ = child.communicate(timeout=600)
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # Ray's daemons, if any outlived it
        except ProcessLookupError:
            pass
    assert child.returncode == 0, output.decode(errors="replace")[-3000:]
    ray = json.loads(out.read_text())
    assert ray["backend"] == "ray" and len(ray["ledgers"]) == 6
    partition = {}
    for pid, path in ray["ledgers"].items():
        assert audit.verify(path).ok
        nodes = {e["meta"]["node_id"] for e in audit.read_entries(path) if e["channel"] == "flower"}
        (node,) = nodes
        partition[node] = int(pid)
    as_local = {role: [LocalGrid.FIRST_NODE_ID + partition[n] for n in ray[role]]
                for role in ("targets", "sharers", "collective")}
    method_options = {"perpcs": {"gate_steps": 3}, "perfit": {"epochs": 1}, "max_history": 6,
                      "personal_epochs": 1}
    local = run_federation_simulation(
        6, methods=METHODS, targets=2, sharers=1, rounds=1, run_dir=tmp_path / "local",
        options={"max-steps": 2, **settings_keys(method_options),
                 "target-nodes": ",".join(map(str, as_local["targets"])),
                 "sharer-nodes": ",".join(map(str, as_local["sharers"]))})
    for role in ("targets", "sharers", "collective"):
        assert sorted(local[role]) == sorted(as_local[role]), role
    assert ray["pool_pieces"] == local["pool_pieces"] > 0
    assert set(ray["methods"]) == set(METHODS.split(","))
    for name, result in local["methods"].items():
        for metric, value in result["metrics"].items():
            assert ray["methods"][name]["metrics"][metric] == pytest.approx(value, abs=1e-9)
        for cost in ("params_per_user", "bytes_per_user"):
            assert ray["methods"][name][cost] == result[cost], (name, cost)
    for kind in ("lora", "perfit"):
        with np.load(tmp_path / "local" / f"stage1-{kind}" / "global_arrays.npz") as a, \
                np.load(tmp_path / "ray" / f"stage1-{kind}" / "global_arrays.npz") as b:
            assert a.files == b.files
            for key in a.files:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_traffic_per_phase_from_the_ledgers(federation):
    """`pfl bench traffic`: uplink/downlink per client and phase, from the ledgers alone."""
    from simulations.traffic import ledger_traffic, traffic_table

    summary, _, run_dir = federation
    result = ledger_traffic(run_dir)
    phases = {p["phase"]: p for p in result["phases"]}
    assert {"selection", "stage 1 (lora)", "stage 1 (perfit)", "share", "personalize",
            "evaluate"} <= set(phases)
    # selection: two numbers up (and from a device that may share, its 32-byte key), the
    # centroids down
    assert 0 < phases["selection"]["up_max"] < 2000
    assert phases["selection"]["down_median"] > 4 * 384 * len(summary["selection"]["cluster_sizes"])
    # stage 1: a client sends back arrays as large as it received
    lora = phases["stage 1 (lora)"]
    assert lora["up_median"] >= summary["stage1"]["lora"]["bytes_per_update"]
    assert lora["down_median"] >= summary["stage1"]["lora"]["bytes_per_update"]
    # sharers upload their pieces to the pool: far more than a metrics reply
    assert phases["share"]["up_median"] > 10 * phases["personalize"]["up_median"]
    # targets download the pool for PER-PCS (reported by the device, kept in its ledger)
    assert phases["personalize"]["clients"] == len(summary["evaluated_targets"])
    assert phases["personalize"]["down_median"] > phases["personalize"]["up_median"]
    # at evaluation a target has what it needs: the collective arrays it kept (the server
    # sends their digest only), the gate listing and the pieces of its recipe (kept by
    # content id): what comes down is the message's settings
    assert phases["evaluate"]["down_max"] < 10_000
    for node in summary["evaluated_targets"]:
        folder = run_dir / "clients" / f"partition-{node - LocalGrid.FIRST_NODE_ID:05d}"
        assert (folder / "arrays" / "collective.npz").is_file()
        assert list((folder / "pieces").glob("*.piece"))
    assert "stage 1 (lora)" in traffic_table(result)


def test_devices_that_vanish_are_left_out_and_the_log_says_so(tmp_path, tiny, caplog):
    """A target and a collective device stop answering (their messages are lost): stage 1
    averages the replies it has, the other target is still evaluated, and the server logs
    who did not answer."""
    import logging

    handler = caplog.handler
    logging.getLogger("flwr.pfl").addHandler(handler)  # Flower's logger may not propagate
    try:
        with caplog.at_level(logging.INFO, logger="flwr.pfl"):
            summary = run_federation_simulation(
                7, methods="nonpersonalized,oppu,perfit", targets=2, sharers=0,
                run_dir=tmp_path, options={**FAST, "target-nodes": "1001,1002"},
                unreachable={1, 5})  # node 1002 (a target) and 1006 (collective)
    finally:
        logging.getLogger("flwr.pfl").removeHandler(handler)
    assert summary["targets"] == [1001, 1002] and summary["evaluated_targets"] == [1001]
    assert summary["collective"] == [1003, 1004, 1005, 1006, 1007]
    for kind in ("lora", "perfit"):
        assert summary["stage1"][kind]["replies"] == [4]  # 5 sampled, 1 vanished
    for name in ("oppu", "perfit"):
        assert summary["methods"][name]["users"] == 1
    log = caplog.text
    assert "personalize: 1 node(s) did not answer: [1002]" in log
    assert "4 of 5 sampled clients replied" in log
