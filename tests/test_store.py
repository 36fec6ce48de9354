"""The trained-state store (shared.methods.store): stage 1 and PerFit stage 1 are trained once
per set of (model, users, examples, settings) and read back by later runs, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from shared.data import load_dataset
from shared.generation import GenerationConfig
from shared.methods import parse_method
from shared.methods import store
from shared.methods.base import Runtime
from shared.methods.oppu import core as oppu_core
from shared.methods.perfit import core as perfit_core
from simulations.evaluate import evaluate_method


@pytest.fixture
def synthetic():
    return load_dataset("synthetic", None, num_users=6, seed=0)


def _runtime(tiny, dataset, folder, *, collective=(2, 3), **options):
    opts = {"max_history": 6, "stage1": {"max_steps": 2},
            "stage1_epochs": 1, **options}
    rt = Runtime(loaded=tiny, task=dataset.task, seed=0, progress=False, options=opts,
                 roles={"collective": [dataset.user(i) for i in collective]})
    rt.cache.state_store = folder
    return rt


def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _no_training(*args, **kwargs):
    raise AssertionError("trained again")


def test_stage1_is_read_back_and_trained_again_when_what_it_depends_on_changes(
        tmp_path, tiny, synthetic, monkeypatch):
    first = _weights(oppu_core.stage1_model(_runtime(tiny, synthetic, tmp_path)))
    assert len(list(tmp_path.glob("*.npz"))) == 1 and len(list(tmp_path.glob("*.json"))) == 1

    monkeypatch.setattr(oppu_core, "train_stage1_lora", _no_training)
    again = _weights(oppu_core.stage1_model(_runtime(tiny, synthetic, tmp_path)))
    assert again.keys() == first.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], tiny.model.state_dict()[k]) for k in first)

    for changed in ({"collective": (2, 4)}, {"max_history": 5},
                    {"stage1": {"max_steps": 2, "lr": 2e-3}}):
        with pytest.raises(AssertionError, match="trained again"):
            oppu_core.stage1_model(_runtime(tiny, synthetic, tmp_path, **changed))


def test_an_incomplete_entry_is_trained_again(tmp_path, tiny, synthetic):
    oppu_core.stage1_model(_runtime(tiny, synthetic, tmp_path))
    [entry] = tmp_path.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])  # cut short: unreadable
    rt = _runtime(tiny, synthetic, tmp_path)
    oppu_core.stage1_model(rt)  # trains instead of failing
    assert store.load_state(tmp_path, entry.stem) is not None  # and keeps a good copy


def test_perfit_stage1_is_read_back_the_same(tmp_path, tiny, synthetic, monkeypatch):
    s1, s2 = perfit_core.perfit_stage1(_runtime(tiny, synthetic, tmp_path))
    monkeypatch.setattr(perfit_core, "train_stage1", _no_training)
    r1, r2 = perfit_core.perfit_stage1(_runtime(tiny, synthetic, tmp_path))
    for a, b in ((s1, r1), (s2, r2)):
        left, right = a.export_arrays(), b.export_arrays()
        assert left.keys() == right.keys()
        assert all((left[k] == right[k]).all() for k in left)
    with pytest.raises(AssertionError, match="trained again"):
        perfit_core.perfit_stage1(_runtime(tiny, synthetic, tmp_path,
                                           perfit={"lr": 5e-3}))


def test_without_a_store_nothing_is_written(tmp_path, tiny, synthetic):
    rt = _runtime(tiny, synthetic, tmp_path)
    rt.cache.state_store = None
    oppu_core.stage1_model(rt)
    assert not list(tmp_path.iterdir())


def test_perfit_personal_stage_is_kept_per_user(tmp_path, tiny, synthetic, monkeypatch):
    core = perfit_core.PersonalShift()
    options = {"perfit": {"epochs": 1.0}}
    rt = _runtime(tiny, synthetic, tmp_path, **options)
    first = core.personalize(rt, synthetic.user(0), None, None)
    other = core.personalize(rt, synthetic.user(1), None, None)
    assert len(list(tmp_path.glob("*.npz"))) == 3  # stage 1 + one per user

    monkeypatch.setattr(perfit_core, "train_stage2", _no_training)
    again = core.personalize(_runtime(tiny, synthetic, tmp_path, **options),
                             synthetic.user(0), None, None)
    left, right = first.payload.export_arrays(), again.payload.export_arrays()
    assert left.keys() == right.keys() and all((left[k] == right[k]).all() for k in left)
    assert any((left[k] != other.payload.export_arrays()[k]).any() for k in left)
    assert again.params == first.params and again.info == first.info
    for changed in ({"perfit": {"epochs": 1.0, "lr": 5e-3}},  # the recipe (both stages)
                    {**options, "max_history": 5}):  # the user's examples
        with pytest.raises(AssertionError, match="trained again"):
            core.personalize(_runtime(tiny, synthetic, tmp_path, **changed),
                             synthetic.user(0), None, None)


def test_oppu_personal_lora_is_kept_per_user_and_stage1(tmp_path, tiny, synthetic, monkeypatch):
    from shared.methods.base import PromptAugmentation

    core = oppu_core.PersonalLora()
    options = {"oppu": {"max_steps": 2}}
    plain = PromptAugmentation()
    first = core.personalize(_runtime(tiny, synthetic, tmp_path, **options), synthetic.user(0),
                             plain, None)
    monkeypatch.setattr(oppu_core, "train_personal_lora", _no_training)
    again = core.personalize(_runtime(tiny, synthetic, tmp_path, **options), synthetic.user(0),
                             plain, None)
    assert first.payload.keys() == again.payload.keys()
    assert all(torch.equal(first.payload[k], again.payload[k]) for k in first.payload)
    assert any(first.payload[k].abs().sum() > 0 for k in first.payload if "lora_B" in k)
    for changed, user in (({"oppu": {"max_steps": 2, "lr": 5e-3}}, 0),  # the recipe
                          ({**options, "stage1": {"max_steps": 1}}, 0),  # another stage 1
                          (options, 1)):  # another user
        with pytest.raises(AssertionError, match="trained again"):
            core.personalize(_runtime(tiny, synthetic, tmp_path, **changed),
                             synthetic.user(user), plain, None)


def test_a_resumed_evaluation_reports_the_training_time_of_what_it_read_back(
        tmp_path, tiny, synthetic, monkeypatch):
    """Per-user seconds in a results file are what personalizing a user costs: a resumed run
    that reads each user's LoRA back must not report the milliseconds the read took."""
    options = {"oppu": {"max_steps": 2}}
    spec, targets = parse_method("oppu"), [synthetic.user(0), synthetic.user(1)]
    generation = GenerationConfig(max_new_tokens=2, batch_size=4)
    evaluate_method(_runtime(tiny, synthetic, tmp_path, **options), spec, synthetic, targets,
                    {}, 0.0, generation)
    kept = [json.loads(p.read_text())["stats"] for p in tmp_path.glob("*.json")]
    trained = [k["train_seconds"] for k in kept if k.get("users") == 1]
    assert len(trained) == 2 and all(t > 0 for t in trained)
    monkeypatch.setattr(oppu_core, "train_personal_lora", _no_training)
    resumed = evaluate_method(_runtime(tiny, synthetic, tmp_path, **options), spec, synthetic,
                              targets, {}, 0.0, generation)
    assert resumed["seconds_per_user"] >= sum(trained) / 2
