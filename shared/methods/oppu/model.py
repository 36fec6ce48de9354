"""OPPU's LoRA plumbing: attach an adapter to a frozen base, read and write its state,
save it in peft's own format, merge it into a copy of the base (stage 1, LoRA-C).

A **LoRA state** is a flat ``{key: tensor}`` dict holding only the A and B factors, keyed by
the targeted module's path inside the *base* model::

    model.layers.0.self_attn.q_proj.lora_A.weight   # (r, d_in)
    model.layers.0.self_attn.q_proj.lora_B.weight   # (d_out, r)

(peft's saved files prefix these keys with ``base_model.model.``; :data:`PEFT_PREFIX`.)
Tensors are float32 on the CPU: what a device stores and what Flower can carry.

The base model passed in is usually the process-wide memoized model of
:func:`shared.models.load_model`, shared by everything: peft injects its layers in place, so
:func:`attach_lora` always takes them out again on exit (also on an exception) and restores the
base's ``requires_grad`` flags and train/eval modes.
"""

from __future__ import annotations

import copy
import json
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch

from shared.errors import PflError
from shared.methods.oppu.config import LoraSpec

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_A, _B = ".lora_A.weight", ".lora_B.weight"

LoraState = dict[str, torch.Tensor]

_ATTACH_LOCK = threading.Lock()


def _lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _inner_model(peft_model) -> torch.nn.Module:
    """The base model inside a PeftModel (module paths relative to it are the state keys)."""
    from peft import PeftModel

    if isinstance(peft_model, PeftModel):
        return peft_model.base_model.model
    return peft_model


def has_lora(model: torch.nn.Module) -> bool:
    """True when peft LoRA layers are injected into ``model``."""
    return next(_lora_layers(model), None) is not None


@contextmanager
def attach_lora(model: torch.nn.Module, spec: LoraSpec,
                state: Mapping[str, object] | None = None) -> Iterator[torch.nn.Module]:
    """Inject a LoRA adapter into ``model`` and yield the ``peft.PeftModel``; restore on exit.

    Only the LoRA factors are trainable inside the block. With ``state`` the factors are
    loaded from it (strict), else peft's init (A random, B zero: the model is unchanged). On
    exit, normal or not, the LoRA layers are removed and every parameter's ``requires_grad``
    and every module's train/eval mode are put back: the base is bit-for-bit what it was.
    Refuses a model that already carries LoRA layers (nested or concurrent use).

    The removed layers are kept (one adapter shape per model) and put back by the next
    attachment of the same ``spec`` that brings a ``state``: peft's injection and removal
    cost more than two training steps of a small model, and a federated client attaches the
    same stage-1 adapter for every update. Building an adapter to load a ``state`` into it
    draws peft's initial values from a forked RNG, so the caller's RNG stream (dropout
    masks) is the same whether the layers were built or kept.
    """
    from peft import get_peft_model

    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    with _ATTACH_LOCK:
        if has_lora(model) or hasattr(model, "peft_config"):
            raise PflError("this model already carries a LoRA adapter (attach_lora cannot nest "
                           "or share a model between threads)")
        kept = vars(model).pop(_KEPT, None)
        if kept is not None and kept.spec == spec and state is not None:
            peft_model = kept.attach(model)
        else:
            try:
                with torch.random.fork_rng(devices=[]) if state is not None else nullcontext():
                    peft_model = get_peft_model(model, spec.to_peft())
            except ValueError as exc:  # e.g. no module matches the targets
                raise PflError(f"cannot attach LoRA {spec.target_modules}: {exc}") from None
    _match_modes(model, modes)  # peft creates its layers in train mode (dropout on)
    peft_model.training = peft_model.base_model.training = model.training  # the wrappers too
    try:
        if state is not None:
            load_lora_state(peft_model, state)
        yield peft_model
    finally:
        vars(model)[_KEPT] = _KeptAdapter.detach(model, peft_model, spec)
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(name, False))
        _match_modes(model, modes)


