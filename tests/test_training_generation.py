"""Target-only logits give the model's own loss; batched left-padded generation is exact."""

import copy

import pytest
import torch

from shared.generation import GenerationConfig, generate, left_pad
from shared.training import (TrainConfig, collate, full_logits_loss, target_loss,
                             target_positions, train)


def _examples(tok):
    from shared.prompts import encode_example
    return [encode_example(tok, "Name a colour.", "blue"),
            encode_example(tok, "A much longer prompt about the weather today?", "rain later")]


def test_target_positions_point_before_each_target_token():
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])
    (rows, cols), targets = target_positions(labels)
    assert rows.tolist() == [0, 0, 1] and cols.tolist() == [1, 2, 0]
    assert targets.tolist() == [7, 8, 5]


def test_target_loss_equals_full_logits_loss(tiny):
    batch = collate(_examples(tiny.tokenizer), tiny.tokenizer.pad_token_id, tiny.device)
    with torch.no_grad():
        assert target_loss(tiny.model, batch).item() == pytest.approx(
            full_logits_loss(tiny.model, batch).item(), rel=1e-5)


def test_collate_right_pads_and_masks(tiny):
    ex = _examples(tiny.tokenizer)
    batch = collate(ex, pad_id=0)
    short = len(ex[0][0])
    assert batch["attention_mask"][0, short:].sum() == 0
    assert (batch["labels"][0, short:] == -100).all()


def test_train_updates_only_given_parameters_and_lowers_loss(tiny):
    model = copy.deepcopy(tiny.model)
    head_before = model.lm_head.weight.clone()
    norm = model.model.norm.weight
    norm.requires_grad_(True)
    examples = _examples(tiny.tokenizer) * 4
    batch = collate(examples, tiny.tokenizer.pad_token_id, tiny.device)
    before = target_loss(model, batch).item()
    stats = train(model, [norm], examples, TrainConfig(epochs=10, lr=1e-2, batch_size=4,
                                                       max_grad_norm=1.0),
                  tiny.tokenizer.pad_token_id, progress=False)
    after = target_loss(model, batch).item()
    assert stats["steps"] == 20
    assert after < before
    # lm_head is tied to the embeddings and was not given to the optimizer
    assert torch.equal(model.lm_head.weight, head_before)


def test_left_pad_puts_prompts_at_the_end():
    batch = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_generation_equals_one_by_one(tiny):
    prompts = ["Hi.", "Tell me a very long story about the sea and ships, please.", "Why?"]
    config = GenerationConfig(max_new_tokens=6, batch_size=3)
    batched = generate(tiny.model, tiny.tokenizer, prompts, config, progress=False)
    single = [generate(tiny.model, tiny.tokenizer, [p], config, progress=False)[0]
              for p in prompts]
    assert batched == single


def test_left_padding_does_not_change_generated_ids(tiny):
    """Raw ids (the tiny model's text is mostly whitespace, so compare tokens, not text)."""
    from shared.prompts import encode_prompt

    tok, model = tiny.tokenizer, tiny.model
    short = encode_prompt(tok, "Why?")
    long = encode_prompt(tok, "Tell me a very long story about the sea and ships, please.")
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    batch = left_pad([short, long], tok.pad_token_id, tiny.device)
    together = model.generate(**batch, **options)[:, batch["input_ids"].shape[1]:]
    alone = model.generate(**left_pad([short], tok.pad_token_id, tiny.device), **options)[:, len(short):]
    assert together.shape[1] == 5
    assert together[0].tolist() == alone[0].tolist()


# ------------------------------------------------- examples encoded when read (LazyExamples)
def _history(n: int = 20):
    from shared.data.synthetic import SyntheticDataset
    return SyntheticDataset(num_users=2, seed=0, min_history=n, max_history=n).user(0).history


def test_lazy_examples_read_all_equal_an_eager_encoding(tiny):
    from shared.prompts import build_prompt, encode_example
    from shared.tasks import SYNTHETIC
    from shared.training import LazyExamples, history_examples

    history = _history(6)
    lazy = history_examples(SYNTHETIC, history, tiny.tokenizer, max_prompt_tokens=96)
    eager = [encode_example(tiny.tokenizer, build_prompt(i, task=SYNTHETIC), t, 96, 64)
             for i, t in (SYNTHETIC.history_example(item) for item in history)]
    assert isinstance(lazy, LazyExamples) and len(lazy) == 6 and lazy.encoded() == []
    assert lazy[-1] == eager[-1] and lazy[1:3] == eager[1:3]
    assert lazy.encoded_count() == 3 and lazy.encoded() == [eager[5], eager[1], eager[2]]
    assert lazy.encoded(1) == [eager[1], eager[2]]  # those read after the first
    assert list(lazy) == eager
    pooled = LazyExamples.concat([history_examples(SYNTHETIC, history[:2], tiny.tokenizer,
                                                   max_prompt_tokens=96),
                                  history_examples(SYNTHETIC, history[2:], tiny.tokenizer,
                                                   max_prompt_tokens=96)])
    assert len(pooled) == 6 and list(pooled) == eager
    with pytest.raises(IndexError):
        lazy[6]


@pytest.mark.parametrize("method", ["plain", "perfit"])
def test_a_capped_update_encodes_only_what_it_trains_on_and_trains_the_same(tiny, method):
    """Two steps of batch 2 over 20 history items read at most 4 of them, and give exactly
    the parameters that training on the eagerly encoded list gives."""
    from shared.methods.perfit.config import PerFitConfig
    from shared.methods.perfit.model import new_stages, train_stage1
    from shared.tasks import SYNTHETIC
    from shared.training import history_examples

    config = TrainConfig(epochs=1, lr=1e-2, batch_size=2, max_steps=2, max_grad_norm=1.0)
    pad = tiny.tokenizer.pad_token_id

    def run(examples):
        if method == "perfit":
            perfit = PerFitConfig()
            s1, s2 = new_stages(perfit, tiny.model.config.num_hidden_layers,
                                tiny.model.config.hidden_size, seed=3, device=tiny.device)
            s1, s2, stats = train_stage1(tiny.model, examples, perfit, pad_id=pad, stage1=s1,
                                         stage2=s2, train_config=config)
            return {**s1.export_arrays(), **{f"2.{k}": v for k, v in s2.export_arrays().items()}}, stats
        model = copy.deepcopy(tiny.model)
        norm = model.model.norm.weight
        norm.requires_grad_(True)
        stats = train(model, [norm], examples, config, pad, progress=False)
        return {"norm": norm.detach().cpu().numpy().copy()}, stats

    lazy = history_examples(SYNTHETIC, _history(20), tiny.tokenizer, max_prompt_tokens=96)
    eager = list(history_examples(SYNTHETIC, _history(20), tiny.tokenizer, max_prompt_tokens=96))
    (got, got_stats), (want, want_stats) = run(lazy), run(eager)
    assert len(lazy.encoded()) <= 4
    assert got_stats == want_stats and got_stats["steps"] == 2
    assert set(got) == set(want)
    for key in want:
        assert (got[key] == want[key]).all(), key
