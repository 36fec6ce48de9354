"""Many users in one batch (shared.serving): every method's row gives, in a mixed batch, the
same greedy tokens as alone and the same logits as that method's own model; peft's
mixed-batch LoRA path agrees; bad adapters are refused.

Rows are compared on a float64 copy of the tiny model, where rounding cannot flip a greedy
choice: tokens must be equal, and logits equal to 1e-6 (the methods' own merged stage 1 forms
Delta W in float32; where both paths compute the same thing they agree exactly)."""

from __future__ import annotations

import copy

import pytest
import torch

from shared.errors import PflError
from shared.methods.base import Runtime
from shared.methods.perpcs.pieces import LoraUpdate
from shared.models import LoadedModel
from shared.prompts import encode_prompt
from shared.serving.engine import BatchedEngine, MultiLoraLinear
from shared.serving.rows import RowAdapter, concat

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def served(tiny, small_world):
    """Every method personalized for two targets on the tiny model (float32, as trained),
    then each user's row adapter; plus a float64 copy of the model to serve them on."""
    runtime, roles, states = small_world
    rows = {key: (core, state, core.serving_adapter(runtime, state))
            for key, (core, state) in states.items()}
    model64 = copy.deepcopy(tiny.model).double().eval()
    prompts = [encode_prompt(tiny.tokenizer, q.input, 256) for u in roles["targets"]
               for q in u.queries]
    return {"runtime": runtime, "rows": rows, "model64": model64, "prompts": prompts,
            "targets": roles["targets"], "tokenizer": tiny.tokenizer}


def _requests(served):
    """Every (method, user) row with one of the prompts each, so that the same prompt meets
    different adapters in the batch."""
    prompts = served["prompts"]
    out = []
    for i, ((name, uid), (_, _, adapter)) in enumerate(sorted(served["rows"].items())):
        out.append(((name, uid), prompts[i % len(prompts)], adapter))
    return out


def test_every_method_gives_the_same_tokens_in_a_mixed_batch_as_alone(served):
    requests = _requests(served)
    with BatchedEngine(served["model64"], served["tokenizer"]) as engine:
        run = dict(max_new_tokens=8, min_new_tokens=8)  # the tiny model stops at once else
        mixed = engine.generate([p for _, p, _ in requests], [a for _, _, a in requests], **run)
        alone = [engine.generate([p], [a], **run)[0] for _, p, a in requests]
        reversed_ = engine.generate([p for _, p, _ in requests][::-1],
                                    [a for _, _, a in requests][::-1], **run)[::-1]
    assert mixed == alone == reversed_
    assert all(len(tokens) == 8 for tokens in mixed)
    by_prompt = {}
    for (_, prompt, _), tokens in zip(requests, mixed):
        by_prompt.setdefault(tuple(prompt), set()).add(tuple(tokens))
    assert any(len(outputs) > 1 for outputs in by_prompt.values())  # adapters change answers
    assert not any(isinstance(m, MultiLoraLinear) for m in
                   served["model64"].modules())  # the model is given back plain


def _reference_logits(served, name, core, state, prompt):
    """What the method's own path computes for ``prompt``: its model (merged stage 1, peft
    adapter, installed PER-PCS updates) or PerFit's hooks, on a float64 copy."""
    runtime = served["runtime"]
    rt64 = Runtime(loaded=LoadedModel("tiny64", served["model64"], served["tokenizer"],
                                      next(served["model64"].parameters()).device),
                   task=runtime.task, seed=0, progress=False, options=runtime.options,
                   roles=runtime.roles)
    for key in ("perpcs_pool", "perfit_stage1", "stage1_state"):
        setattr(rt64.cache, key, getattr(runtime.cache, key))
    if runtime.cache.stage1_state is not None:
        from shared.methods.oppu.config import stage1_lora
        from shared.methods.oppu.model import merge_lora
        rt64.cache.stage1 = merge_lora(served["model64"], runtime.cache.stage1_state,
                                          stage1_lora())
    ids = torch.tensor([prompt], device=next(served["model64"].parameters()).device)
    if name.startswith("perfit"):
        from shared.methods.perfit.model import intervened
        from shared.methods.perfit.core import perfit_config, perfit_stage1
        stage1, shared2 = perfit_stage1(rt64)
        stage2 = state.payload if name == "perfit" else shared2
        with intervened(served["model64"], stage1, stage2, perfit_config(rt64).positions) as c:
            c.set_prompts([len(prompt)], len(prompt), padding_side="left")
            return served["model64"](input_ids=ids).logits[0, -1].float()
    with core.model_for(rt64, state) as model, torch.inference_mode():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits[0, -1].float()


def test_each_row_of_a_mixed_batch_has_its_methods_own_logits(served):
    requests = _requests(served)
    with BatchedEngine(served["model64"], served["tokenizer"]) as engine:
        logits = engine.last_logits([p for _, p, _ in requests], [a for _, _, a in requests])
        base = engine.last_logits([p for _, p, _ in requests], [None] * len(requests))
    for row, ((name, uid), prompt, _) in enumerate(requests):
        core, state, _ = served["rows"][(name, uid)]
        reference = _reference_logits(served, name, core, state, prompt)
        error = float((logits[row] - reference).abs().max())
        moved = float((logits[row] - base[row]).abs().max())
        assert error < 1e-6, (name, uid, error)  # merge_lora forms Delta W in float32
        assert (moved == 0) if name == "nonpersonalized" else (moved > 100 * error + 1e-4), \
            (name, moved)


