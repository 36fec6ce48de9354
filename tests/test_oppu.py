"""OPPU's LoRA plumbing and trainers on the tiny model: base never modified, stock peft
round trip, merge exactness, user isolation, parameter counts."""

from __future__ import annotations

import hashlib

import pytest
import torch

from shared.errors import PflError
from shared.methods.oppu import train_personal_lora, train_stage1_lora
from shared.methods.oppu import (LoraSpec, attach_lora, has_lora, load_adapter_state,
                                 load_lora_state, lora_state, merge_lora, param_count,
                                 personal_lora, save_adapter, save_adapter_state, stage1_lora,
                                 state_bytes)
from shared.methods.oppu.model import _lora_layers
from shared.models import build_tiny_model
from shared.prompts import encode_prompt
from shared.tasks import NEWS_HEADLINE
from shared.training import TrainConfig, collate, history_examples, target_loss
from shared.types import HistoryItem, Query, User

FAST = dict(batch_size=4, max_prompt_tokens=64, max_target_tokens=12)


def make_user(uid: str, topic: str, style: str, n: int = 6) -> User:
    """A small synthetic news-headline user with a recognisable headline style."""
    history = tuple(
        HistoryItem(id=f"{uid}-{i}", fields={
            "text": f"Report {i} on {topic}: officials said the {topic} plan moves ahead "
                    f"in week {i}.",
            "title": f"{style} {topic} update number {i}"})
        for i in range(n))
    queries = (Query(id=f"{uid}-q", input=NEWS_HEADLINE.format_input(
        f"New {topic} story: the {topic} plan is finally done."), gold=f"{style} {topic} done"),)
    return User(id=uid, history=history, queries=queries)


USER_A = make_user("alice", "weather", "BREAKING:")
USER_B = make_user("bob", "football", "Wow!")


def checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def query_logits(model, tokenizer, user: User) -> torch.Tensor:
    ids = torch.tensor([encode_prompt(tokenizer, user.queries[0].input)],
                       device=next(model.parameters()).device)
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].float()


def history_loss(model, tokenizer, user: User) -> float:
    examples = history_examples(NEWS_HEADLINE, user.history, tokenizer, max_prompt_tokens=64,
                                max_target_tokens=12)
    with torch.no_grad():
        return target_loss(model, collate(examples, tokenizer.pad_token_id,
                                          next(model.parameters()).device)).item()


def random_state(model, spec: LoraSpec, seed: int = 1, scale: float = 0.05) -> dict:
    """A LoRA state with non-zero B (peft's init has B = 0, i.e. no change)."""
    generator = torch.Generator().manual_seed(seed)
    with attach_lora(model, spec) as peft_model:
        state = lora_state(peft_model)
    return {k: torch.randn(v.shape, generator=generator) * scale for k, v in state.items()}


@pytest.fixture(scope="module")
def trained(tiny):
    """Alice's personal LoRA, trained hard enough to move the loss (higher lr than the paper)."""
    before = checksum(tiny.model)
    state, stats = train_personal_lora(
        tiny.model, tiny.tokenizer, NEWS_HEADLINE, USER_A, personal_lora(),
        TrainConfig(epochs=6, lr=2e-2, **FAST), progress=False)
    return state, stats, before


def test_param_count_is_r_times_din_plus_dout(tiny):
    config = tiny.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    d, q_out = config.hidden_size, config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    for spec, outs in ((personal_lora(), (q_out, kv_out)),
                       (stage1_lora(), (q_out, kv_out, kv_out))):
        with attach_lora(tiny.model, spec) as peft_model:
            state = lora_state(peft_model)
            trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        expected = config.num_hidden_layers * sum(spec.r * (d + out) for out in outs)
        assert param_count(state) == expected == trainable
        assert state_bytes(state) == 4 * expected
        assert len(state) == 2 * config.num_hidden_layers * len(spec.target_modules)
    # tiny: q 64->64, k and v 64->32, 4 layers
    assert param_count(state) == 4 * (8 * (64 + 64) + 2 * 8 * (64 + 32))


