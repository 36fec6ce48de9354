"""Secure aggregation (SecAgg+) of stage 1 (cloud_server.secagg, edge_client.secagg), on real
Flower messages through an in-process grid: every device its own ClientApp, context and
ledger, each message copied as from the wire.

- the securely aggregated arrays equal FedAvg of the devices' own updates (kept on each
  device with ``keep-updates``) within SecAgg+'s quantization error;
- what reaches the server's strategy is one aggregate, never an individual update, and what
  leaves a device in a SecAgg+ round is keys, shares and masked vectors only (its ledger);
- a device that drops out mid-protocol (1 of 5: its consent refuses the upload, or it
  vanishes after the keys were shared) does not stop the round;
- PerFit's R is re-orthonormalized after the secure aggregate; under DP each device clips
  its own update (Flower's fixedclipping_mod) and the run reports epsilon;
- a device refuses a protocol setup a server could use to unmask it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from cloud_server import secagg
from cloud_server.server_app import run_stage1
from edge_client.audit import read_entries, verify
from edge_client.audit.ledger import entry_phases
from edge_client.audit.report import build_report
from edge_client.client_app import make_client_app
from edge_client.secagg import secagg_mod
from shared.errors import BAD_REQUEST, PflError
from shared.config import RunConfig
from simulations.simulate import LocalGrid

#: One quantization step of a value (Flower's 2^22 levels over [-8, 8]).
STEP = 2 * 8.0 / secagg.QUANTIZATION_RANGE
#: The most examples a device may weigh (a synthetic user has fewer): a tight cap keeps
#: SecAgg+'s quantization error small (see _bound)
CAP = 40


def _config(run_dir: Path, clients: int, **extra) -> dict:
    return {"method": "lora", "rounds": 1, "model": "tiny", "num-users-per-client": 1,
            "run-dir": str(run_dir), "num-clients": clients, "max-steps": 1,
            "keep-updates": True, "secagg": True, "max-examples": CAP, **extra}


def _updates(run_dir: Path, partitions) -> dict[int, tuple[dict[str, np.ndarray], float]]:
    """Each device's own update (kept on the device) and its example count."""
    out = {}
    for pid in partitions:
        folder = run_dir / "clients" / f"partition-{pid:05d}"
        with np.load(folder / "arrays" / "last-update.npz") as data:
            arrays = {k: data[k] for k in data.files}
        count = json.loads((folder / "state.json").read_text())["rounds"][-1]["num-examples"]
        out[pid] = (arrays, float(count))
    return out


def _bound(updates, cap: float) -> float:
    """SecAgg+'s worst quantization error of the average: each device rounds its weighted
    values (weight/cap <= 1) to one step; the sum is divided by the weights' sum."""
    total = sum(min(count, cap) for _, count in updates.values()) / cap
    return len(updates) * STEP / total


def _fedavg(updates, cap: float) -> dict[str, np.ndarray]:
    weights = {pid: min(count, cap) for pid, (_, count) in updates.items()}
    total = sum(weights.values())
    names = next(iter(updates.values()))[0]
    return {k: sum(weights[p] * updates[p][0][k].astype(np.float64) for p in updates) / total
            for k in names}


@pytest.fixture
def spy(monkeypatch):
    """Everything that reaches SecureStage1.aggregate_fit (the server's strategy)."""
    seen: list[list[list[np.ndarray]]] = []
    original = secagg.SecureStage1.aggregate_fit

    def aggregate_fit(self, server_round, results, failures):
        from flwr.common import parameters_to_ndarrays

        seen.append([parameters_to_ndarrays(fitres.parameters) for _, fitres in results])
        return original(self, server_round, results, failures)

    monkeypatch.setattr(secagg.SecureStage1, "aggregate_fit", aggregate_fit)
    return seen


