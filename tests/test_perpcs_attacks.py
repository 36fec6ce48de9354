"""PER-PCS under hostile sharers, on the tiny model: what a target assembles by default
(:func:`shared.methods.perpcs.check.assemble_checked`) keeps a hostile sharer's pieces from
changing its answers, where the papers' assembly alone (:func:`assemble`) does not.

The attacks are the ones a sharer can mount from inside every bound the pool checks:

- in-bound: a piece at every (layer, module) with an update norm just under the pool's
  absolute bound (``Limits.max_update_norm``), its gate aimed at the mean module input measured
  on another user's history (what the gates score), so it wins the gates;
- relative: the same aim with updates just under the target's relative bound (the median
  honest norm x ``max_norm_ratio``), which the norm filter cannot see;
- a colluding pair: two sharers with the in-bound pieces.

A target's answers under attack must equal its answers without the attacker or stage 1's.
"""

from __future__ import annotations

import pytest
import torch

from shared.data.synthetic import SyntheticDataset
from shared.methods.perpcs import PerPcsConfig, assemble, rebuild, train_sharer_pieces
from shared.methods.perpcs.check import (assemble_checked, cap_shares, check_recipe,
                                         norm_outliers, split_history)
from shared.methods.perpcs.core import PiecePool
from shared.methods.perpcs.pieces import Piece, updates_installed
from shared.methods.perpcs.recipe import Recipe
from shared.prompts import build_prompt
from shared.serialization import DEFAULT_LIMITS, update_norm
from shared.tasks import SYNTHETIC
from shared.models import LoadedModel, build_tiny_model
from shared.training import TrainConfig, history_examples
from shared.training import train as train_loop
from simulations.bench_poison import aimed_pieces, mean_inputs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

HISTORY = 10
#: the gates' and the check's settings for a tiny random model (the gates need a large lr)
CONFIG = PerPcsConfig(gate_steps=5, gate_lr=1e-2, assembly_batch_size=4, check_items=4)


@pytest.fixture(scope="module")
def trained(tiny):
    """A private copy of the tiny model trained (all weights, 60 steps) on other users'
    synthetic histories: a random model's loss is flat (ln of the vocabulary) and no loss
    check can mean anything on it; this one has learnt the format, as stage 1 has."""
    model = build_tiny_model(len(tiny.tokenizer), seed=0).to(tiny.device)
    data = SyntheticDataset(num_users=16, seed=1, min_history=12, max_history=12)
    examples = [e for i in range(8, 16) for e in history_examples(
        SYNTHETIC, data.user(i).history, tiny.tokenizer, max_prompt_tokens=96)]
    train_loop(model, model.parameters(), examples,
               TrainConfig(lr=3e-3, max_steps=60, epochs=10, batch_size=8),
               tiny.tokenizer.pad_token_id, progress=False)
    model.eval().requires_grad_(False)
    return LoadedModel("tiny-trained", model, tiny.tokenizer, tiny.device)


@pytest.fixture(scope="module")
def world(trained):
    """Three honest sharers (real LoRAs and gates on their own histories), a target, and the
    attacker's proxy user (another user whose history aims the gates)."""
    tiny = trained
    data = SyntheticDataset(num_users=8, seed=0, min_history=HISTORY + 3,
                            max_history=HISTORY + 3)
    users = [data.user(i) for i in range(6)]
    train = TrainConfig(lr=1e-3, max_steps=6, epochs=6, batch_size=4)
    honest = []
    for n, user in enumerate(users[:3]):
        honest += train_sharer_pieces(tiny.model, tiny.tokenizer, SYNTHETIC, user, CONFIG,
                                      train, sharer=f"honest-{n}")
    target, proxy = users[4], users[5]

    def examples(user):
        return history_examples(SYNTHETIC, user.history[-HISTORY:], tiny.tokenizer,
                                max_prompt_tokens=96)

    prompts = [build_prompt(q.input, task=SYNTHETIC) for q in target.queries]
    return {"honest": honest, "target": examples(target), "proxy": examples(proxy),
            "prompts": prompts}