class _KeptAdapter:
    """LoRA layers taken out of a model, with what it takes to put them back."""

    def __init__(self, spec: LoraSpec, peft_model, peft_config, places: list):
        self.spec, self.peft_model, self.peft_config = spec, peft_model, peft_config
        self.places = places  # (parent module, attribute name, LoRA layer)

    @classmethod
    def detach(cls, model: torch.nn.Module, peft_model, spec: LoraSpec) -> "_KeptAdapter":
        """Put the original modules (same tensors) back in place of the LoRA layers (what
        peft's ``unload`` does) and keep the layers, without their gradients."""
        places = []
        for name, layer in list(_lora_layers(model)):
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attribute, layer.get_base_layer())
            for p in layer.parameters():
                p.grad = None
            places.append((parent, attribute, layer))
        return cls(spec, peft_model, vars(model).pop("peft_config", None), places)

    def attach(self, model: torch.nn.Module):
        """The kept layers back in place; as after ``get_peft_model``, only they train."""
        for parent, attribute, layer in self.places:
            if getattr(parent, attribute) is not layer.get_base_layer():
                raise PflError("the model changed since its LoRA layers were kept")
        for name, p in model.named_parameters():
            p.requires_grad_(False)
        for parent, attribute, layer in self.places:
            setattr(parent, attribute, layer)
            for name, p in layer.named_parameters():
                p.requires_grad_("lora_" in name)
        if self.peft_config is not None:
            vars(model)["peft_config"] = self.peft_config
        return self.peft_model


#: Where a model keeps the LoRA layers last detached from it (:func:`attach_lora`): a plain
#: attribute, so the layers go with the model (no module, parameter or state-dict entry).
_KEPT = "_pfl_kept_lora"


def _match_modes(model: torch.nn.Module, modes: Mapping[str, bool]) -> None:
    """Give each module its recorded train/eval mode; a module not recorded (a LoRA part)
    takes its parent's, so an adapter attached to a model in eval mode is in eval mode."""
    seen = dict(modes)
    for name, module in model.named_modules():  # parents come before their children
        if name not in seen:
            seen[name] = seen.get(name.rpartition(".")[0], model.training)
        module.training = seen[name]


def lora_state(peft_model: torch.nn.Module, adapter: str = ADAPTER) -> LoraState:
    """The adapter's A and B factors as float32 CPU copies, keyed by base module path."""
    state: LoraState = {}
    for name, layer in _lora_layers(_inner_model(peft_model)):
        if adapter not in layer.lora_A:
            continue
        state[name + _A] = layer.lora_A[adapter].weight.detach().to("cpu", torch.float32).clone()
        state[name + _B] = layer.lora_B[adapter].weight.detach().to("cpu", torch.float32).clone()
    if not state:
        raise PflError("no LoRA layers found in this model")
    return state


def _as_tensor(value, key: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    if not tensor.is_floating_point():
        raise PflError(f"LoRA state {key}: expected floats, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise PflError(f"LoRA state {key}: non-finite values")
    return tensor


def load_lora_state(peft_model: torch.nn.Module, state: Mapping[str, object],
                    adapter: str = ADAPTER) -> None:
    """Copy A and B factors (tensors or numpy arrays) into the adapter's layers, strictly.

    Every targeted module must be in ``state`` with the right shapes and finite values, and
    ``state`` must hold nothing else; otherwise a :class:`PflError` and nothing is changed.
    Keys may carry peft's ``base_model.model.`` prefix.
    """
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v
             for k, v in state.items()}
    updates, expected = [], set()
    for name, layer in _lora_layers(_inner_model(peft_model)):
        factors = ((_A, layer.lora_A[adapter].weight), (_B, layer.lora_B[adapter].weight))
        for suffix, param in factors:
            key = name + suffix
            expected.add(key)
            if key not in state:
                raise PflError(f"LoRA state is missing {key}")
            tensor = _as_tensor(state[key], key)
            if tuple(tensor.shape) != tuple(param.shape):
                raise PflError(f"LoRA state {key}: shape {tuple(tensor.shape)}, "
                               f"expected {tuple(param.shape)}")
            updates.append((param, tensor))
    extra = sorted(set(state) - expected)
    if extra:
        raise PflError(f"LoRA state has keys the adapter does not: {', '.join(extra[:4])}"
                       + (" ..." if len(extra) > 4 else ""))
    with torch.no_grad():
        for param, tensor in updates:
            param.copy_(tensor.to(param.device, param.dtype))


def lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (A, B)}`` from a flat LoRA state (A: (r, d_in), B: (d_out, r))."""
    pairs = {}
    for key in state:
        if key.endswith(_A):
            module = key[: -len(_A)]
            if module + _B not in state:
                raise PflError(f"LoRA state has {key} but no matching B")
            pairs[module] = (state[key], state[module + _B])
        elif not key.endswith(_B):
            raise PflError(f"not a LoRA factor key: {key}")
    if 2 * len(pairs) != len(state):
        raise PflError("LoRA state has B factors without matching A")
    return pairs


def param_count(state: Mapping[str, object]) -> int:
    """Number of trainable parameters in a LoRA state (sum of r*(d_in+d_out) over modules)."""
    return int(sum(np.prod(np.shape(v)) for v in state.values()))


def state_bytes(state: Mapping[str, object], bytes_per_param: int | None = None) -> int:
    """Bytes the state takes as stored (its own dtypes), or at ``bytes_per_param`` each."""
    if bytes_per_param is not None:
        return param_count(state) * bytes_per_param
    total = 0
    for value in state.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        else:
            total += np.asarray(value).nbytes
    return int(total)


# ------------------------------------------------------------------------------ files
def save_adapter(peft_model, directory: str | Path) -> Path:
    """Save the adapter in peft's standard format (adapter_config.json +
    adapter_model.safetensors): ``peft.PeftModel.from_pretrained(base, directory)`` loads it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(directory))
    return directory