def test_peft_mixed_batch_adapter_names_agree(served):
    """peft's own mixed-batch path (``adapter_names=``) with two users' LoRA-P adapters and
    the base in one batch gives the engine's logits and greedy tokens."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from shared.methods.oppu.config import personal_lora
    from shared.methods.oppu.model import PEFT_PREFIX

    spec = personal_lora()
    users = [u.id for u in served["targets"]]
    peft_model = get_peft_model(copy.deepcopy(served["model64"]), LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0,
        target_modules=list(spec.target_modules)), adapter_name=users[0])
    peft_model.add_adapter(users[1], LoraConfig(r=spec.r, lora_alpha=spec.alpha,
                                                lora_dropout=0.0,
                                                target_modules=list(spec.target_modules)))
    for uid in users:
        state = served["rows"][("lora-p", uid)][1].payload
        state = {(k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k): v.double()
                 for k, v in state.items()}
        set_peft_model_state_dict(peft_model, state, adapter_name=uid)
    peft_model = peft_model.double().eval()
    prompts = served["prompts"][:3]
    names = [users[0], "__base__", users[1]]
    adapters = [served["rows"][("lora-p", users[0])][2], None,
                served["rows"][("lora-p", users[1])][2]]
    from shared.generation import left_pad
    batch = left_pad(prompts, served["tokenizer"].pad_token_id,
                     next(served["model64"].parameters()).device)
    with torch.inference_mode():
        position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        theirs = peft_model(**batch, position_ids=position_ids, adapter_names=names).logits[:, -1]
        tokens = peft_model.generate(**batch, adapter_names=names, max_new_tokens=6,
                                     min_new_tokens=6, do_sample=False,
                                     pad_token_id=served["tokenizer"].pad_token_id,
                                     eos_token_id=served["tokenizer"].eos_token_id)
    width = batch["input_ids"].shape[1]
    eos = served["tokenizer"].eos_token_id
    theirs_tokens = [row[: row.index(eos)] if eos in row else row
                     for row in tokens[:, width:].tolist()]
    with BatchedEngine(served["model64"], served["tokenizer"]) as engine:
        ours = engine.last_logits(prompts, adapters)
        ours_tokens = engine.generate(prompts, adapters, max_new_tokens=6, min_new_tokens=6)
    assert torch.allclose(ours, theirs.float(), atol=1e-9, rtol=0)
    assert ours_tokens == theirs_tokens


def test_bad_adapters_are_refused_and_the_engine_keeps_serving(served):
    good = served["rows"][("oppu", served["targets"][0].id)][2]
    prompt = served["prompts"][0]
    key = next(iter(good.updates))
    update = good.updates[key]
    nan = LoraUpdate(update.A.clone(), update.B.clone())
    nan.A[0, 0] = float("nan")
    cases = {
        "non-finite": RowAdapter({key: nan}),
        "no module": RowAdapter({(99, "q_proj"): update}),
        "shapes": RowAdapter({key: LoraUpdate(update.A[:, :-1], update.B)}),
        "rank": RowAdapter({key: LoraUpdate(torch.zeros(300, update.A.shape[1]),
                                            torch.zeros(update.B.shape[0], 300))}),
    }
    perfit = served["rows"][("perfit", served["targets"][0].id)][2]
    with BatchedEngine(served["model64"], served["tokenizer"], max_rank=256) as engine:
        before = engine.generate([prompt], [good], max_new_tokens=4)
        for name, adapter in cases.items():
            with pytest.raises(PflError):
                engine.generate([prompt, prompt], [good, adapter], max_new_tokens=4)
            with pytest.raises(PflError):  # what a service keeps is checked when placed
                engine.place(adapter)
        assert engine.generate([prompt], [good], max_new_tokens=4) == before
        placed = engine.place(good)  # on the engine's device (here the CPU: itself)
        assert engine.generate([prompt], [placed], max_new_tokens=4) == before
        moved = good.to(next(served["model64"].parameters()).device)
        assert moved.updates.keys() == good.updates.keys() and all(
            torch.equal(moved.updates[k].A.cpu(), u.A.cpu())
            and torch.equal(moved.updates[k].B.cpu(), u.B.cpu())
            for k, u in good.updates.items())
        engine.num_layers = 1  # as if a 1-layer model: the stages' layers do not fit
        with pytest.raises(PflError, match="layers"):
            engine.check(perfit)


def test_concat_adds_updates():
    g = torch.Generator().manual_seed(0)
    a = {(0, "q_proj"): LoraUpdate(torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g))}
    b = {(0, "q_proj"): LoraUpdate(torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g)),
         (1, "v_proj"): LoraUpdate(torch.randn(1, 5, generator=g), torch.randn(4, 1, generator=g))}
    both = concat(a, b)
    x = torch.randn(7, 5, generator=g)
    assert both[(0, "q_proj")].rank == 5
    assert torch.allclose(both[(0, "q_proj")](x), a[(0, "q_proj")](x) + b[(0, "q_proj")](x),
                          atol=1e-5)
    assert both[(1, "v_proj")] is b[(1, "v_proj")]