def test_attach_lora_restores_base_on_exit_and_on_exception(tiny):
    model, before = tiny.model, checksum(tiny.model)
    params_before = {n: p for n, p in model.named_parameters()}
    logits_before = query_logits(model, tiny.tokenizer, USER_A)
    spec = personal_lora()
    state = random_state(model, spec)
    with attach_lora(model, spec, state=state) as peft_model:
        assert has_lora(model)
        assert not any(m.training for m in peft_model.modules())  # eval base: dropout off
        assert torch.equal(query_logits(peft_model, tiny.tokenizer, USER_A),
                           query_logits(peft_model, tiny.tokenizer, USER_A))
        assert not torch.allclose(query_logits(peft_model, tiny.tokenizer, USER_A), logits_before)
        with pytest.raises(PflError):  # no nesting on the same model
            with attach_lora(model, spec):
                pass
    assert not has_lora(model) and checksum(model) == before
    assert torch.equal(query_logits(model, tiny.tokenizer, USER_A), logits_before)

    with pytest.raises(RuntimeError, match="boom"):
        with attach_lora(model, spec, state=state) as peft_model:
            peft_model.train()
            raise RuntimeError("boom")
    assert not has_lora(model) and checksum(model) == before
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert {n: p for n, p in model.named_parameters()} == params_before  # same tensors, same names
    assert torch.equal(query_logits(model, tiny.tokenizer, USER_A), logits_before)


def test_reattaching_kept_lora_layers_trains_exactly_as_a_fresh_adapter(tiny):
    """attach_lora keeps the layers it takes out and puts them back for the next state of
    the same shape: the trained state is bit-identical to an adapter built afresh, the RNG
    stream (dropout) does not depend on which happened, and the base comes back the same."""
    import copy

    model = copy.deepcopy(tiny.model)
    before, params_before = checksum(model), {n: p for n, p in model.named_parameters()}
    spec, config = stage1_lora(), TrainConfig(epochs=1, lr=1e-2, max_steps=2, **FAST)
    initial = random_state(model, spec)

    def stage1_state(**kept):
        state, stats = train_stage1_lora(model, tiny.tokenizer, NEWS_HEADLINE, [USER_A], spec,
                                         config, initial_state=initial, progress=False)
        assert not has_lora(model) and checksum(model) == before
        assert {n: p for n, p in model.named_parameters()} == params_before
        assert not any(p.requires_grad for p in model.parameters())
        return state

    vars(model).pop("_pfl_kept_lora", None)
    fresh = stage1_state()                   # built by peft (and kept on exit)
    kept_layers = vars(model)["_pfl_kept_lora"].places
    again = stage1_state()                   # the kept layers, put back
    assert vars(model)["_pfl_kept_lora"].places == kept_layers  # reused, not rebuilt
    assert set(fresh) == set(again)
    assert all(torch.equal(fresh[k], again[k]) for k in fresh)
    assert any(not torch.equal(fresh[k], initial[k]) for k in fresh)  # it did train
    # Another adapter shape, or peft's own init (no state), builds new layers.
    with attach_lora(model, personal_lora()) as peft_model:
        assert [m for _, m in _lora_layers(peft_model)] != [layer for *_, layer in kept_layers]
    assert not has_lora(model) and checksum(model) == before


