"""PER-PCS: LoRA pieces, gates, auto-regressive assembly, recipes, retrieval baseline."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from shared.data.synthetic import SyntheticDataset
from shared.errors import PflError
from shared.methods.perpcs import (PerPcsConfig, Recipe, assemble, peft_retrieval_recipe,
                                   rebuild, retrieve_sharers, select_shared_pieces,
                                   select_sharers_from_clusters, select_sharers_kmeans,
                                   select_sharers_most_active, train_gates)
from shared.methods.perpcs.assembly import scoring_mask
from shared.methods.perpcs.pieces import (ATTENTION_MODULES, LoraUpdate, Piece, PieceLinear,
                                        combine_factors, combine_sum_of_products, gated_delta,
                                        get_module, peft_state_dict_from_pieces,
                                        pieces_from_peft_state_dict, pieces_installed,
                                        updates_installed)
from shared.models import build_tiny_model
from shared.serialization import Gate
from shared.tasks import SYNTHETIC
from shared.training import TrainConfig, batches, history_examples, train

LORA_R, LORA_ALPHA = 4, 8
SCALING = LORA_ALPHA / LORA_R


# ------------------------------------------------------------------------ helpers
def user_examples(tokenizer, index: int, n: int = 8):
    user = SyntheticDataset(num_users=8, seed=0, min_history=n, max_history=n).user(index)
    return history_examples(SYNTHETIC, user.history[:n], tokenizer, max_prompt_tokens=96)


def random_pieces(model, sharer: str, seed: int, *, r: int = 2, b_scale: float = 0.5,
                  gated: bool = True) -> list[Piece]:
    """Random pieces for every (layer, attention module) of ``model`` (shapes from it)."""
    gen = torch.Generator().manual_seed(seed)
    pieces = []
    for layer in range(model.config.num_hidden_layers):
        for module in ATTENTION_MODULES:
            d_out, d_in = get_module(model, (layer, module)).weight.shape
            A = torch.randn(r, d_in, generator=gen) / d_in ** 0.5
            B = torch.randn(d_out, r, generator=gen) * b_scale
            gate = torch.randn(d_in, generator=gen) if gated else None
            pieces.append(Piece(sharer, layer, module, A, B, 1.0, gate))
    return pieces


def logits(model, batch):
    """The model's final hidden states (what the LM head reads; cheaper than all logits)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model.get_decoder()(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device)
                                   ).last_hidden_state


def first_batch(examples, pad_id, size=4, device="cpu"):
    return next(batches(examples, size, pad_id, shuffle=False, device=device))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pad_id(tiny):
    return tiny.tokenizer.pad_token_id


@pytest.fixture(scope="module")
def sharer_lora(tiny, pad_id):
    """A real peft LoRA (q,k,v,o) trained briefly on a sharer's history, on a private copy of
    the tiny model (same seed, so the same base weights as the shared one)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    private = build_tiny_model(len(tiny.tokenizer), seed=0).to(tiny.device)
    peft_model = get_peft_model(private, LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(ATTENTION_MODULES)))
    examples = user_examples(tiny.tokenizer, 0)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    train(peft_model, params, examples, TrainConfig(lr=2e-2, max_steps=20, epochs=20,
                                                     batch_size=4), pad_id, progress=False)
    peft_model.eval()
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    return peft_model, state, examples


@pytest.fixture(scope="module")
def gated(tiny, pad_id, sharer_lora):
    """Gate training of the sharer's pieces (done once for several tests)."""
    _, state, examples = sharer_lora
    pieces = pieces_from_peft_state_dict(state, SCALING, "sharer-0")
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    config = PerPcsConfig(gate_steps=30, gate_lr=2e-2)
    result = train_gates(tiny.model, pieces, examples, pad_id, config)
    return pieces, result, before


