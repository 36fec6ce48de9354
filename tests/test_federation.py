"""Collective stage 1 over Flower: aggregation math, the server/client apps, simulations.

- FedAvg and PerFit re-orthonormalization as plain functions;
- the ServerApp's phase (:func:`cloud_server.server_app.run_stage1`) over an in-process grid
  with scripted clients: bad replies and failed clients are dropped, the round goes on;
- the real ClientApp in-process (:class:`simulations.simulate.LocalGrid`): LoRA and PerFit
  end to end, consent refusals, ledgers;
- Flower's Simulation Runtime (Ray) once per method, 2 clients x 2 rounds, tiny model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cloud_server.aggregation import Reply, check_reply, fedavg, weighted_average
from cloud_server.server_app import run_stage1, sample_size
from edge_client.audit import read_entries, verify
from edge_client.state import ClientState, ledger_path
from shared.methods.perfit import max_orthonormality_error, reorthonormalize_perfit
from shared.methods.perfit import orthonormality_error

FAST = {"local-epochs": 1.0, "max-history": 10, "batch-size": 4, "keep-updates": True}


def raw_sha(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def orthonormal(r: int, d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, r)))
    return q.T.astype(np.float32)


# ------------------------------------------------------------------- plain aggregation
def test_fedavg_is_the_example_weighted_mean():
    a = {"w": np.array([1.0, 2.0], np.float32), "m": np.ones((2, 2), np.float32)}
    b = {"w": np.array([4.0, 8.0], np.float32), "m": np.zeros((2, 2), np.float32)}
    result = fedavg([Reply(a, 1, "a"), Reply(b, 3, "b")], reference=a, max_update_ratio=None)
    # by hand: (1 * a + 3 * b) / 4
    np.testing.assert_allclose(result.arrays["w"], [13 / 4, 26 / 4], rtol=1e-6)
    np.testing.assert_allclose(result.arrays["m"], np.full((2, 2), 0.25), rtol=1e-6)
    assert result.arrays["w"].dtype == np.float32 and result.total_examples == 4
    assert not result.dropped
    np.testing.assert_allclose(weighted_average([a, b], [1, 1])["w"], [2.5, 5.0])


def test_bad_replies_are_dropped_not_fatal(caplog):
    ref = {"w": np.zeros((2, 3), np.float32)}
    good = Reply({"w": np.ones((2, 3), np.float32)}, 5, "good")
    nan = Reply({"w": np.full((2, 3), np.nan, np.float32)}, 5, "nan")
    shape = Reply({"w": np.ones((3, 2), np.float32)}, 5, "shape")
    dtype = Reply({"w": np.ones((2, 3), np.int32)}, 5, "dtype")
    names = Reply({"w": np.ones((2, 3), np.float32), "x": np.ones(1, np.float32)}, 5, "names")
    huge = Reply({"w": np.full((2, 3), 1e8, np.float32)}, 5, "huge")
    weight = Reply({"w": np.ones((2, 3), np.float32)}, 0, "weight")
    with caplog.at_level("WARNING"):
        result = fedavg([nan, good, shape, dtype, names, huge, weight], reference=ref,
                        max_update_ratio=None)
    np.testing.assert_array_equal(result.arrays["w"], np.ones((2, 3)))
    assert [r.node for r in result.accepted] == ["good"]
    reasons = dict(result.dropped)
    assert set(reasons) == {"nan", "shape", "dtype", "names", "huge", "weight"}
    assert "non-finite" in reasons["nan"] and "shape" in reasons["shape"]
    assert "dropping the reply of node nan" in caplog.text
    assert fedavg([nan], reference=ref).arrays is None  # nothing usable: no average
    assert check_reply({"w": np.ones((2, 3), np.float16)}, 1, ref) is None  # f16 is wire-ok


def test_reorthonormalize_after_averaging_perfit():
    r1, r2 = orthonormal(4, 16, 0), orthonormal(4, 16, 1)
    w = np.ones((4, 16), np.float32)
    averaged = fedavg([Reply({"stage1.layers.1.R": r1, "stage1.layers.1.W": w}, 1),
                       Reply({"stage1.layers.1.R": r2, "stage1.layers.1.W": 3 * w}, 1)]).arrays
    assert orthonormality_error(averaged["stage1.layers.1.R"]) > 0.1  # the mean is not
    fixed = reorthonormalize_perfit(averaged)
    R = fixed["stage1.layers.1.R"].astype(np.float64)
    assert np.linalg.norm(R @ R.T - np.eye(4)) < 1e-5
    np.testing.assert_array_equal(fixed["stage1.layers.1.W"], 2 * w)  # W stays averaged
    assert max_orthonormality_error(fixed) < 1e-5


def test_sample_size_and_client_state(tmp_path):
    assert [sample_size(f, 10) for f in (0.1, 0.25, 0.5, 1.0)] == [1, 3, 5, 10]
    assert sample_size(0.01, 3) == 1
    state = ClientState(tmp_path, 7)
    assert state.read() == {} and state.load_arrays("x") is None
    state.record_round({"round": 1, "loss": 0.5})
    state.record_round({"round": 2, "loss": 0.4})
    assert [r["round"] for r in state.read()["rounds"]] == [1, 2]
    state.save_arrays("x", {"a.b": np.arange(3, dtype=np.float32)})
    np.testing.assert_array_equal(state.load_arrays("x")["a.b"], [0, 1, 2])
    assert state.ledger_path == ledger_path(tmp_path, 7)
    assert state.ledger_path.parent.name == "partition-00007"


# --------------------------------------------------- the ServerApp over scripted clients
def scripted_client_app(behaviour):
    """A ClientApp whose reply per partition is ``behaviour[pid](arrays) -> arrays | None``
    (None: raise, i.e. a crashed client)."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        out = behaviour[int(context.node_config["partition-id"])](arrays)
        if out is None:
            raise RuntimeError("client crashed")
        return Message(RecordDict({
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in out.items()}),
            "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0})}), reply_to=msg)

    return app


def test_server_drops_bad_and_failed_replies_and_goes_on(tmp_path, tiny):
    from simulations.simulate import LocalGrid

    def plus_one(arrays):  # a small step, as local training takes (a large one is dropped)
        return {k: v + np.float32(0.01) for k, v in arrays.items()}

    def with_nan(arrays):
        out = plus_one(arrays)
        key = next(iter(out))
        out[key] = out[key].copy()
        out[key].flat[0] = np.nan
        return out

    def wrong_shape(arrays):
        out = plus_one(arrays)
        key = next(iter(out))
        out[key] = out[key][:-1]
        return out

    behaviour = {0: plus_one, 1: with_nan, 2: wrong_shape, 3: lambda arrays: None}
    grid = LocalGrid(scripted_client_app(behaviour), 4)
    summary = run_stage1(grid, {"method": "lora", "rounds": 2, "num-clients": 4,
                                "run-dir": str(tmp_path)})
    assert summary["replies"] == [4, 4] and summary["accepted"] == [1, 1]
    first = summary["history"][0]
    assert first["sampled"] == 4 and len(first["errors"]) == 1 and len(first["dropped"]) == 2
    assert "client crashed" in first["errors"][0]["reason"]
    initial, final = load_npz(summary["initial_arrays"]), load_npz(summary["final_arrays"])
    for key in initial:  # only the good client's +0.01 per round made it into the average
        np.testing.assert_allclose(final[key], initial[key] + 0.02, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "summary.json").read_text())["accepted"] == [1, 1]


