"""Model registry: tiny (seeded), the embedded SmolLM2 from its GGUF, local checkpoints."""

import pytest
import torch

from shared.errors import PflError
from shared.models import build_tiny_model, load_model, resolve_device


def test_tiny_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_model(1000, seed=0)
    assert torch.equal(torch.rand(1), expected_next)  # building did not consume global RNG
    b = build_tiny_model(1000, seed=0)
    c = build_tiny_model(1000, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_load_model_is_memoized_and_frozen(tiny):
    again = load_model("tiny", device=str(tiny.device))
    assert again is tiny
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert not tiny.model.training
    assert tiny.tokenizer.pad_token_id is not None
    assert tiny.num_layers == 4 and tiny.hidden_size == 64


def test_unknown_model_and_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(PflError, match="unknown model 'gpt-17'"):
        load_model("gpt-17")
    with pytest.raises(PflError, match="no config.json"):
        load_model(str(tmp_path))


def test_cuda_request_without_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(PflError, match="no CUDA"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_local_checkpoint_path_loads_the_same_model(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device=str(tiny.device))
    ids = torch.tensor([[1, 2, 3, 4]], device=tiny.device)
    with torch.no_grad():
        got, want = loaded.model(ids).logits, tiny.model(ids).logits
    if tiny.device.type == "cuda":  # a local checkpoint loads in bfloat16 on CUDA
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)
    else:
        assert torch.allclose(got, want)


def test_smollm2_loads_from_the_embedded_gguf(smollm2):
    from shared.models import cache_dir

    config = smollm2.model.config
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert smollm2.model.dtype == torch.float32
    assert (cache_dir() / "smollm2-135m" / "model.safetensors").is_file()
    proj = smollm2.model.model.layers[0].self_attn.q_proj.weight
    assert torch.isfinite(proj).all() and proj.abs().sum() > 0


def test_smollm2_answers_a_prompt_sensibly(smollm2):
    from shared.generation import GenerationConfig, generate

    [answer] = generate(smollm2.model, smollm2.tokenizer,
                        ["What is the capital of France? Answer with one word."],
                        GenerationConfig(max_new_tokens=8), progress=False)
    assert "paris" in answer.lower()


def test_a_checkpoint_missing_a_weight_is_an_error_not_a_random_init(tiny, tmp_path):
    """transformers only logs weights it did not find and initialises them at random; a
    release that reads a checkpoint (or the GGUF) differently must fail loudly instead."""
    from safetensors.torch import load_file, save_file

    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = "model.layers.1.self_attn.q_proj.weight"
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PflError, match=r"uninitialised \(missing keys: " + dropped.replace(".", r"\.")):
        load_model(str(tmp_path), device="cpu")