# --------------------------------------------------------------------------- pieces
def test_zero_gate_scales_a_piece_by_exactly_half():
    gen = torch.Generator().manual_seed(1)
    piece = Piece("s", 0, "q_proj", torch.randn(3, 16, generator=gen),
                  torch.randn(8, 3, generator=gen), 2.0)
    x = torch.randn(2, 5, 16, generator=gen)
    ungated = gated_delta(x, piece)
    half = gated_delta(x, piece.with_gate(torch.zeros(16)))
    assert torch.equal(half, 0.5 * ungated)
    assert not torch.equal(half, ungated)
    # The same through the module wrapper: base(x) + 0.5 * delta, bit for bit.
    base = torch.nn.Linear(16, 8, bias=False)
    wrapper = PieceLinear(base)
    wrapper.add_piece(piece.with_gate(torch.zeros(16)))
    with torch.no_grad():
        assert torch.equal(wrapper(x), base(x) + 0.5 * ungated)


def test_piece_ids_are_stable_and_change_with_any_byte():
    A = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 8
    B = torch.arange(8, dtype=torch.float32).reshape(4, 2) / 4
    piece = Piece("alice", 1, "v_proj", A, B, 2.0, torch.ones(3))
    # Fixed across runs and machines (a canonical encoding, not Python's hash).
    assert piece.piece_id == EXPECTED_ID
    assert Piece("bob", 1, "v_proj", A.clone(), B.clone(), 2.0, torch.ones(3)).piece_id == EXPECTED_ID
    flipped = A.clone()
    flipped.view(torch.uint8)[0, 0] ^= 1  # one bit of one byte
    variants = [
        Piece("alice", 1, "v_proj", flipped, B, 2.0, torch.ones(3)),
        Piece("alice", 2, "v_proj", A, B, 2.0, torch.ones(3)),
        Piece("alice", 1, "k_proj", A, B, 2.0, torch.ones(3)),
        Piece("alice", 1, "v_proj", A, B, 1.0, torch.ones(3)),
        Piece("alice", 1, "v_proj", A, B, 2.0, None),
        Piece("alice", 1, "v_proj", A, B, 2.0, torch.ones(3) * 2),
        Piece("alice", 1, "v_proj", A.double(), B.double(), 2.0, torch.ones(3)),
        Piece("alice", 1, "v_proj", A.reshape(3, 2).t().contiguous().reshape(2, 3), B, 2.0,
              torch.ones(3)),
    ]
    ids = {v.piece_id for v in variants}
    assert EXPECTED_ID not in ids and len(ids) == len(variants)
    # A piece is an immutable copy: mutating the source tensor does not change it.
    A2 = A.clone()
    p2 = Piece("alice", 1, "v_proj", A2, B, 2.0, torch.ones(3))
    A2.mul_(3)
    assert p2.piece_id == EXPECTED_ID


EXPECTED_ID = "d59d586678f163abbff83d323eb88a0fb83d4b8757272f27b240f4313b512726"


def test_peft_state_dict_round_trip_and_same_math_as_peft(tiny, pad_id, sharer_lora):
    peft_model, state, examples = sharer_lora
    pieces = pieces_from_peft_state_dict(state, SCALING, "sharer-0")
    assert len(pieces) == tiny.num_layers * len(ATTENTION_MODULES)
    back = peft_state_dict_from_pieces(pieces)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert any(p.B.abs().sum() > 0 for p in pieces)  # B trained away from peft's zero init
    # The pieces, ungated, on the shared base model compute what peft computes.
    batch = first_batch(examples, pad_id)
    with pieces_installed(tiny.model, pieces):
        ours = logits(tiny.model, batch)
    theirs = logits(peft_model, batch)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours, logits(tiny.model, batch), atol=1e-4)


def test_combinations_differ_and_sum_of_products_is_exact():
    A1, B1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [1.0]])
    A2, B2 = torch.tensor([[-2.0, 1.0]]), torch.tensor([[1.0], [4.0]])
    p1, p2 = Piece("a", 0, "q_proj", A1, B1, 2.0), Piece("b", 0, "q_proj", A2, B2, 0.5)
    w = [0.25, 0.75]
    sop = combine_sum_of_products([p1, p2], w)
    assert sop.rank == 2
    assert torch.equal(sop.delta_weight(), 0.25 * 2.0 * (B1 @ A1) + 0.75 * 0.5 * (B2 @ A2))
    fac = combine_factors([p1, p2], w)
    assert fac.rank == 1
    assert torch.equal(fac.delta_weight(),
                       (0.25 * B1 + 0.75 * B2) @ (0.25 * 2.0 * A1 + 0.75 * 0.5 * A2))
    assert not torch.allclose(sop.delta_weight(), fac.delta_weight())
    x = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    assert torch.equal(sop(x), x @ sop.delta_weight().t())


