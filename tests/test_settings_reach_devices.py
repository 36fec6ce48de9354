"""A method setting in the run config reaches the federated code that uses it: stage 1 on
the collective devices reads the same resolved settings as the targets (and as `pfl eval`),
so a setting changes what the devices do (federations on real Flower messages, in
process, tiny model)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_client.state import ClientState
from simulations.simulate import run_federation_simulation

BASE = {"max-steps": 0, "max-history": 6, "stage1-epochs": 1, "personal-epochs": 1,
        "perfit.epochs": 1}


def _run(tmp_path, name: str, methods: str, **settings) -> dict:
    run_dir = tmp_path / name
    summary = run_federation_simulation(3, methods=methods, targets=1, sharers=0,
                                        run_dir=run_dir, options={**BASE, **settings})
    return {"summary": summary, "dir": run_dir}


def _stage1_arrays(run, kind: str) -> dict[str, np.ndarray]:
    with np.load(run["dir"] / f"stage1-{kind}" / "global_arrays.npz") as data:
        return {k: data[k] for k in data.files}


def _steps(run) -> list[int]:
    """Local steps each collective device recorded for its stage-1 round."""
    out = []
    for node in run["summary"]["collective"]:
        state = ClientState(run["dir"], node - 1001).read()
        out += [int(r["steps"]) for r in state.get("rounds", [])]
    return out


def test_stage1_batch_size_reaches_the_collective_devices(tmp_path):
    one = _run(tmp_path, "b1", "lora-c", **{"stage1.batch_size": 1})
    six = _run(tmp_path, "b6", "lora-c", **{"stage1.batch_size": 6})
    assert _steps(one) and _steps(six)
    assert _steps(one) == [6, 6] and _steps(six) == [1, 1]  # 6 examples, 1 epoch


@pytest.mark.parametrize("key,value", [("perfit.positions", "f1+l1"), ("perfit.lr", 0.05)])
def test_perfit_settings_reach_federated_stage1(tmp_path, key, value):
    # nonpersonalized too: the run has a result whatever the shifted tiny model answers
    methods = "nonpersonalized,perfit-c"
    default = _stage1_arrays(_run(tmp_path, "default", methods), "perfit")
    changed = _stage1_arrays(_run(tmp_path, "changed", methods, **{key: value}), "perfit")
    assert default.keys() == changed.keys()
    assert any(not np.array_equal(default[k], changed[k]) for k in default), key


def test_perfit_ranks_shape_the_collective_arrays_the_targets_read(tmp_path):
    """The server builds stage 1 with the run's PerFit rank and the target personalizes on
    top of it: both read the same settings (before, the server kept the default rank)."""
    run = _run(tmp_path, "rank", "perfit", **{"perfit.collective_rank": 3})
    rotations = [v for k, v in _stage1_arrays(run, "perfit").items()
                 if k.startswith("stage1.") and k.endswith(".R")]
    assert rotations and all(r.shape[0] == 3 for r in rotations)
    assert "metrics" in run["summary"]["methods"]["perfit"]
