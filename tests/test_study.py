"""pfl study: PER-PCS against the number of sharers / the sharing ratio, on the tiny model."""

from __future__ import annotations

import json

import pytest

FAST = ["--task", "synthetic", "--model", "tiny", "--users", "3", "--queries-per-user", "1",
        "--collective", "2", "--max-history", "4", "--set", "stage1.max_steps=1",
        "--set", "oppu.max_steps=1", "--set", "perpcs.gate_steps=1", "--quiet"]


def test_sharers_study_keeps_targets_and_stage1_and_resumes(tmp_path, tiny, monkeypatch,
                                                             capsys):
    from simulations import study
    from simulations.cli import main

    out = tmp_path / "study"
    assert main(["study", "sharers", "--values", "1,2", "--sharers", "1", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), *FAST]) == 0
    summary = json.loads((out / "sharers.json").read_text())
    assert [p["sharers"] for p in summary["points"]] == [1, 2]
    assert summary["reference"]["score"] is not None  # the stage-1-only line
    assert all(p["low"] <= p["score"] <= p["high"] for p in summary["points"])
    first, second = (json.loads((out / f"sharers-{v}.json").read_text()) for v in (1, 2))
    assert first["targets"] == second["targets"]
    # the reference is stage 1 only (LoRA-C), which PER-PCS assembles on; not the base model
    assert sorted(first["methods"]) == ["lora-c", "perpcs"] and list(second["methods"]) == \
        ["perpcs"]
    assert summary["reference"]["score"] == first["methods"]["lora-c"]["metrics"]["mae"]
    # the same collective users at both points, those of pfl eval --sharers 1: one sharer
    # more must not move a collective user (the settings record the run they come from)
    assert first["settings"]["sharer_slots"] == second["settings"]["sharer_slots"] == 1
    assert (out / "sharers.png").stat().st_size > 0 and "stage 1 only" in capsys.readouterr().out
    assert "mae" in (out / "sharers.md").read_text()

    def no_rerun(*args, **kwargs):
        raise AssertionError("a finished point was evaluated again")

    monkeypatch.setattr(study, "run_eval", no_rerun)  # resuming keeps both points
    assert main(["study", "sharers", "--values", "1,2", "--sharers", "1", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), *FAST]) == 0


def test_study_values_are_checked(tmp_path):
    from simulations.evaluate import EvalConfig
    from simulations.study import study_points
    from shared.errors import PflError

    config = EvalConfig(task="synthetic")
    with pytest.raises(PflError, match="not in"):
        study_points("sharing-ratio", ["1.5"], config)
    with pytest.raises(PflError, match="whole number"):
        study_points("sharers", ["2.5"], config)
    assert study_points("sharing-ratio", ["0.2", "1"], config) == [("0.2", 0.2), ("1", 1.0)]


def test_more_sharers_than_the_eval_run_keep_its_collective_users_and_sharers():
    from shared.data import load_dataset
    from simulations.evaluate import assign_roles

    data = load_dataset("synthetic", None, num_users=30, queries_per_user=1, seed=0)
    ids = lambda users: [u.id for u in users]  # noqa: E731
    run = assign_roles(data, 5, 4, 6, seed=0, validation=3)  # pfl eval --sharers 4 (+ tune)
    for sharers in (2, 4, 7):
        point = assign_roles(data, 5, sharers, 6, seed=0, sharer_slots=4)
        assert ids(point["targets"]) == ids(run["targets"])
        assert ids(point["collective"]) == ids(run["collective"])  # the same stage 1
        assert ids(point["sharers"][:4]) == ids(run["sharers"][:sharers])
        assert len(point["sharers"]) == sharers
        roles = [ids(point[r]) for r in ("targets", "sharers", "collective")]
        assert len(set(sum(roles, []))) == sum(map(len, roles))  # disjoint
    # beyond the run's sharers: the most active users after its collective ones
    assert ids(point["sharers"][4:]) == ids(run["validation"])