def test_round_one_samples_what_is_asked(tmp_path, tiny):
    from simulations.simulate import LocalGrid

    identity = {pid: (lambda arrays: arrays) for pid in range(4)}
    summary = run_stage1(LocalGrid(scripted_client_app(identity), 4),
                         {"method": "perfit", "rounds": 2, "num-clients": 4,
                          "fraction-train": 0.5, "run-dir": str(tmp_path)})
    assert [h["sampled"] for h in summary["history"]] == [2, 2]
    assert summary["replies"] == [2, 2] and summary["orthonormality_error"] < 1e-5


# ------------------------------------------------------ the real ClientApp, in-process
def check_run(summary: dict, method: str, run_dir: Path, num_clients: int, rounds: int):
    """Shared end-to-end checks of a stage-1 run (either backend)."""
    from shared.data import load_dataset

    assert summary["rounds"] == rounds and summary["replies"] == [num_clients] * rounds
    assert summary["accepted"] == [num_clients] * rounds
    assert all(np.isfinite(loss) for loss in summary["train_loss"])
    snapshots = [load_npz(run_dir / "rounds" / f"round-{r:03d}.npz") for r in range(rounds + 1)]
    final = load_npz(summary["final_arrays"])
    for before, after in zip(snapshots, snapshots[1:]):  # the global arrays move every round
        assert sum(float(np.abs(after[k] - before[k]).max()) for k in before) > 0
    assert all(np.array_equal(final[k], snapshots[-1][k]) for k in final)
    if method == "perfit":
        assert summary["orthonormality_error"] < 1e-5
        for key in (k for k in final if k.endswith(".R")):
            R = final[key].astype(np.float64)
            assert np.linalg.norm(R @ R.T - np.eye(R.shape[0])) < 1e-5

    # the last round's global arrays are the example-weighted mean of the clients' updates
    updates, weights = [], []
    for pid in range(num_clients):
        state = ClientState(run_dir, pid)
        updates.append(state.load_arrays("last-update"))
        weights.append(state.read()["rounds"][-1]["num-examples"])
    expected = weighted_average(updates, weights)
    if method == "perfit":
        expected = reorthonormalize_perfit(expected)
    for key in final:
        np.testing.assert_allclose(final[key], expected[key], rtol=1e-4, atol=1e-6)

    # each client's ledger verifies and records exactly what it sent, and no history text
    rule = {"lora": "upload.stage1_lora", "perfit": "upload.perfit_stage1"}[method]
    users = load_dataset("synthetic", None, num_users=num_clients * 2, seed=0)
    assert sorted(summary["ledgers"]) == [str(pid) for pid in range(num_clients)]
    for pid in range(num_clients):
        path = Path(summary["ledgers"][str(pid)])
        assert path == ledger_path(run_dir, pid) and verify(path).ok
        entries = read_entries(path)
        assert len(entries) == rounds
        assert all(e["consent_rule"] == rule and e["message_type"] == "train" for e in entries)
        sent = {a["name"]: a for a in entries[-1]["arrays"]}
        assert set(sent) == {f"arrays/{k}" for k in final}
        for key, value in updates[pid].items():
            assert sent[f"arrays/{key}"]["dtype"] == "float32"
            assert sent[f"arrays/{key}"]["sha256"] == raw_sha(value)
        assert entries[-1]["fields"]["metrics/metrics"]["num-examples"] == weights[pid]
        ledger_text = path.read_text()
        for i in (2 * pid, 2 * pid + 1):
            for item in users.user(i).history:
                assert item["text"] not in ledger_text


