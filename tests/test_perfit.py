"""PerFit: LoReFT math, positions, hooks, two-stage training and generation (tiny model)."""

import numpy as np
import pytest
import torch

from shared.methods.perfit import (InterventionController, LoReftIntervention, PerFitConfig,
                                   PerFitStage, default_layers, evaluate_loss, generate, intervened,
                                   intervention_mask, new_stages, orthonormality_error,
                                   parse_positions, prompt_lengths_from_labels,
                                   reorthonormalize, train_stage1, train_stage2)
from shared.prompts import encode_example, encode_prompt

D = 64  # the tiny model's hidden size
LAYER = 1  # default_layers(4)


def _rows(mask):
    return [torch.nonzero(row).flatten().tolist() for row in mask]


def _examples(tokenizer, n=6, user="cats"):
    return [encode_example(tokenizer, f"Write a short headline about topic {i}.",
                           f"Topic {i}: {user} love {user}", 64) for i in range(n)]


def _strong_stage(layers, rank, seed, scale=3.0, device="cpu"):
    """A clearly non-trivial stage: large random b (the hidden states are O(1)), on
    ``device`` (the model's, where a test runs it through the model)."""
    stage = PerFitStage(layers, D, rank, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in stage.layers:
            stage[layer].learned_source.bias.copy_(scale * torch.randn(rank, generator=generator))
    return stage.to(device)


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# ----------------------------------------------------------------------------- config

def test_config_round_trip_and_default_layers():
    assert default_layers(4) == (1,)
    assert default_layers(30) == (8,) and default_layers(32) == (8,)
    assert default_layers(2) == (0,)  # never the last layer
    config = PerFitConfig(layers=(9, 3), positions="l7", personal_rank=8)
    assert config.layers == (3, 9)
    assert PerFitConfig.from_dict(config.to_dict()) == config
    assert PerFitConfig().resolved_layers(30) == (8,)
    with pytest.raises(ValueError):
        PerFitConfig.from_dict({"rank": 4})
    with pytest.raises(ValueError):
        PerFitConfig(positions="m7")
    with pytest.raises(ValueError):
        PerFitConfig(layers=(4,)).resolved_layers(4)
    train_config = PerFitConfig(epochs=5).train_config(batch_size=2)
    assert (train_config.epochs, train_config.lr, train_config.weight_decay,
            train_config.batch_size) == (5, 1e-4, 0.01, 2)


# ----------------------------------------------------------------------------- math

def test_r_stays_orthonormal_during_training_with_weight_decay():
    torch.manual_seed(0)
    phi = LoReftIntervention(D, 4)
    R0 = phi.R.detach().clone()
    optimizer = torch.optim.AdamW(phi.parameters(), lr=1e-2, weight_decay=0.01)
    h, target = torch.randn(32, D), torch.randn(32, D)
    for _ in range(25):
        loss = (phi(h) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert orthonormality_error(phi.R.detach()) < 1e-5
    assert (phi.R.detach() - R0).abs().max() > 1e-3  # R did train (and did not collapse)
    assert phi.num_parameters() == 4 * (2 * D + 1)
    assert sum(p.numel() for p in phi.parameters() if p.requires_grad) == 4 * (2 * D + 1)


def test_two_stage_composition_matches_the_formula():
    torch.manual_seed(1)
    stage1, stage2 = _strong_stage([LAYER], 8, seed=1), _strong_stage([LAYER], 4, seed=2)
    h = torch.randn(1, 5, D)

    def phi(h, intervention):
        arrays = {k: torch.as_tensor(v, dtype=torch.float64)
                  for k, v in intervention.export_arrays().items()}
        R, W, b = arrays["R"], arrays["W"], arrays["b"]
        return h + R.T @ (W @ h + b - R @ h)  # column-vector form, exactly the paper's

    expected = torch.stack([phi(phi(v.double(), stage1[LAYER]), stage2[LAYER])
                            for v in h[0]])
    controller = InterventionController(stage1, stage2, "f7+l7")
    controller.set_mask(torch.ones(1, 5, dtype=torch.bool))
    got = controller.apply(LAYER, h)[0]
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    # identity initialisation (W = R, b = 0) really is the identity
    identity = LoReftIntervention(D, 4, init="identity")
    torch.testing.assert_close(identity(h), h, atol=1e-5, rtol=0)


def test_reorthonormalize_an_average_of_orthonormal_matrices():
    torch.manual_seed(2)
    a, b = LoReftIntervention(D, 6), LoReftIntervention(D, 6)
    mean = (a.R.detach() + b.R.detach()) / 2  # what FedAvg gives
    assert orthonormality_error(mean) > 1e-2
    fixed = reorthonormalize(mean)
    assert orthonormality_error(fixed) < 1e-5
    torch.testing.assert_close(reorthonormalize(a.R.detach()), a.R.detach(), atol=1e-5, rtol=0)
    # load_arrays repairs it too, and the result is what the intervention uses
    arrays = a.export_arrays()
    a.load_arrays(mean.numpy(), arrays["W"], arrays["b"])
    assert orthonormality_error(a.R.detach()) < 1e-5
    torch.testing.assert_close(a.R.detach(), fixed, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        a.load_arrays(arrays["R"][:, :-1], arrays["W"], arrays["b"])
    with pytest.raises(ValueError):
        a.load_arrays(arrays["R"], arrays["W"], np.full_like(arrays["b"], np.nan))


def test_stage_arrays_round_trip():
    stage = _strong_stage([0, 2], 4, seed=3)
    arrays = stage.export_arrays()
    assert sorted(arrays) == sorted(f"layers.{l}.{n}" for l in (0, 2) for n in "RWb")
    assert all(v.dtype == np.float32 for v in arrays.values())
    assert stage.num_parameters() == 2 * 4 * (2 * D + 1)
    copy = PerFitStage.from_arrays(arrays)
    h = torch.randn(3, D)
    for layer in (0, 2):
        torch.testing.assert_close(copy[layer](h), stage[layer](h), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- positions

def test_positions_masks():
    assert parse_positions("f7+l7") == (7, 7) and parse_positions("l7") == (0, 7)
    with pytest.raises(ValueError):
        parse_positions("l7+l3")
    right = intervention_mask([3, 10, 20], 20, "f7+l7", "right")
    assert _rows(right) == [[0, 2], list(range(10)), list(range(7)) + list(range(13, 20))]
    left = intervention_mask([3, 10, 20], 20, "f7+l7", "left")
    assert _rows(left) == [[17, 19], list(range(10, 20)),
                           list(range(7)) + list(range(13, 20))]
    assert _rows(intervention_mask([3, 10], 12, "l7", "right")) == [[0, 1, 2], list(range(3, 10))]
    assert _rows(intervention_mask([3, 10], 12, "l7", "left")) == [[9, 10, 11],
                                                                  list(range(5, 12))]
    assert _rows(intervention_mask([5], 5, "f7+l7", "right")) == [[0, 1, 3, 4]]
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, -100, -100],
                           [-100, -100, -100, -100, -100]])
    assert prompt_lengths_from_labels(labels).tolist() == [2, 1, 5]


# ----------------------------------------------------------------------------- hooks

def test_intervention_changes_only_the_intended_positions(tiny):
    model = tiny.model
    ids = torch.tensor([encode_prompt(tiny.tokenizer, "Tell me a story about a cat.")],
                       device=tiny.device)
    width = ids.shape[1]
    stage1 = _strong_stage([LAYER], 8, seed=4, device=tiny.device)
    seen = {}
    capture = model.get_decoder().layers[LAYER + 1].register_forward_pre_hook(
        lambda module, args: seen.__setitem__(len(seen), args[0].detach().clone()))
    try:
        base_logits = _logits(model, ids)
        with intervened(model, stage1, None, "l7") as controller:
            mask = controller.set_prompts([width], width, padding_side="right")
            logits = _logits(model, ids)
    finally:
        capture.remove()
    changed = (seen[1] - seen[0]).abs().amax(-1) > 1e-6  # the layer output, per position
    assert torch.equal(changed, mask)
    first = width - 7
    torch.testing.assert_close(logits[0, :first], base_logits[0, :first], atol=1e-6, rtol=0)
    assert (logits[0, first:] - base_logits[0, first:]).abs().amax() > 1e-3


def test_hooks_are_removed_on_exit_even_on_error(tiny):
    model = tiny.model
    decoder = model.get_decoder()
    ids = torch.tensor([encode_prompt(tiny.tokenizer, "Hello there.")], device=tiny.device)
    base = _logits(model, ids)
    stage1, stage2 = (_strong_stage([LAYER], 8, seed=5, device=tiny.device),
                      _strong_stage([LAYER], 4, seed=6, device=tiny.device))
    with pytest.raises(KeyError):
        with intervened(model, stage1, stage2) as controller:
            controller.set_prompts([ids.shape[1]], ids.shape[1], "right")
            assert not torch.allclose(_logits(model, ids), base)
            assert len(decoder.layers[LAYER]._forward_hooks) == 1
            raise KeyError("boom")
    assert not decoder.layers[LAYER]._forward_hooks and not decoder._forward_pre_hooks
    assert torch.equal(_logits(model, ids), base)
    with pytest.raises(RuntimeError, match="set_prompts"):  # no mask, no silent no-op
        with intervened(model, stage1, stage2):
            _logits(model, ids)


# ----------------------------------------------------------------------------- training

def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def test_stage2_training_lowers_loss_and_touches_nothing_else(tiny):
    model, tokenizer = tiny.model, tiny.tokenizer
    pad = tokenizer.pad_token_id
    config = PerFitConfig()
    base_weights = _snapshot(model)
    shared_examples = _examples(tokenizer, user="dogs")
    fast = config.train_config(lr=1e-2, max_steps=6, batch_size=3)
    stage1, shared2, stats1 = train_stage1(model, shared_examples, config, pad_id=pad,
                                           train_config=fast)
    assert stats1["steps"] == 6
    stage1_before, shared2_before = stage1.export_arrays(), shared2.export_arrays()

    user_examples = _examples(tokenizer, user="cats")
    before = evaluate_loss(model, user_examples, stage1, shared2, positions=config.positions,
                           pad_id=pad)
    personal, stats = train_stage2(model, user_examples, config, stage1, shared2, pad_id=pad,
                                   train_config=config.train_config(lr=5e-2, max_steps=12,
                                                                    batch_size=3))
    after = evaluate_loss(model, user_examples, stage1, personal, positions=config.positions,
                          pad_id=pad)
    # a random tiny model moves slowly (targets are reached only through attention to the
    # intervened prompt positions): 10.61 -> 10.55 here; a no-op would give 0
    assert after < before - 0.03, (before, after)
    for name, value in _snapshot(model).items():
        assert torch.equal(value, base_weights[name]), name
    assert not any(p.requires_grad for p in model.parameters())
    assert model.training is False
    for name, value in stage1.export_arrays().items():
        np.testing.assert_array_equal(value, stage1_before[name])
    for name, value in shared2.export_arrays().items():
        np.testing.assert_array_equal(value, shared2_before[name])
    assert all(p.requires_grad for p in stage1.parameters())  # restored after stage 2
    assert orthonormality_error(personal[LAYER].R.detach()) < 1e-5


def test_prefix_cache_gives_the_same_training(tiny):
    model, tokenizer = tiny.model, tiny.tokenizer
    config = PerFitConfig(positions="f7+l7")
    stage1, shared2 = new_stages(config, 4, D, seed=7, device=tiny.device)
    examples = _examples(tokenizer, n=5)
    fast = config.train_config(lr=1e-2, max_steps=4, batch_size=2)
    runs = [train_stage2(model, examples, config, stage1, shared2, pad_id=tokenizer.pad_token_id,
                         train_config=fast, cache_prefix=cache) for cache in (True, False)]
    (cached, cached_stats), (plain, plain_stats) = runs
    assert cached_stats["loss_first"] == pytest.approx(plain_stats["loss_first"], abs=1e-5)
    assert cached_stats["loss_last"] == pytest.approx(plain_stats["loss_last"], abs=1e-4)
    for name, value in cached.export_arrays().items():
        np.testing.assert_allclose(value, plain.export_arrays()[name], atol=1e-4)
    assert not torch.equal(torch.as_tensor(cached.export_arrays()[f"layers.{LAYER}.W"]),
                           torch.as_tensor(shared2.export_arrays()[f"layers.{LAYER}.W"]))
    assert len(model.get_decoder().layers) == 4 and all(
        type(layer).__name__ == "LlamaDecoderLayer" for layer in model.get_decoder().layers)


def test_stage2_training_does_not_depend_on_the_global_rng(tiny):
    """Regression: copying a stage draws random columns for the orthogonal parametrization's
    base; unseeded, two users' identical runs trained differently (a federated device and
    `pfl eval` gave different PerFit scores in one process)."""
    model, tokenizer = tiny.model, tiny.tokenizer
    config = PerFitConfig()
    stage1, shared2 = new_stages(config, 4, D, seed=3, device=tiny.device)
    examples = _examples(tokenizer, n=4)
    fast = config.train_config(lr=5e-2, max_steps=3, batch_size=2)
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        personal, _ = train_stage2(model, examples, config, stage1, shared2,
                                   pad_id=tokenizer.pad_token_id, train_config=fast)
        results.append(personal.export_arrays())
    for name, value in results[0].items():
        np.testing.assert_array_equal(value, results[1][name], err_msg=name)


# ----------------------------------------------------------------------------- generation

def test_generation_intervenes_the_prompt_only(tiny):
    model, tokenizer = tiny.model, tiny.tokenizer
    prompts = [encode_prompt(tokenizer, "Write a headline about cats."),
               encode_prompt(tokenizer, "Hi.")]
    stage1 = _strong_stage([LAYER], 8, seed=8, scale=6.0, device=tiny.device)
    stage2 = _strong_stage([LAYER], 4, 9, device=tiny.device)
    calls = []
    counter = stage1[LAYER].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        out = generate(model, tokenizer, prompts, stage1, stage2, max_new_tokens=6)
    finally:
        counter.remove()
    # one intervened forward (the prefill), on the f7+l7 positions of both prompts only
    assert calls == [14 + 14]
    no_cache = generate(model, tokenizer, prompts, stage1, stage2, max_new_tokens=6,
                        use_cache=False)
    assert out == no_cache  # re-running the prompt each step intervenes it the same way
    alone = [generate(model, tokenizer, [p], stage1, stage2, max_new_tokens=6)[0]
             for p in prompts]
    assert out == alone  # left padding puts each prompt's positions in the right place
    with torch.no_grad():
        base = model.generate(input_ids=torch.tensor([prompts[0]], device=tiny.device),
                              max_new_tokens=6,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert base[0, len(prompts[0]):].tolist() != out[0]
    assert not model.get_decoder().layers[LAYER]._forward_hooks


def test_a_layer_call_without_position_ids_fails_loudly(tiny):
    """The intervened window is read from the position ids the model gives each layer; a
    transformers release that stops passing them must raise, not intervene column 0 on."""
    from shared.methods.perfit import window_start

    layer = tiny.model.get_decoder().layers[LAYER]
    assert window_start(layer.forward, (), {"position_ids": torch.tensor([[5, 6, 7], [0, 3, 4]])},
                        3) == 5
    assert window_start(layer.forward, (), {"position_ids": torch.tensor([[9], [4]])}, 1) == 9
    with pytest.raises(RuntimeError, match="no row of the batch is unpadded"):
        window_start(layer.forward, (), {"position_ids": torch.tensor([[0, 0, 1]])}, 3)
    stage1 = _strong_stage([LAYER], 8, seed=8, device=tiny.device)
    hidden = torch.randn(1, 4, D, device=tiny.device)
    rotary = tiny.model.get_decoder().rotary_emb(hidden, torch.arange(4, device=tiny.device)[None])
    with intervened(tiny.model, stage1) as controller:
        controller.set_mask(torch.ones(1, 4, dtype=torch.bool))
        with pytest.raises(RuntimeError, match="not given position_ids"):
            layer(hidden, position_embeddings=rotary)
    assert not layer._forward_hooks


def test_the_prefix_cache_is_built_only_when_training_reads_examples_more_than_once():
    from shared.methods.perfit.model import prefix_pays

    config = PerFitConfig()
    # a federated round capped at 2 steps of 4 reads 8 of 11 examples: no cache
    assert not prefix_pays(config.train_config(max_steps=2, batch_size=4), 11)
    # two epochs read each example twice: the cache pays
    assert prefix_pays(config.train_config(epochs=2, batch_size=4), 11)
    # one epoch reads each example once: computing the prefix in the batches costs the same
    assert not prefix_pays(config.train_config(epochs=1, batch_size=4), 12)
    assert prefix_pays(config.train_config(max_steps=4, batch_size=2), 5)  # the test above