def test_load_lora_state_rejects_bad_states(tiny):
    spec = personal_lora()
    good = random_state(tiny.model, spec)
    key = next(iter(good))
    bad_shape = {**good, key: torch.zeros(3, 3)}
    bad_value = {**good, key: torch.full_like(good[key], float("nan"))}
    missing = {k: v for k, v in good.items() if k != key}
    extra = {**good, "model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(8, 64)}
    with attach_lora(tiny.model, spec, state=good) as peft_model:
        for bad in (bad_shape, bad_value, missing, extra):
            with pytest.raises(PflError):
                load_lora_state(peft_model, bad)
            current = lora_state(peft_model)  # nothing was changed by the failed loads
            assert all(torch.equal(current[k], good[k]) for k in good)
        load_lora_state(peft_model, {k: v.numpy() for k, v in good.items()})  # numpy accepted


def test_training_lowers_loss_changes_outputs_and_keeps_base(tiny, trained):
    state, stats, before = trained
    assert checksum(tiny.model) == before and not has_lora(tiny.model)
    assert stats["steps"] == 12 and stats["examples"] == len(USER_A.history)
    assert stats["params"] == param_count(state) and stats["bytes"] == state_bytes(state)
    base_loss = history_loss(tiny.model, tiny.tokenizer, USER_A)
    base_logits = query_logits(tiny.model, tiny.tokenizer, USER_A)
    with attach_lora(tiny.model, personal_lora(), state=state) as peft_model:
        adapted_loss = history_loss(peft_model, tiny.tokenizer, USER_A)
        adapted_logits = query_logits(peft_model, tiny.tokenizer, USER_A)
    assert adapted_loss < base_loss - 0.2, (base_loss, adapted_loss)
    assert stats["loss_last"] < stats["loss_first"]
    assert (adapted_logits - base_logits).abs().max() > 1e-2
    assert checksum(tiny.model) == before


def test_saved_adapter_round_trips_through_stock_peft(tiny, trained, tmp_path):
    from peft import PeftModel

    state, _, before = trained
    spec = personal_lora()
    with attach_lora(tiny.model, spec, state=state) as peft_model:
        expected = query_logits(peft_model, tiny.tokenizer, USER_A)
        save_adapter(peft_model, tmp_path / "alice")
    assert (tmp_path / "alice" / "adapter_config.json").is_file()
    assert (tmp_path / "alice" / "adapter_model.safetensors").is_file()

    fresh = build_tiny_model(len(tiny.tokenizer), seed=0).eval()  # a bit-identical fresh base
    assert checksum(fresh) == before
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "alice")).eval()
    assert torch.allclose(query_logits(loaded, tiny.tokenizer, USER_A), expected.cpu(),
                          atol=1e-5 if tiny.device.type == "cuda" else 1e-6)
    assert not torch.allclose(query_logits(tiny.model, tiny.tokenizer, USER_A), expected,
                              atol=1e-4)  # the adapter matters: the test can fail

    # the model-free writer gives the same standard files, and they read back exactly
    save_adapter_state(state, spec, tmp_path / "alice2")
    fresh2 = build_tiny_model(len(tiny.tokenizer), seed=0).eval()
    loaded2 = PeftModel.from_pretrained(fresh2, str(tmp_path / "alice2")).eval()
    assert torch.allclose(query_logits(loaded2, tiny.tokenizer, USER_A), expected.cpu(),
                          atol=1e-5 if tiny.device.type == "cuda" else 1e-6)
    read, read_spec = load_adapter_state(tmp_path / "alice")
    assert read_spec == spec and set(read) == set(state)
    assert all(torch.equal(read[k], state[k]) for k in state)
    assert checksum(tiny.model) == before


def test_each_user_adapter_sees_only_that_users_history(tiny):
    config = TrainConfig(epochs=2, lr=1e-3, seed=7, **FAST)
    spec = personal_lora()
    args = (tiny.model, tiny.tokenizer, NEWS_HEADLINE)
    state_a, _ = train_personal_lora(*args, USER_A, spec, config, progress=False)
    state_b_after_a, stats_b = train_personal_lora(*args, USER_B, spec, config, progress=False)
    state_b_alone, _ = train_personal_lora(*args, USER_B, spec, config, progress=False)
    assert stats_b["examples"] == len(USER_B.history)
    assert all(torch.equal(state_b_after_a[k], state_b_alone[k]) for k in state_b_alone)
    assert not all(torch.equal(state_a[k], state_b_alone[k]) for k in state_a)
    # upstream's bug (B also trained on A's history) would give a different adapter
    leaked, _ = train_stage1_lora(*args, [USER_A, USER_B], spec, config, progress=False)
    assert not all(torch.equal(leaked[k], state_b_alone[k]) for k in leaked)