@pytest.mark.parametrize("method", ["lora", "perfit"])
def test_inprocess_stage1_end_to_end(tmp_path, tiny, method):
    from simulations.simulate import run_stage1_simulation

    summary = run_stage1_simulation(method=method, num_clients=2, rounds=2, run_dir=tmp_path,
                                    backend="inprocess", options=FAST)
    assert summary["backend"] == "inprocess"
    check_run(summary, method, tmp_path, num_clients=2, rounds=2)


def test_consent_refusal_sends_nothing_and_the_round_goes_on(tmp_path, tiny):
    from cloud_server.server_app import resolve_config
    from edge_client.client_app import CONSENT_DENIED, make_client_app
    from simulations.simulate import LocalGrid

    policy = tmp_path / "no-stage1.toml"
    policy.write_text("version = 1\n[upload]\nstage1_lora = false\n")
    run_dir = tmp_path / "run"
    grid = LocalGrid(make_client_app({"device-root": str(run_dir)}), 2,
                     node_configs={1: {"consent-policy": str(policy)}})
    config = resolve_config({"method": "lora", "rounds": 1, "num-clients": 2,
                             "run-dir": str(run_dir), **FAST})
    summary = run_stage1(grid, config)
    assert summary["replies"] == [2] and summary["accepted"] == [1]
    (error,) = summary["history"][0]["errors"]
    assert f"code {CONSENT_DENIED}" in error["reason"] and "consent" in error["reason"]
    refused = read_entries(ledger_path(run_dir, 1))  # the refusal itself is audited
    assert len(refused) == 1 and refused[0]["arrays"] == []
    assert refused[0]["fields"]["error"]["code"] == CONSENT_DENIED
    assert not (ClientState(run_dir, 1).directory / "state.json").exists()  # nothing trained
    assert len(read_entries(ledger_path(run_dir, 0))) == 1


# ------------------------------------------------------- Flower's Simulation Runtime (Ray)
@pytest.mark.parametrize("method", ["lora", "perfit"])
def test_ray_simulation_two_clients_two_rounds(tmp_path, method):
    from simulations.simulate import run_stage1_simulation

    summary = run_stage1_simulation(method=method, num_clients=2, rounds=2, run_dir=tmp_path,
                                    backend="ray", options=FAST)
    assert summary["backend"] == "ray"
    check_run(summary, method, tmp_path, num_clients=2, rounds=2)


def test_sample_per_round_trains_exactly_that_many_clients_and_keeps_no_state(tmp_path, tiny):
    from cloud_server.server_app import resolve_config
    from edge_client.client_app import make_client_app
    from edge_client.state import ledger_paths
    from simulations.simulate import LocalGrid

    grid = LocalGrid(make_client_app({"device-root": str(tmp_path)}), 20)
    config = resolve_config({"method": "lora", "rounds": 2, "num-clients": 20,
                             "num-users-per-client": 1, "sample-per-round": 3,
                             "run-dir": str(tmp_path), **FAST})
    summary = run_stage1(grid, config)
    assert summary["sample_size"] == 3
    assert summary["replies"] == [3, 3] and summary["accepted"] == [3, 3]
    # only the sampled devices did anything: 3 to 6 ledgers among the 20
    assert 3 <= len(ledger_paths(tmp_path)) <= 6
    # per-client state lives on disk: Flower's in-memory context.state stays empty
    assert all(len(context.state) == 0 for context in grid.contexts.values())
