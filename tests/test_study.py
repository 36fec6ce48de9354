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
    assert main(["study", "sharers", "--values", "1,2", "--out", str(out),
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
    # the same collective users at both points: the stage-1 rows are equal (one sharer more
    # must not move a collective user), which the settings record as the reserved slots
    assert first["settings"]["sharer_slots"] == second["settings"]["sharer_slots"] == 2
    assert (out / "sharers.png").stat().st_size > 0 and "stage 1 only" in capsys.readouterr().out
    assert "mae" in (out / "sharers.md").read_text()

    def no_rerun(*args, **kwargs):
        raise AssertionError("a finished point was evaluated again")

    monkeypatch.setattr(study, "run_eval", no_rerun)  # resuming keeps both points
    assert main(["study", "sharers", "--values", "1,2", "--out", str(out),
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