def test_install_uninstall_restores_the_exact_model(tiny, pad_id):
    model = tiny.model
    batch = first_batch(user_examples(tiny.tokenizer, 2), pad_id)
    originals = {key: get_module(model, key) for key in [(l, m) for l in range(tiny.num_layers)
                                                         for m in ATTENTION_MODULES]}
    before = logits(model, batch)
    pieces = random_pieces(model, "s", seed=3)
    with pieces_installed(model, pieces) as installed:
        assert isinstance(get_module(model, (0, "q_proj")), PieceLinear)
        assert len(installed) == len(originals)
        assert not torch.allclose(logits(model, batch), before, atol=1e-4)
    assert all(get_module(model, k) is m for k, m in originals.items())
    assert torch.equal(logits(model, batch), before)
    with pytest.raises(RuntimeError, match="boom"):
        with updates_installed(model, {(1, "o_proj"): LoraUpdate(torch.ones(1, 64),
                                                                 torch.ones(64, 1))}):
            raise RuntimeError("boom")
    assert all(get_module(model, k) is m for k, m in originals.items())
    assert torch.equal(logits(model, batch), before)


# ---------------------------------------------------------------------------- gates
def test_gate_training_changes_only_gates_and_lowers_the_loss(tiny, gated):
    pieces, result, before = gated
    assert result.steps == 30
    assert result.loss_after < result.loss_before
    assert len(result.pieces) == len(pieces)
    for old, new in zip(pieces, result.pieces):
        assert new.key == old.key and new.sharer == old.sharer
        assert torch.equal(new.A, old.A) and torch.equal(new.B, old.B)
        assert new.scaling == old.scaling and new.gate is not None
        assert new.gate.shape == (old.d_in,) and new.gate.abs().sum() > 0
        assert new.piece_id != old.piece_id
    for name, param in tiny.model.named_parameters():
        assert torch.equal(param, before[name]), name
        assert not param.requires_grad
    assert not any(isinstance(m, PieceLinear) for m in tiny.model.modules())


def test_sharing_ratio_picks_a_deterministic_subset(tiny):
    pieces = random_pieces(tiny.model, "s", seed=4)
    half = select_shared_pieces(pieces, 0.5, seed=0)
    assert len(half) == len(pieces) // 2
    assert [p.piece_id for p in half] == [p.piece_id for p in select_shared_pieces(
        list(reversed(pieces)), 0.5, seed=0)]
    assert {p.piece_id for p in half} != {p.piece_id for p in select_shared_pieces(
        pieces, 0.5, seed=1)}
    assert len(select_shared_pieces(pieces, 1.0)) == len(pieces)
    assert len(select_shared_pieces(pieces, 0.01)) == 1


# ------------------------------------------------------------------------- assembly
def test_one_sharer_k1_reproduces_the_sharers_adapter(tiny, pad_id, gated):
    _, result, _ = gated
    target = user_examples(tiny.tokenizer, 5, n=6)
    for combination in ("sum_of_products", "factors"):
        config = PerPcsConfig(top_k=1, combination=combination, assembly_batch_size=4)
        recipe = assemble(tiny.model, result.pieces, target, pad_id, config)
        assert recipe.config["batches"] == 2
        by_id = {p.piece_id: p for p in result.pieces}
        assert len(recipe.entries) == len(result.pieces)
        for key, items in recipe.entries.items():
            assert len(items) == 1 and items[0][1] == 1.0
            assert by_id[items[0][0]].key == key
        updates = rebuild(recipe, by_id)
        for piece in result.pieces:
            assert torch.equal(updates[piece.key].delta_weight(), piece.delta_weight())
    assert not any(isinstance(m, PieceLinear) for m in tiny.model.modules())