def test_the_secure_aggregate_is_fedavg_and_the_server_never_holds_an_update(tmp_path, spy):
    replies: list[Message] = []
    grid = LocalGrid(make_client_app({"device-root": str(tmp_path)}), 5,
                     on_reply=replies.append)
    summary = run_stage1(grid, _config(tmp_path, 5))
    assert summary["accepted"] == [5] and summary["secagg"]["threshold"] == 3
    updates = _updates(tmp_path, range(5))
    cap = CAP
    expected = _fedavg(updates, cap)
    with np.load(summary["final_arrays"]) as data:
        final = {k: data[k] for k in data.files}
    worst = max(float(np.max(np.abs(final[k] - expected[k]))) for k in expected)
    assert worst <= _bound(updates, cap), worst  # within the quantization error
    # the strategy got one aggregate (the same list in every result), equal to the final one
    assert len(spy) == 1 and len(spy[0]) == 5
    names = sorted(final)
    for arrays in spy[0]:
        for name, value in zip(names, arrays):
            np.testing.assert_array_equal(value.astype(np.float32), final[name])
    # ... and never an individual update: each device's differs from it by far more
    for own, _ in updates.values():
        assert max(float(np.max(np.abs(own[k] - final[k]))) for k in names) > \
            10 * _bound(updates, cap)
    # on the wire: no reply carried plain arrays, the uploads carried masked vectors
    uploads = [r for r in replies if r.has_content()
               and RECORD_KEY_CONFIGS in r.content.config_records
               and Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(uploads) == 5 and len(replies) == 20  # 4 stages x 5 devices
    assert all(len(record) == 0 for r in replies if r.has_content()
               for record in r.content.array_records.values())
    # each ledger: keys and shares under the protocol rule, the upload masked, nothing else
    for pid in range(5):
        ledger = tmp_path / "clients" / f"partition-{pid:05d}" / "ledger.jsonl"
        assert verify(ledger).ok
        entries = read_entries(ledger)
        assert [e["meta"]["secagg_stage"] for e in entries] == list(Stage.all())
        assert all(e["meta"]["secagg"] is True for e in entries)
        upload = entries[2]
        assert upload["consent_rule"] == "upload.stage1_lora"
        assert upload["arrays"] and all(a["name"].startswith("masked/")
                                        for a in upload["arrays"])
        assert len(upload["arrays"]) == len(names) + 1  # the weight factor, then the arrays
        assert {e["consent_rule"] for i, e in enumerate(entries) if i != 2} == \
            {"protocol.secaggplus"}
        assert not any(e["arrays"] for i, e in enumerate(entries) if i != 2)
        assert entry_phases(entries) == ["stage 1 (SecAgg+ keys)"] * 2 + \
            ["stage 1 (lora)", "stage 1 (SecAgg+ keys)"]
    # the auditor's report says secure aggregation was on: 5 masked uploads, none in clear
    report = build_report(tmp_path)
    assert report["secagg"] == {"masked_uploads": 5, "plain_uploads": 0}


class VanishingGrid(LocalGrid):
    """A grid on which one device stops answering after the key exchange (its messages of
    the masked-vector stage and later are lost, as with a device that went offline)."""

    def __init__(self, *args, vanishes: int, after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.node, self.after, self.delivered = self.FIRST_NODE_ID + vanishes, after, 0

    def push_messages(self, messages):
        messages = list(messages)
        for message in messages:
            if message.metadata.dst_node_id == self.node:
                self.delivered += 1
                if self.delivered > self.after:
                    self.unreachable.add(self.node)
        return super().push_messages(messages)


@pytest.mark.parametrize("how", ["refuses", "vanishes"])
def test_a_device_dropping_out_mid_protocol_does_not_stop_the_round(tmp_path, how, spy):
    device = {"device-root": str(tmp_path)}
    if how == "refuses":  # joins the key exchange, then its consent refuses the LoRA upload
        policy = tmp_path / "consent.toml"
        policy.write_text("version = 1\n[upload]\nstage1_lora = false\n")
        grid = LocalGrid(make_client_app(device), 5,
                         node_configs={2: {"consent-policy": str(policy)}})
    else:  # answers setup and share keys, then is gone
        grid = VanishingGrid(make_client_app(device), 5, vanishes=2, after=2)
    summary = run_stage1(grid, _config(tmp_path, 5))
    history = summary["history"][0]
    assert history["sampled"] == 5 and history["accepted"] == 4
    updates = _updates(tmp_path, [0, 1, 3, 4])
    expected = _fedavg(updates, CAP)
    with np.load(summary["final_arrays"]) as data:
        worst = max(float(np.max(np.abs(data[k] - expected[k]))) for k in expected)
    assert worst <= _bound(updates, CAP), worst  # the dropped device's masks were removed
    assert len(spy) == 1 and len(spy[0]) == 4
    ledger = read_entries(tmp_path / "clients" / "partition-00002" / "ledger.jsonl")
    stages = [e["meta"]["secagg_stage"] for e in ledger]
    assert stages[:2] == [Stage.SETUP, Stage.SHARE_KEYS]
    assert not any(e["arrays"] for e in ledger)  # it never uploaded its update


def test_perfit_under_secagg_stays_orthonormal_and_dp_clips_on_the_device(tmp_path):
    grid = LocalGrid(make_client_app({"device-root": str(tmp_path / "perfit")}), 3)
    summary = run_stage1(grid, _config(tmp_path / "perfit", 3, method="perfit"))
    assert summary["accepted"] == [3]
    assert summary["orthonormality_error"] < 1e-4
    # DP under SecAgg+: each device clips its update to C; the noise is negligible here
    clip = 1e-4
    grid = LocalGrid(make_client_app({"device-root": str(tmp_path / "dp")}), 3)
    summary = run_stage1(grid, _config(tmp_path / "dp", 3, **{
        "dp-noise-multiplier": 1e-6, "dp-clipping-norm": clip}))
    assert summary["accepted"] == [3] and summary["dp"]["epsilon"] > 0
    initial = np.load(summary["initial_arrays"])
    unclipped = _fedavg(_updates(tmp_path / "dp", range(3)), 1)
    raw = np.sqrt(sum(float(np.sum((unclipped[k] - initial[k]) ** 2)) for k in unclipped))
    # SecAgg+'s rounding (weights 1 under DP: at most a step per value) adds its own norm
    quantization = STEP * np.sqrt(sum(initial[k].size for k in initial.files))
    assert raw > 3 * (clip + quantization)  # the updates were far larger than the clip
    assert summary["history"][0]["delta_norm"] <= clip + quantization
    for pid in range(3):
        entries = read_entries(tmp_path / "dp" / "clients" / f"partition-{pid:05d}" /
                               "ledger.jsonl")
        upload = entries[2]
        assert upload["meta"]["dp_clipping_norm"] == clip
        assert upload["meta"]["dp_epsilon"] == pytest.approx(summary["dp"]["epsilon"])


def _stage_message(stage: str, dst: int = 7, **values) -> Message:
    record = ConfigRecord({Key.STAGE: stage, **values})
    return Message(RecordDict({RECORD_KEY_CONFIGS: record}), dst_node_id=dst,
                   message_type="train", group_id="1")


@pytest.mark.parametrize("values,stage", [
    ({Key.SAMPLE_NUMBER: 5, Key.SHARE_NUMBER: 5, Key.THRESHOLD: 2}, Stage.SETUP),
    ({Key.SAMPLE_NUMBER: 2, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2}, Stage.SETUP),
    ({Key.ACTIVE_NODE_ID_LIST: [3, 4], Key.DEAD_NODE_ID_LIST: [4]}, Stage.UNMASK),
    ({Key.ACTIVE_NODE_ID_LIST: [3, 4], Key.DEAD_NODE_ID_LIST: [7]}, Stage.UNMASK),
])
def test_a_device_refuses_a_setup_or_unmask_that_could_reveal_an_update(values, stage):
    """A threshold that is not a majority, too few devices, asking both shares of one device
    or this device's own key: an error code, and Flower's protocol code never runs."""
    called = []
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = secagg_mod(_stage_message(stage, **values), context,
                       lambda m, c: called.append(m))
    assert reply.has_error() and reply.error.code == BAD_REQUEST
    assert not called and RECORD_KEY_CONFIGS not in context.state.config_records


def test_protocol_sizes_need_three_devices_and_a_majority_threshold(tmp_path):
    config = RunConfig.parse(_config(tmp_path, 5))
    assert secagg.protocol_sizes(config, 5) == (5, 3)
    assert secagg.protocol_sizes(config.replace(secagg_num_shares=3), 10) == (3, 2)
    with pytest.raises(PflError, match="at least 3"):
        secagg.protocol_sizes(config, 2)
    with pytest.raises(PflError, match="majority"):
        secagg.protocol_sizes(config.replace(secagg_threshold=2), 5)