def save_adapter_state(state: Mapping[str, torch.Tensor], spec: LoraSpec,
                       directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Save a LoRA state (no model needed) in the same standard peft format."""
    from safetensors.torch import save_file

    lora_pairs(state)  # validates the keys
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = spec.to_peft(inference_mode=True)
    config.base_model_name_or_path = base_model_name_or_path
    config.save_pretrained(str(directory))
    tensors = {PEFT_PREFIX + k: _as_tensor(v, k).to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory


def load_adapter_state(directory: str | Path) -> tuple[LoraState, LoraSpec]:
    """Read an adapter saved in peft's format into (LoRA state, spec)."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
        raise PflError(f"{directory} is not a peft adapter ({ADAPTER_CONFIG} and "
                       f"{ADAPTER_WEIGHTS} expected)")
    raw = json.loads((directory / ADAPTER_CONFIG).read_text())
    if raw.get("peft_type") != "LORA":
        raise PflError(f"{directory} holds a {raw.get('peft_type')} adapter, not LoRA")
    spec = LoraSpec.from_peft(LoraConfig.from_pretrained(str(directory)))
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    state = {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v.float()
             for k, v in tensors.items()}
    lora_pairs(state)
    return state, spec


# ------------------------------------------------------------------------------ merge
def merge_lora(base_model: torch.nn.Module, state: Mapping[str, object],
               spec: LoraSpec) -> torch.nn.Module:
    """A NEW model: a deep copy of ``base_model`` with W += (alpha/r) B A merged into every
    module in ``state`` (stage 1 / LoRA-C). ``base_model`` itself is never modified.

    The copy keeps the base's frozen flags and eval mode; the product is computed in float32
    and cast to each weight's dtype.
    """
    if has_lora(base_model):
        raise PflError("merge_lora needs a plain base model, not one with LoRA layers attached")
    pairs = lora_pairs({k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v
                        for k, v in state.items()})
    merged = copy.deepcopy(base_model)
    with torch.no_grad():
        for path, (a, b) in pairs.items():
            try:
                module = merged.get_submodule(path)
            except AttributeError:
                raise PflError(f"LoRA state targets {path}, "
                               "which the model does not have") from None
            weight = getattr(module, "weight", None)
            a, b = _as_tensor(a, path + _A).float(), _as_tensor(b, path + _B).float()
            if weight is None or weight.dim() != 2 or a.shape[0] != spec.r or \
                    tuple(weight.shape) != (b.shape[0], a.shape[1]) or b.shape[1] != a.shape[0]:
                raise PflError(f"LoRA factors for {path} ({tuple(a.shape)}, {tuple(b.shape)}) do "
                               f"not fit rank {spec.r} and weight "
                               f"{None if weight is None else tuple(weight.shape)}")
            delta = (b.to(weight.device) @ a.to(weight.device)) * spec.scaling
            weight.add_(delta.to(weight.dtype))
    return merged