def test_recipe_is_small_and_rebuilds_bit_for_bit(tiny, pad_id):
    pool = [p for s in range(3) for p in random_pieces(tiny.model, f"s{s}", seed=10 + s)]
    target = user_examples(tiny.tokenizer, 3, n=6)
    recipe = assemble(tiny.model, pool, target, pad_id, PerPcsConfig(top_k=2))
    entries = list(recipe.entries.values())
    assert all(len(items) >= 2 for items in entries)
    # softmax weights, stored as float16 values: they sum to 1 within float16 precision
    assert all(abs(sum(w for _, w in items) - 1.0) < 2e-3 for items in entries)
    data = recipe.to_bytes()
    assert len(data) < 20_000  # bytes, not megabytes (the pool holds ~48 pieces here)
    again = Recipe.from_bytes(data)
    assert again == recipe and again.to_bytes() == data
    lookup = {p.piece_id: p for p in pool}
    original, rebuilt = rebuild(recipe, lookup), rebuild(again, lookup.get)
    assert original.keys() == rebuilt.keys()
    for key in original:
        assert torch.equal(original[key].A, rebuilt[key].A)
        assert torch.equal(original[key].B, rebuilt[key].B)
    batch = first_batch(target, pad_id)
    with updates_installed(tiny.model, original):
        first = logits(tiny.model, batch)
    with updates_installed(tiny.model, rebuilt):
        assert torch.equal(logits(tiny.model, batch), first)
    # A missing or substituted piece is refused.
    missing = next(iter(recipe.piece_ids()))
    with pytest.raises(PflError, match="not in the pool"):
        rebuild(recipe, {k: v for k, v in lookup.items() if k != missing})
    wrong = dict(lookup)
    wrong[missing] = pool[0] if pool[0].piece_id != missing else pool[1]
    with pytest.raises(PflError):
        rebuild(recipe, wrong)
    with pytest.raises(PflError):
        Recipe.from_bytes(b'{"format": "something else"}')


