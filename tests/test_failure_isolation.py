"""One failing part does not wipe out a run: an empty pool, a refused consent, a target that
cannot read the pool or a device that fails each cost only what depends on them, and a run
that evaluated nothing fails (federations on real Flower messages, in process)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cloud_server.federation import NothingEvaluated, format_results, pick_sharers
from edge_client.audit import read_entries
from edge_client.consent import DEFAULT_POLICY_FILE
from shared.config import settings_keys
from shared.crypto import write_dev_certs
from shared.errors import POOL_UNAVAILABLE
from simulations import cli
from simulations.simulate import SIMULATION_CONSENT, run_federation_simulation

FAST = {"max-steps": 2, **settings_keys(
    {"max_history": 6, "personal_epochs": 1, "perpcs": {"gate_steps": 3},
     "perfit": {"epochs": 1}})}
METHODS = "nonpersonalized,oppu,perpcs,perfit"
#: a real device's default consent policy (shares no pieces)
DEFAULT_POLICY_PATH = Path(__file__).resolve().parents[1] / "edge_client" / DEFAULT_POLICY_FILE


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def test_the_default_consent_skips_pool_methods_and_keeps_every_other_result(tmp_path):
    """A real device's default consent shares no pieces: no device is selected as a sharer,
    PER-PCS is reported as skipped, and every other method is evaluated (before: no method
    had a result)."""
    summary = run_federation_simulation(5, methods=METHODS, targets=1, sharers=1,
                                        run_dir=tmp_path, options=FAST,
                                        consent_policy=DEFAULT_POLICY_PATH)
    assert summary["sharers"] == [] and summary["selection"]["willing"] == 0
    methods = summary["methods"]
    for name in ("nonpersonalized", "oppu", "perfit"):
        assert methods[name]["queries"] > 0 and "metrics" in methods[name], methods[name]
    assert methods["perpcs"]["skipped"] and "no sharer was selected" in methods["perpcs"]["error"]
    table = format_results(summary)
    assert "perpcs: skipped: no sharer was selected" in table
    status = _status(tmp_path)  # what `pfl deploy status` shows
    assert status["finished"] and status["phase"] == "finished"
    assert status["evaluated_methods"] == ["nonpersonalized", "oppu", "perfit"]
    assert status["roles"]["targets"] == summary["targets"]
    assert status["role_counts"] == {"targets": 1, "sharers": 0, "collective": 4}


def test_sharers_are_chosen_among_devices_that_consent_to_share(tmp_path):
    """Only one device (partition 4, node 1005) may share: it becomes the sharer, whatever
    the k-means clusters say, and PER-PCS runs from its pieces."""
    others = tmp_path / "no-sharing.toml"
    others.write_text("version = 1\n[upload]\nperpcs_pieces = false\n")
    summary = run_federation_simulation(
        6, methods="nonpersonalized,perpcs", targets=1, sharers=2, run_dir=tmp_path / "run",
        options={**FAST, "target-nodes": "1001"}, consent_policy=others,
        node_configs={4: {"consent-policy": str(SIMULATION_CONSENT)}})
    assert summary["sharers"] == [1005] and summary["selection"]["willing"] == 1
    assert "metrics" in summary["methods"]["perpcs"]
    assert summary["pool_pieces"] > 0
    # every pool call in a ledger names who chose the address and the root that verified it
    ca = hashlib.sha256((tmp_path / "run" / "certs" / "ca.pem").read_bytes()).hexdigest()
    pool_calls = [e for path in summary["ledgers"].values() for e in read_entries(path)
                  if e["channel"] == "pool-grpc"]
    assert pool_calls and all(e["meta"]["address_from"] == "server" and
                              e["meta"]["trusted_ca_sha256"] == ca for e in pool_calls)


def test_pick_sharers_skips_unwilling_devices():
    sizes, clusters = {1: 50, 2: 40, 3: 30}, {1: 0, 2: 0, 3: 1}
    assert pick_sharers(2, sizes, clusters, 0) == [1, 3]
    assert pick_sharers(2, sizes, clusters, 0, willing={2, 3}) == [2, 3]
    assert pick_sharers(2, sizes, clusters, 0, willing=set()) == []


def test_a_target_that_cannot_read_the_pool_loses_only_the_pool_methods(tmp_path):
    """The target trusts another CA than the pool's (so TLS to the pool fails): PER-PCS
    fails on it with the pool's code, and its other methods are evaluated."""
    stranger = write_dev_certs(tmp_path / "stranger-ca")
    summary = run_federation_simulation(
        5, methods=METHODS, targets=1, sharers=1, run_dir=tmp_path / "run",
        options={**FAST, "target-nodes": "1001"},
        node_configs={0: {"pool-ca": str(stranger.ca_cert)}})
    assert summary["pool_pieces"] > 0  # the sharer did share
    perpcs = summary["methods"]["perpcs"]
    assert "metrics" not in perpcs and perpcs["failed_targets"] == 1
    assert f"code {POOL_UNAVAILABLE}" in perpcs["failures"]
    for name in ("nonpersonalized", "oppu", "perfit"):
        assert "metrics" in summary["methods"][name], summary["methods"][name]


def test_a_run_that_evaluated_nothing_fails_and_still_writes_its_results(tmp_path):
    with pytest.raises(NothingEvaluated) as raised:
        run_federation_simulation(4, methods="perpcs", targets=1, sharers=1, run_dir=tmp_path,
                                  options=FAST, consent_policy=DEFAULT_POLICY_PATH)
    summary = json.loads((tmp_path / "federation.json").read_text())
    assert summary == json.loads(json.dumps(raised.value.summary))
    assert summary["methods"]["perpcs"]["skipped"]


def test_pfl_simulate_exits_non_zero_when_nothing_was_evaluated(tmp_path, capsys):
    code = cli.main(["simulate", "--backend", "inprocess", "--clients", "4", "--targets", "1",
                     "--sharers", "1", "--method", "perpcs", "--max-steps", "1",
                     "--max-history", "4", "--rounds", "1", "--consent",
                     str(DEFAULT_POLICY_PATH), "--run-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code != 0
    assert "perpcs: skipped: no sharer was selected" in out
    assert "no method was evaluated" in err


def test_a_hostile_failure_code_cannot_break_the_results():
    """A device's ``METHOD/failed`` is its word: NaN, inf or an unknown number count as a
    plain failure (code 500), and the server's results are still made."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from cloud_server.federation import _failures

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as a grid does
    replies = [Message(RecordDict({"metrics": MetricRecord({"oppu/failed": value})}),
                       dst_node_id=1, message_type="train")
               for value in (float("nan"), float("inf"), 1e300, 503.0, 7.0)]
    assert _failures("oppu", replies) == {500: 4, 503: 1}
