"""Central differential privacy of stage 1 (cloud_server.privacy): updates are validated,
clipped, averaged with equal weights and noised with Flower's functions; Flower's RDP
accountant reports epsilon; the devices' ledgers record the terms of each round; PerFit's R
stays orthonormal after the noise."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_server.aggregation import Reply
from cloud_server.privacy import CentralDP
from edge_client.audit import read_entries
from shared.errors import PflError
from simulations.simulate import run_stage1_simulation


def _replies(reference, deltas):
    return [Reply({k: reference[k] + d[k] for k in reference}, 10.0 * (i + 1), node=i)
            for i, d in enumerate(deltas)]


def test_updates_are_clipped_averaged_with_equal_weights_and_noised():
    rng = np.random.default_rng(0)
    reference = {"a": rng.standard_normal((50, 40)).astype(np.float32),
                 "b": rng.standard_normal(300).astype(np.float32)}
    deltas = [{k: (scale * rng.standard_normal(v.shape)).astype(np.float32)
               for k, v in reference.items()} for scale in (0.001, 0.002, 5.0)]
    norms = [np.sqrt(sum(float(np.sum(d[k] ** 2)) for d in [delta] for k in d))
             for delta in deltas]
    clipping = 0.5
    assert norms[0] < clipping < norms[2]  # one small update stays, the big one is clipped
    # (almost) no noise: the result is the equal-weight mean of the clipped updates
    quiet = CentralDP(1e-9, clipping, 1e-5, population=3)
    result = quiet.aggregate(_replies(reference, deltas), reference)
    clipped = [{k: d[k] * min(1.0, clipping / n) for k in d} for d, n in zip(deltas, norms)]
    for k in reference:
        expected = reference[k] + np.mean([c[k] for c in clipped], axis=0)
        np.testing.assert_allclose(result.arrays[k], expected, atol=1e-5)
    assert len(result.accepted) == 3 and quiet.accountant.num_releases == 1
    # noise: standard deviation z * C / k around that mean, on every coordinate
    z = 2.0
    noisy = CentralDP(z, clipping, 1e-5, population=3).aggregate(
        _replies(reference, deltas), reference)
    residual = np.concatenate([(noisy.arrays[k] - result.arrays[k]).ravel() for k in reference])
    assert np.std(residual) == pytest.approx(z * clipping / 3, rel=0.1)


def test_a_bad_reply_is_dropped_before_clipping_and_epsilon_grows_with_the_rounds():
    reference = {"w": np.zeros(8, np.float32)}
    bad = Reply({"w": np.full(8, np.nan, np.float32)}, 10.0, node="bad")
    wrong = Reply({"w": np.zeros(9, np.float32)}, 10.0, node="wrong")
    good = Reply({"w": np.full(8, 0.1, np.float32)}, 10.0, node="good")
    dp = CentralDP(1.0, 1.0, 1e-5, population=10)
    assert dp.epsilon == 0.0
    ahead = dp.epsilon_after_next(3)
    result = dp.aggregate([bad, wrong, good], reference)
    assert [r.node for r in result.accepted] == ["good"]
    assert {node for node, _ in result.dropped} == {"bad", "wrong"}
    first = dp.epsilon
    assert first > 0 and dp.samples == [1]
    # without amplification by sampling, a release costs the same whatever its size (the
    # noise z*C/k shrinks with the sensitivity C/k)
    assert ahead == pytest.approx(first)
    dp.aggregate([good], reference)
    assert dp.epsilon > first and dp.accountant.num_releases == 2
    assert dp.describe()["releases"] == 2
    more_noise = CentralDP(4.0, 1.0, 1e-5, population=10)
    more_noise.aggregate([good], reference)
    more_noise.aggregate([good], reference)
    assert more_noise.epsilon < dp.epsilon


@pytest.mark.parametrize("method", ["lora", "perfit"])
def test_a_dp_stage1_reports_epsilon_and_each_devices_ledger_records_the_rounds_terms(
        tmp_path, method):
    summary = run_stage1_simulation(
        method=method, num_clients=3, rounds=2, model="tiny", run_dir=tmp_path / method,
        backend="inprocess", num_users_per_client=1, max_steps=1,
        options={"dp-noise-multiplier": 1.1, "dp-clipping-norm": 0.05, "dp-delta": 1e-4})
    dp = summary["dp"]
    assert dp["releases"] == 2 and dp["noise_multiplier"] == 1.1 and dp["epsilon"] > 0
    epsilons = [h["dp_epsilon"] for h in summary["history"]]
    assert 0 < epsilons[0] < epsilons[1] == pytest.approx(dp["epsilon"])
    announced = []
    for path in summary["ledgers"].values():
        for entry in read_entries(path):
            if entry["message_type"] == "train":
                meta = entry["meta"]
                assert meta["dp_noise_multiplier"] == 1.1 and meta["dp_clipping_norm"] == 0.05
                assert meta["dp_delta"] == 1e-4
                announced.append(meta["dp_epsilon"])
    # each round's devices were told the epsilon the run spent once that round was released
    assert sorted(set(round(e, 9) for e in announced)) == [round(e, 9) for e in epsilons]
    if method == "perfit":  # R re-orthonormalized after the noise
        assert summary["orthonormality_error"] < 1e-4


def test_dp_settings_are_checked():
    with pytest.raises(PflError, match="dp-"):
        run_stage1_simulation(method="lora", num_clients=2, rounds=1, backend="inprocess",
                              options={"dp-noise-multiplier": -1.0})