def test_assembly_is_autoregressive(tiny, pad_id):
    """Layer 1 is scored on activations that include layer 0's assembled update."""
    pool = [p for s in range(3) for p in random_pieces(tiny.model, f"s{s}", seed=20 + s,
                                                       b_scale=2.0)]
    target = user_examples(tiny.tokenizer, 4, n=4)
    # one batch: the recipe is that batch's selection
    batch = first_batch(target, pad_id, device=tiny.device)
    mask = scoring_mask(batch)
    seen = {}

    def record(mode):
        def on_score(layer, module, inputs, alphas, ids):
            seen[(mode, layer, module)] = inputs.clone()
        return on_score

    config = PerPcsConfig(top_k=2, assembly_batch_size=len(target))
    recipe = assemble(tiny.model, pool, target, pad_id, config, on_score=record("ar"))
    flat = PerPcsConfig(top_k=2, assembly_batch_size=len(target), autoregressive=False)
    assemble(tiny.model, pool, target, pad_id, flat, on_score=record("flat"))

    def q_input_at_layer1(updates):
        captured = {}

        def hook(module, args):
            captured["x"] = args[0][mask].float()

        handle = get_module(tiny.model, (1, "q_proj")).register_forward_pre_hook(hook)
        try:
            with updates_installed(tiny.model, updates), torch.no_grad():
                tiny.model.get_decoder()(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"])
        finally:
            handle.remove()
        return captured["x"]

    layer0 = {k: u for k, u in rebuild(recipe, {p.piece_id: p for p in pool}).items()
              if k[0] == 0}
    assert len(layer0) == len(ATTENTION_MODULES)
    with_layer0, plain = q_input_at_layer1(layer0), q_input_at_layer1({})
    assert not torch.allclose(with_layer0, plain, atol=1e-3)  # layer 0 matters here
    assert torch.allclose(seen[("ar", 1, "q_proj")], with_layer0, atol=1e-6)
    assert torch.allclose(seen[("flat", 1, "q_proj")], plain, atol=1e-6)
    # Layer 0 is scored on the same (stage-1) activations in both modes.
    assert torch.equal(seen[("ar", 0, "q_proj")], seen[("flat", 0, "q_proj")])
    # Inside a layer too: o_proj sees attention built with the assembled q, k, v.
    assert not torch.allclose(seen[("ar", 0, "o_proj")], seen[("flat", 0, "o_proj")], atol=1e-4)


def test_assembly_from_gates_fetches_only_the_selected_pieces_and_gives_the_same_recipe(
        tiny, pad_id):
    """A device lists the gates, then fetches a piece when a layer first selects it: the
    recipe is the one of the whole pool, and only the recipe's pieces come down, each
    once. A piece whose gate is not the one it was scored with is refused."""
    pool = [p for s in range(4) for p in random_pieces(tiny.model, f"s{s}", seed=40 + s)]
    target = user_examples(tiny.tokenizer, 5, n=6)
    config = PerPcsConfig(top_k=2, assembly_batch_size=2)  # several batches
    whole = assemble(tiny.model, pool, target, pad_id, config)
    gates = [Gate(p.piece_id, p.sharer, p.layer, p.module, p.rank, p.gate) for p in pool]
    lookup = {p.piece_id: p for p in pool}
    asked: list[str] = []

    def fetch(ids):
        asked.extend(ids)
        return {pid: lookup[pid] for pid in ids}

    lazy = assemble(tiny.model, gates, target, pad_id, config, fetch=fetch)
    assert lazy == whole and lazy.to_bytes() == whole.to_bytes()
    assert len(asked) == len(set(asked)) and set(asked) == set(whole.piece_ids())
    assert len(asked) < len(pool)  # the point: most pieces never come down
    # a pool that lists one gate and serves a piece with another is caught
    chosen = sorted(whole.piece_ids())[0]
    other = next(p for p in pool if p.piece_id != chosen)
    with pytest.raises(ValueError, match="does not match the gate"):
        assemble(tiny.model, gates, target, pad_id, config,
                 fetch=lambda ids: {pid: (other if pid == chosen else lookup[pid])
                                    for pid in ids})


def test_scoring_positions():
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
             "labels": torch.tensor([[-100, -100, 7, 8, -100], [-100, -100, -100, -100, -100]])}
    assert scoring_mask(batch, "output").tolist() == [
        [False, True, True, False, False], [True, True, True, False, False]]
    assert scoring_mask(batch, "target_tokens").tolist() == [
        [False, False, True, True, False], [True, True, True, False, False]]
    assert scoring_mask(batch, "all").tolist() == batch["attention_mask"].bool().tolist()


def test_assembly_needs_gates_and_history(tiny, pad_id):
    ungated = random_pieces(tiny.model, "s", seed=5, gated=False)
    target = user_examples(tiny.tokenizer, 1, n=2)
    with pytest.raises(ValueError, match="no gate"):
        assemble(tiny.model, ungated, target, pad_id)
    with pytest.raises(ValueError, match="no examples"):
        assemble(tiny.model, random_pieces(tiny.model, "s", seed=5), [], pad_id)


# ---------------------------------------------------------- retrieval and selection
def test_peft_retrieval_weights_by_similarity(tiny):
    embeddings = {"s0": np.array([1.0, 0.0]), "s1": np.array([0.6, 0.8]),
                  "s2": np.array([-1.0, 0.0])}
    target = np.array([1.0, 0.0])
    chosen = retrieve_sharers(target, embeddings, 2)
    assert [s for s, _ in chosen] == ["s0", "s1"]
    assert chosen[0][1] == pytest.approx(1.0 / 1.6) and chosen[1][1] == pytest.approx(0.6 / 1.6)
    pieces = {s: random_pieces(tiny.model, s, seed=30 + i, gated=False)
              for i, s in enumerate(embeddings)}
    recipe = peft_retrieval_recipe(target, embeddings, pieces, PerPcsConfig(top_k=2))
    assert recipe.config["method"] == "peft-retrieval"
    lookup = {p.piece_id: p for ps in pieces.values() for p in ps}
    updates = rebuild(recipe, lookup)
    key = (2, "v_proj")
    p0 = next(p for p in pieces["s0"] if p.key == key)
    p1 = next(p for p in pieces["s1"] if p.key == key)
    expected = chosen[0][1] * p0.delta_weight() + chosen[1][1] * p1.delta_weight()
    assert torch.allclose(updates[key].delta_weight(), expected, atol=1e-6)