def answers(tiny, recipe: Recipe | None, lookup) -> list[list[int]]:
    """The greedy continuation of each query prompt, 4 tokens (end of text suppressed: the
    tiny random model would often end at once, and 4 tokens show any change)."""
    updates = rebuild(recipe, lookup) if recipe is not None else {}
    out = []
    with updates_installed(tiny.model, updates), torch.no_grad():
        for prompt in world_prompts():
            ids = tiny.tokenizer(prompt, return_tensors="pt").input_ids[:, -96:]
            gen = tiny.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                      pad_token_id=tiny.tokenizer.pad_token_id)
            out.append(gen[0, ids.shape[1]:].tolist())
    return out


_PROMPTS: list = []


def world_prompts() -> list:
    return _PROMPTS


@pytest.fixture(scope="module")
def attack(trained, world):
    """The attacker's aims and the answers of the target without any attacker."""
    tiny = trained
    pad_id = tiny.tokenizer.pad_token_id
    _PROMPTS[:] = world["prompts"]
    aims = mean_inputs(tiny.model, world["honest"], world["proxy"], pad_id, CONFIG)
    honest = PiecePool.of({p.piece_id: p for p in world["honest"]})
    clean = assemble_checked(tiny.model, honest, world["target"], pad_id, CONFIG)
    return {"aims": aims, "pad_id": pad_id, "stage1": answers(tiny, None, {}),
            "clean": answers(tiny, clean, honest.lookup), "clean_recipe": clean}


def attacked(tiny, world, attack, hostile: list[Piece], config=CONFIG):
    """(papers' assembly's answers, its recipe, the default pipeline's answers and recipe)
    with ``hostile`` pieces in the pool."""
    pool = PiecePool.of({p.piece_id: p for p in world["honest"] + hostile})
    select, _ = split_history(world["target"], config)
    plain = assemble(tiny.model, pool.pool, select, attack["pad_id"], config)
    checked = assemble_checked(tiny.model, pool, world["target"], attack["pad_id"], config)
    return (answers(tiny, plain, pool.lookup), plain,
            answers(tiny, checked, pool.lookup), checked)


def share_of(recipe: Recipe, sharers: set) -> float:
    """The mean share of the weight ``sharers`` hold over the recipe's (layer, module)s."""
    shares = [sum(w for pid, w in items if recipe.sources.get(pid) in sharers)
              / max(1e-12, sum(w for _, w in items)) for items in recipe.entries.values()]
    return sum(shares) / max(1, len(shares))


def test_in_bound_attacker_wins_the_gates_but_not_the_checked_assembly(trained, world, attack):
    norm = DEFAULT_LIMITS.max_update_norm * 0.999
    hostile = aimed_pieces(trained.model, "zz-attacker", attack["aims"], norm, seed=1)
    honest_norms = [update_norm(p) for p in world["honest"]]
    assert max(honest_norms) < norm / 100  # the attacker is far outside the honest spread
    plain_answers, plain, checked_answers, checked = attacked(trained, world, attack, hostile)
    # the papers' assembly: the attacker takes over (today's behaviour, kept to show the attack)
    assert share_of(plain, {"zz-attacker"}) > 0.3
    assert plain_answers != attack["stage1"] and plain_answers != attack["clean"]
    # the default pipeline: none of its pieces is used, the answers are unchanged
    assert share_of(checked, {"zz-attacker"}) == 0.0
    assert checked_answers in (attack["clean"], attack["stage1"])
    assert checked.config["check"]["outcome"] in ("kept", "pruned", "refused")


def test_colluding_pair_is_kept_out(trained, world, attack):
    norm = DEFAULT_LIMITS.max_update_norm * 0.999
    hostile = (aimed_pieces(trained.model, "zz-attacker-1", attack["aims"], norm, seed=2)
               + aimed_pieces(trained.model, "zz-attacker-2", attack["aims"], norm, seed=3))
    plain_answers, plain, checked_answers, checked = attacked(trained, world, attack, hostile)
    assert share_of(plain, {"zz-attacker-1", "zz-attacker-2"}) > 0.5
    assert plain_answers != attack["clean"]
    assert share_of(checked, {"zz-attacker-1", "zz-attacker-2"}) == 0.0
    assert checked_answers in (attack["clean"], attack["stage1"])