def test_merge_lora_matches_unmerged_and_leaves_base_alone(tiny):
    spec = stage1_lora()
    state = random_state(tiny.model, spec, seed=3)
    before = checksum(tiny.model)
    base_logits = query_logits(tiny.model, tiny.tokenizer, USER_B)
    with attach_lora(tiny.model, spec, state=state) as peft_model:
        unmerged = query_logits(peft_model, tiny.tokenizer, USER_B)
    merged_model = merge_lora(tiny.model, state, spec)
    assert merged_model is not tiny.model and not has_lora(merged_model)
    assert checksum(tiny.model) == before
    merged = query_logits(merged_model, tiny.tokenizer, USER_B)
    assert torch.allclose(merged, unmerged, atol=1e-4, rtol=1e-4)
    assert (merged - base_logits).abs().max() > 1e-3
    assert not any(p.requires_grad for p in merged_model.parameters())
    q_path = "model.layers.0.self_attn.q_proj"
    assert (merged_model.get_submodule(q_path).weight.data_ptr()
            != tiny.model.get_submodule(q_path).weight.data_ptr())
    with pytest.raises(PflError):
        merge_lora(tiny.model, state, LoraSpec(r=4, target_modules=spec.target_modules))


def test_personal_lora_on_merged_model_and_initial_state(tiny):
    stage1_state = random_state(tiny.model, stage1_lora(), seed=5)
    merged_model = merge_lora(tiny.model, stage1_state, stage1_lora())
    merged_sum = checksum(merged_model)
    config = TrainConfig(epochs=1, lr=1e-3, **FAST)
    state, _ = train_personal_lora(merged_model, tiny.tokenizer, NEWS_HEADLINE, USER_B,
                                   personal_lora(), config, rag_k=1, profile="Likes sports.",
                                   progress=False)
    assert checksum(merged_model) == merged_sum
    assert set(state) == set(random_state(tiny.model, personal_lora()))
    # federated stage 1: local training starts from the given global state (lr 0: unchanged)
    start = random_state(tiny.model, stage1_lora(), seed=9)
    out, stats = train_stage1_lora(tiny.model, tiny.tokenizer, NEWS_HEADLINE, [USER_A, USER_B],
                                   stage1_lora(), TrainConfig(lr=0.0, max_steps=1, **FAST),
                                   initial_state=start, progress=False)
    assert stats["users"] == 2 and stats["examples"] == 12 and stats["steps"] == 1
    assert all(torch.equal(out[k], start[k]) for k in start)


def test_gradient_checkpointing_trains_the_same_adapter_and_is_switched_off_after(tiny):
    """The authors' code trains with gradient checkpointing; here it is an option that must
    give the same adapter (dropout masks replayed), and leave the model as it was."""
    args = (tiny.model, tiny.tokenizer, NEWS_HEADLINE, USER_A, personal_lora())
    calls = []
    mlp = tiny.model.get_decoder().layers[0].mlp  # the end of the layer: all recomputed
    handle = mlp.register_forward_hook(lambda *_: calls.append(1))
    try:
        plain, stats = train_personal_lora(*args, TrainConfig(epochs=2, lr=1e-2, seed=3, **FAST),
                                           progress=False)
        plain_calls = len(calls)
        ckpt, _ = train_personal_lora(*args, TrainConfig(epochs=2, lr=1e-2, seed=3,
                                                         gradient_checkpointing=True, **FAST),
                                      progress=False)
    finally:
        handle.remove()
    assert plain_calls == stats["steps"]  # one forward per step
    assert len(calls) - plain_calls == 2 * stats["steps"]  # recomputed in every backward
    assert set(plain) == set(ckpt)
    for key in plain:
        assert torch.allclose(plain[key], ckpt[key], atol=1e-6), key
    assert any(plain[k].abs().sum() > 0 for k in plain if "lora_B" in k)  # it trained
    assert not tiny.model.is_activation_checkpointing
    assert not tiny.model.get_input_embeddings()._forward_hooks  # transformers' grads hook