def test_sharer_selection_most_active_per_cluster_and_drops_small_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    users, embeddings, sizes = [], [], []
    cluster_sizes = {0: [5, 30, 12], 1: [3, 9, 10], 2: [11, 4, 11]}  # cluster 1: best has 10
    for c, hist in cluster_sizes.items():
        for j, size in enumerate(hist):
            users.append(f"u{c}{j}")
            embeddings.append(centers[c] + rng.normal(scale=0.1, size=2))
            sizes.append(size)
    picked = select_sharers_kmeans(users, np.array(embeddings), sizes,
                                   PerPcsConfig(num_clusters=3))
    assert sorted(picked) == ["u01", "u20"]  # u20 and u22 tie at 11: the lower id wins
    # K is capped at the population, and asking for 50 clusters with 9 users still works.
    assert PerPcsConfig().clusters_for(9) == 9
    assert len(select_sharers_kmeans(users, np.array(embeddings), sizes)) >= 3
    # Federated form: only cluster indexes and history sizes.
    assert select_sharers_from_clusters(["a", "b", "c"], [0, 0, 1], [11, 20, 40]) == ["b", "c"]
    assert select_sharers_from_clusters(["a", "b"], [0, 1], [10, 11],
                                        small_cluster_items=10) == ["b"]
    assert select_sharers_most_active(users, sizes, 2) == ["u01", "u02"]


def test_config_validation():
    with pytest.raises(ValueError):
        PerPcsConfig(combination="mean")
    with pytest.raises(ValueError):
        PerPcsConfig(sharing_ratio=0.0)
    with pytest.raises(ValueError):
        PerPcsConfig(target_modules=("x_proj",))
    config = PerPcsConfig(top_k=3, combination="factors")
    assert PerPcsConfig.from_dict(config.to_dict()) == config


# ------------------------------------------------------------- compact recipes
def _grid_recipe(layers=30, modules=("q_proj", "k_proj", "v_proj", "o_proj"), k=2):
    import hashlib

    entries, candidates = {}, {}
    for layer in range(layers):
        for module in modules:
            ids = [hashlib.sha256(f"{layer}{module}{s}".encode()).hexdigest() for s in range(10)]
            candidates[(layer, module)] = ids
            entries[(layer, module)] = [(ids[s], w) for s, w in zip((3, 7), (0.6125, 0.3875))][:k]
    return Recipe(entries, "sum_of_products", {"top_k": k}), candidates


def test_compact_recipe_round_trips_and_is_over_1000x_smaller_than_an_oppu_adapter():
    recipe, candidates = _grid_recipe()
    data = recipe.to_compact()
    assert Recipe.from_compact(data, candidates, recipe.config) == recipe
    # SmolLM2 OPPU adapter: 30 layers x (q: 8*(576+576) + v: 8*(576+192)) float32
    oppu_bytes = 30 * (8 * (576 + 576) + 8 * (576 + 192)) * 4
    assert recipe.num_bytes == len(data) == 4 + 2 + 3 + 120 * (1 + 2 * 6)
    assert oppu_bytes / recipe.num_bytes >= 1000


def test_compact_recipe_of_a_partial_grid_and_bad_prefixes():
    recipe, candidates = _grid_recipe(layers=3)
    partial = Recipe({k: v for k, v in recipe.entries.items() if k[0] != 1}, "factors")
    assert Recipe.from_compact(partial.to_compact(), candidates) == partial
    with pytest.raises(PflError, match="no pool pieces"):
        Recipe.from_compact(recipe.to_compact(), {k: v[:3] for k, v in candidates.items()})
    with pytest.raises(PflError, match="malformed|trailing"):
        Recipe.from_compact(recipe.to_compact()[:-3], candidates)


