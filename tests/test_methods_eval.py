"""Every method core through the in-process evaluation, on the tiny model."""

import hashlib
import json

import pytest

from shared.data import load_dataset
from shared.methods.base import parse_method
from simulations.evaluate import EvalConfig, assign_roles, run_eval


def checksum(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def test_roles_are_disjoint_reproducible_and_sharers_most_active():
    dataset = load_dataset("synthetic", None, num_users=40)
    roles = assign_roles(dataset, targets=5, sharers=4, collective=6, seed=3)
    ids = {k: [u.id for u in v] for k, v in roles.items()}
    assert [len(ids[k]) for k in ("targets", "sharers", "collective")] == [5, 4, 6]
    assert not set(ids["targets"]) & set(ids["sharers"])
    assert not (set(ids["targets"]) | set(ids["sharers"])) & set(ids["collective"])
    assert ids == {k: [u.id for u in v] for k, v in
                   assign_roles(dataset, 5, 4, 6, seed=3).items()}
    non_targets = [u for u in dataset.users() if u.id not in ids["targets"]]
    most = sorted(len(u.history) for u in non_targets)[-4:]
    assert sorted(len(u.history) for u in roles["sharers"]) == most


def test_method_names_compose_core_and_prompt_augmentation():
    spec = parse_method("oppu+rag1")
    assert spec.core == "oppu" and spec.augmentation.k == 1
    assert parse_method("pag+perfit").augmentation.profile
    assert parse_method("perpcs").core == "perpcs"


ALL = ["nonpersonalized", "lora-c", "lora-p", "oppu", "perpcs", "peft-retrieval", "perfit",
       "perfit-c", "oppu+rag1", "perfit+pag"]


@pytest.fixture(scope="module")
def results(tmp_path_factory, test_device):
    from shared.models import load_model

    base = load_model("tiny", device=test_device).model
    before = checksum(base)
    config = EvalConfig(task="synthetic", methods=ALL, model="tiny", users=2, device=test_device,
                        sharers=2, collective=3, max_history=8, stage1_epochs=1,
                        personal_epochs=1, progress=False,
                        options={"perpcs": {"gate_steps": 5}, "perfit": {"epochs": 1}})
    out = run_eval(config)
    assert checksum(base) == before, "personalization changed the shared base weights"
    return out


def test_every_method_is_scored_with_costs(results):
    assert list(results["methods"]) == ALL
    assert results["sharers"] == 2 and results["collective_users"] == 3
    for name, r in results["methods"].items():
        assert set(r["metrics"]) == {"mae", "rmse", "valid"}, name
        assert r["seconds_per_user"] >= 0
    json.dumps(results)  # the results are JSON-able


def test_storage_per_user_orders_as_the_papers_say(results):
    m = results["methods"]
    assert m["nonpersonalized"]["bytes_per_user"] == 0 and m["lora-c"]["params_per_user"] == 0
    assert m["perfit-c"]["bytes_per_user"] == 0 < m["perfit"]["bytes_per_user"]
    assert m["oppu"]["params_per_user"] == m["lora-p"]["params_per_user"] > 0
    # tiny: q,v of 4 layers, r=8, d=64 (q out 64, v out 32): 8*(64+64)*4 + 8*(64+32)*4
    assert m["oppu"]["params_per_user"] == 8 * (64 + 64) * 4 + 8 * (64 + 32) * 4
    assert m["oppu"]["bytes_per_user"] == 4 * m["oppu"]["params_per_user"]
    # PerFit personal rank 4 at one layer: r * (2d + 1)
    assert m["perfit"]["params_per_user"] == 4 * (2 * 64 + 1)
    # a PER-PCS recipe is piece ids and weights: far smaller than the pieces themselves
    assert 0 < m["perpcs"]["bytes_per_user"] < m["oppu"]["bytes_per_user"]