def test_attacker_under_the_relative_bound_is_pruned_or_refused_by_the_held_out_check(
        trained, world, attack):
    """Pieces just under the relative bound pass the norm filter; what stops them is the
    held-out loss check (they raise the target's loss), or the share cap."""
    honest = {}
    for p in world["honest"]:
        honest.setdefault(p.key, []).append(update_norm(p))
    median = sorted(n for ns in honest.values() for n in ns)[len(world["honest"]) // 2]
    norm = median * CONFIG.max_norm_ratio * 0.9
    hostile = aimed_pieces(trained.model, "zz-attacker", attack["aims"], norm, seed=4)
    plain_answers, plain, checked_answers, checked = attacked(trained, world, attack, hostile)
    assert share_of(plain, {"zz-attacker"}) > 0.3
    assert not norm_outliers(world["honest"] + hostile, CONFIG.max_norm_ratio) >= \
        {p.piece_id for p in hostile}  # the norm filter alone does not catch them all
    assert checked_answers in (attack["clean"], attack["stage1"])
    assert share_of(checked, {"zz-attacker"}) <= CONFIG.max_sharer_share + 1e-3


def test_norm_outliers_are_relative_to_the_median_at_their_layer_and_module():
    def piece(sharer, norm, layer=0):
        A = torch.zeros(1, 4)
        A[0, 0] = 1.0
        B = torch.zeros(4, 1)
        B[0, 0] = norm
        return Piece(sharer, layer, "q_proj", A, B, 1.0, torch.ones(4))

    pieces = [piece("a", 1.0), piece("b", 1.2), piece("c", 0.9), piece("d", 12.5),
              piece("e", 50.0, layer=1), piece("f", 1.0, layer=1)]  # layer 1: too few
    assert norm_outliers(pieces, 10.0) == {pieces[3].piece_id}
    assert norm_outliers(pieces, 20.0) == set()
    assert norm_outliers(pieces, 0) == set()


def test_share_cap_cuts_one_sharer_where_several_were_selected():
    recipe = Recipe({(0, "q_proj"): (("a" * 64, 0.8), ("b" * 64, 0.2)),
                     (1, "q_proj"): (("c" * 64, 1.0),)},
                    sources={"a" * 64: "s1", "b" * 64: "s2", "c" * 64: "s1"})
    capped = cap_shares(recipe, 0.5)
    assert dict(capped.entries[(0, "q_proj")]) == pytest.approx({"a" * 64: 0.5, "b" * 64: 0.2},
                                                                abs=1e-3)
    assert capped.entries[(1, "q_proj")] == recipe.entries[(1, "q_proj")]  # one sharer there
    assert cap_shares(recipe, 1.0) == recipe


def test_check_refuses_a_recipe_worse_than_stage1_and_falls_back_to_it(trained, world, attack):
    """A recipe made only of a hostile sharer's pieces cannot be pruned (one sharer): it is
    refused, the empty recipe round-trips through the compact form and rebuilds stage 1."""
    hostile = aimed_pieces(trained.model, "zz", attack["aims"], 5.0, seed=5)
    recipe = Recipe({p.key: ((p.piece_id, 1.0),) for p in hostile},
                    sources={p.piece_id: "zz" for p in hostile})
    _, held = split_history(world["target"], CONFIG)
    lookup = {p.piece_id: p for p in hostile}
    out = check_recipe(trained.model, recipe, lookup, held, attack["pad_id"], CONFIG)
    check = out.config["check"]
    assert check["outcome"] == "refused" and check["loss"] > check["stage1_loss"]
    assert not out.entries and rebuild(out, {}) == {}
    again = Recipe.from_compact(out.to_compact(), {})
    assert not again.entries
    assert answers(trained, out, {}) == attack["stage1"]


def test_split_holds_out_the_latest_items_and_at_most_half(world):
    examples = world["target"]
    select, held = split_history(examples, CONFIG)
    assert len(held) == 4 and list(select) + list(held) == list(examples)
    _, held = split_history(examples[:5], CONFIG)
    assert len(held) == 2
    select, held = split_history(examples[:1], CONFIG)
    assert len(held) == 0 and len(select) == 1
    select, held = split_history(examples, PerPcsConfig(check_items=0))
    assert len(held) == 0


def test_loss_routing_is_checked_too(trained, world, attack):
    """Loss routing picks the sharer whose pieces fit the selection items; the in-bound
    attacker is left out by the norm filter before it is even scored."""
    norm = DEFAULT_LIMITS.max_update_norm * 0.999
    hostile = aimed_pieces(trained.model, "zz-attacker", attack["aims"], norm, seed=6)
    config = PerPcsConfig(**{**CONFIG.to_dict(), "routing": "loss"})
    pool = PiecePool.of({p.piece_id: p for p in world["honest"] + hostile})
    recipe = assemble_checked(trained.model, pool, world["target"], attack["pad_id"], config)
    assert recipe.config["check"]["norm_outliers"] == len(hostile)
    assert "zz-attacker" not in set(recipe.sources.values())
    assert "zz-attacker" not in recipe.config["losses"]


def test_pool_oracle_keeps_the_sharer_whose_answers_score_best(small_world):
    """``perpcs-oracle`` (a labelled cheating ceiling): each target's answers are those of the
    single sharer whose answers to its queries score best against their gold answers."""
    from shared.generation import GenerationConfig
    from shared.methods.base import PersonalState, PromptAugmentation, augmented_prompts
    from shared.metrics import evaluate
    from simulations.references import PoolOracle

    runtime, roles, _ = small_world
    oracle = PoolOracle()
    generation = GenerationConfig(max_new_tokens=4)
    for user in roles["targets"]:
        state = oracle.personalize(runtime, user, PromptAugmentation(), None)
        prompts = augmented_prompts(runtime, user, PromptAugmentation(), None)
        golds = [q.gold for q in user.queries]
        chosen = oracle.answer(runtime, state, prompts, generation)
        scores = {}
        for sharer, recipe in state.payload["recipes"].items():
            answers = super(PoolOracle, oracle).answer(
                runtime, PersonalState(payload=recipe), prompts, generation)
            scores[sharer] = (evaluate(runtime.task, answers, golds)["mae"], answers)
        assert len(scores) == len(roles["sharers"])  # every sharer was tried
        best = min(scores, key=lambda s: (scores[s][0], s))
        assert state.info["sharer"] == best and chosen == scores[best][1]



def adaptive_pieces(tiny, mode: str, lr: float, steps: int) -> list[Piece]:
    """An attacker that knows the defence: a real LoRA (honest norms, so no norm filter
    sees it) trained on the proxy user's history with the true ratings, which lowers the
    loss on a similar target's items, and on the same items with poisoned ratings
    (``flip``: 6 - r; ``const1``: always 1), which pushes the answers elsewhere."""
    from dataclasses import replace

    from shared.types import HistoryItem

    data = SyntheticDataset(num_users=8, seed=0, min_history=HISTORY + 3,
                            max_history=HISTORY + 3)
    proxy = data.user(5)
    items = []
    for item in proxy.history:
        rating = int(float(item["score"]))
        bad = str(6 - rating) if mode == "flip" else "1"
        items += [item, HistoryItem(item.id + "-poison", {**item.fields, "score": bad})]
    user = replace(proxy, id="adaptive", history=tuple(items))
    return train_sharer_pieces(tiny.model, tiny.tokenizer, SYNTHETIC, user, CONFIG,
                               TrainConfig(lr=lr, max_steps=steps, epochs=steps, batch_size=4),
                               sharer="zz-adaptive")


@pytest.mark.parametrize("mode, lr, steps", [("flip", 1e-3, 6), ("flip", 1e-2, 40),
                                             ("const1", 1e-3, 6), ("const1", 1e-2, 40)])
def test_an_adaptive_attacker_does_not_move_the_shipped_default(trained, world, attack,
                                                                mode, lr, steps):
    """Loss routing with the check (the shipped default): the adaptive attacker is never the
    sharer chosen, and the target's answers are those without it. (With the papers' gates
    and the same check, this attacker keeps up to 41% of the weight in some of these
    settings and changes the answers while passing the check: a sharer whose pieces fit the
    held-out items cannot be told from an honest one by loss; docs/threat-model.md.)"""
    hostile = adaptive_pieces(trained, mode, lr, steps)
    config = PerPcsConfig(**{**CONFIG.to_dict(), "routing": "loss"})
    honest = PiecePool.of({p.piece_id: p for p in world["honest"]})
    pool = PiecePool.of({p.piece_id: p for p in world["honest"] + hostile})
    clean = assemble_checked(trained.model, honest, world["target"], attack["pad_id"], config)
    recipe = assemble_checked(trained.model, pool, world["target"], attack["pad_id"], config)
    assert "zz-adaptive" in recipe.config["losses"]  # scored, not filtered out
    assert "zz-adaptive" not in set(recipe.sources.values())
    assert answers(trained, recipe, pool.lookup) in (
        answers(trained, clean, honest.lookup), attack["stage1"])