def _sourced(recipe, candidates):
    """The same recipe with each piece's sharer known: s<index in its candidate list>."""
    sources = {pid: f"s{i}" for ids in candidates.values() for i, pid in enumerate(ids)}
    pairs = {key: [(pid, sources[pid]) for pid in ids] for key, ids in candidates.items()}
    return Recipe(recipe.entries, recipe.combination, recipe.config, sources), pairs


def test_compact_recipe_with_sharers_uses_three_bytes_a_piece_and_checks_its_pieces():
    plain, candidates = _grid_recipe()
    recipe, pairs = _sourced(plain, candidates)
    data = recipe.to_compact()
    assert data[:4] == b"PCR2"
    # header + grid + 2 sharers x 4 + digest 8 + 120 x (1-byte mask + 2 x float16)
    assert len(data) == 4 + 2 + 3 + 1 + 2 * 4 + 8 + 120 * (1 + 2 * 2)
    assert Recipe.from_compact(data, pairs, recipe.config) == recipe
    # Averaging over batches: a union of 5 pieces per module still fits the 1000x target.
    wide_entries = {key: [(ids[s], 0.2) for s in range(5)] for key, ids in candidates.items()}
    wide, _ = _sourced(Recipe(wide_entries), candidates)
    oppu_bytes = 30 * (8 * (576 + 576) + 8 * (576 + 192)) * 4
    assert oppu_bytes / wide.num_bytes >= 1000 > oppu_bytes / Recipe(wide_entries).num_bytes
    # A sharer that resubmitted a different piece at some (layer, module): caught.
    swapped = dict(pairs)
    key = (4, "v_proj")
    swapped[key] = [("f" * 64 if s == "s3" else pid, s) for pid, s in pairs[key]]
    with pytest.raises(PflError, match="digest"):
        Recipe.from_compact(data, swapped)
    # Ids alone cannot resolve sharer references.
    with pytest.raises(PflError, match="no pool pieces"):
        Recipe.from_compact(data, candidates)
    # JSON keeps the sources too.
    assert Recipe.from_json(recipe.to_json()) == recipe


def test_recipe_weights_are_float16_values():
    recipe = Recipe({(0, "q_proj"): [("ab" * 32, 0.1)]})
    [(_, weight)] = recipe.entries[(0, "q_proj")]
    assert weight != 0.1 and abs(weight - 0.1) < 1e-4
    assert np.float16(weight) == weight


def test_sharer_pieces_are_kept_and_reused_only_while_what_trained_them_is_unchanged(
        tmp_path, tiny, monkeypatch, caplog):
    """pfl eval keeps each sharer's trained pieces (keyed by stage 1, history and the pieces'
    training settings): a second run with only another sharing ratio trains no sharer and
    gets the same pieces; another gate lr trains again."""
    from shared.methods.perpcs import core as cores
    from shared.data import load_dataset
    from shared.methods.base import Runtime
    from shared.methods.store import reused_so_far

    dataset = load_dataset("synthetic", None, num_users=6, seed=0)
    roles = {"sharers": [dataset.user(0), dataset.user(1)],
             "collective": [dataset.user(2), dataset.user(3)]}

    def runtime(**perpcs):
        options = {"max_history": 6, "stage1": {"max_steps": 2},
                   "perpcs": {"gate_steps": 2, "gate_lr": 1e-2, **perpcs}}
        rt = Runtime(loaded=tiny, task=dataset.task, seed=0, progress=False, options=options,
                     roles=roles)
        rt.cache.sharer_store = tmp_path / "store"
        return rt

    with caplog.at_level(logging.INFO, logger=cores.log.name):
        first = cores.piece_pool(runtime())
    assert len(list((tmp_path / "store").iterdir())) == 2  # one folder per sharer
    # a sharer trains for minutes on the real model: each says so before and after
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sharer ")]
    assert [m.split(":")[0] for m in progress] == [
        f"sharer {n}/2 ({roles['sharers'][n - 1].id})" for n in (1, 1, 2, 2)]
    assert "training" in progress[0] and progress[1].endswith(" s")

    def no_training(*args, **kwargs):
        raise AssertionError("a sharer was trained again")

    monkeypatch.setattr(cores, "train_sharer_pieces", no_training)
    resumed = runtime(sharing_ratio=0.5)
    again = cores.piece_pool(resumed)
    assert {k: [p.piece_id for p in v] for k, v in again.adapters.items()} == \
        {k: [p.piece_id for p in v] for k, v in first.adapters.items()}
    # a resumed run's costs count the kept pieces' training time, not the time to read them
    assert 0 < reused_so_far(resumed) <= sum(first.seconds.values())
    assert all(again.seconds[s] >= 0.5 * first.seconds[s] for s in first.seconds)
    assert len(again.pool) < len(first.pool)  # the ratio still applies
    with pytest.raises(AssertionError, match="trained again"):
        cores.piece_pool(runtime(gate_lr=2e-2))


def test_loss_scored_selection_keeps_the_sharer_that_fits_the_targets_history(
        tiny, pad_id, gated):
    """perpcs-loss: among a sharer trained on the target's own history and one with random
    pieces (named so that it wins every tie), the target keeps the one whose pieces lower its
    history loss, all of that sharer's pieces with weight 1, and nothing of the other."""
    from shared.methods.perpcs.loss_selection import history_loss, loss_scored_recipe

    _, result, _ = gated
    fitted = [Piece("zz-fitted", p.layer, p.module, p.A, p.B, p.scaling, p.gate)
              for p in result.pieces]
    noise = random_pieces(tiny.model, "aa-noise", seed=3)
    target = user_examples(tiny.tokenizer, 0)  # the history sharer-0's LoRA was trained on
    config = PerPcsConfig(assembly_batch_size=4)
    recipe = loss_scored_recipe(tiny.model, noise + fitted, target, pad_id, config)
    assert recipe.config["sharer"] == "zz-fitted"
    losses = recipe.config["losses"]
    assert losses["zz-fitted"] < min(recipe.config["stage1_loss"], losses["aa-noise"])
    by_id = {p.piece_id: p for p in fitted}
    assert set(recipe.piece_ids()) == set(by_id)
    assert all(items == ((items[0][0], 1.0),) for items in recipe.entries.values())
    updates = rebuild(recipe, by_id)
    assert all(torch.equal(updates[p.key].delta_weight(), p.delta_weight()) for p in fitted)
    assert not any(isinstance(m, PieceLinear) for m in tiny.model.modules())
    assert history_loss(tiny.model, target, pad_id, 4) == pytest.approx(
        recipe.config["stage1_loss"], abs=1e-5)
    assert recipe.config["scored_items"] == len(target)


def test_loss_scored_selection_scores_only_the_latest_loss_items(tiny, pad_id, gated):
    """``loss_items`` bounds perpcs-loss' cost: it scores the target's latest K items only.
    Another user's items put before the target's own 3 change every loss when the whole
    history is scored and none when K = 3; a negative K is refused."""
    from shared.methods.perpcs.loss_selection import loss_scored_recipe

    _, result, _ = gated
    latest = list(user_examples(tiny.tokenizer, 0))[-3:]  # sharer-0's LoRA fits these
    mixed = list(user_examples(tiny.tokenizer, 1)) + latest

    def losses(examples, k):
        recipe = loss_scored_recipe(tiny.model, list(result.pieces), examples, pad_id,
                                    PerPcsConfig(assembly_batch_size=4, loss_items=k))
        return recipe.config["scored_items"], recipe.config["losses"], \
            recipe.config["stage1_loss"]

    assert losses(mixed, 3) == losses(latest, 0)
    sharer = result.pieces[0].sharer
    n, whole, _ = losses(mixed, 0)
    _, scored, _ = losses(latest, 0)
    assert n == len(mixed) and abs(whole[sharer] - scored[sharer]) > 1e-3
    with pytest.raises(ValueError, match="loss_items"):
        PerPcsConfig(loss_items=-1)
