"""The computation that ``pfl export onnx`` writes: one decoding step of a Llama-family model,
with a KV cache, whose personalization is an *input*, so one graph serves every user.

Inputs (B rows, T new tokens, P cached positions, L decoder layers):

- ``input_ids`` (B, T) int64, ``attention_mask`` (B, P+T) int64 (1: a real token, 0: left
  padding), ``position_ids`` (B, T) int64;
- ``past_key`` / ``past_value`` (L, B, kv_heads, P, head_dim): the cache (P = 0 on the first
  step);
- per adaptable linear module M (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` by default):
  ``lora_a.M`` (L, B, R, d_in) and ``lora_b.M`` (L, B, d_out, R). Row b's update of that
  module in layer l is ``(x A^T) B^T``, the rows' factors zero-padded to the batch's rank R
  (zeros add exact zeros). Stage 1, an OPPU adapter, a PER-PCS assembly (rank k*r) and their
  sums are all of this form (:mod:`shared.serving.rows`), scaling folded into A;
- PerFit: ``perfit_r`` / ``perfit_w`` (S, L, B, r, hidden), ``perfit_b`` (S, L, B, r) for
  S = 2 stages (the collective stage 1, then the personal stage 2) and ``perfit_mask`` (B, T)
  float (1 where this step's position is an intervened prompt position). After decoder layer
  l, each stage s maps ``h -> h + mask * (W h + b - R h) R`` (LoReFT, row-vector form). A
  layer that a stage does not intervene on has zeros there, which add exact zeros.

Outputs: ``logits`` (B, vocab) of the last position only (greedy decoding reads nothing
else; the lm head over the whole prompt would cost more than the rest of a step), and
``present_key`` / ``present_value`` (L, B, kv_heads, P+T, head_dim).

The module reuses the model's own embedding, norms, rotary embedding and weights; it only
writes the attention and the per-row terms out explicitly, so that the exporter sees plain
tensor operations. Its outputs match the model's own forward (and
:class:`shared.serving.engine.BatchedEngine`) to float rounding: see the tests.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from shared.errors import PflError
from shared.methods.perpcs.pieces import ATTENTION_MODULES, MODULE_PARENT

#: Linear modules that carry per-row factors unless the export names others: every module
#: the methods adapt by default (stage 1: q, k, v; personal LoRA: q, v; PER-PCS: q, k, v, o).
DEFAULT_MODULES = ATTENTION_MODULES
#: PerFit stages fed to the graph: the collective stage 1, then the personal stage 2.
PERFIT_STAGES = 2


def input_names(modules: Sequence[str]) -> list[str]:
    """The graph's inputs, in the order of :meth:`DecoderStep.forward`'s arguments."""
    names = ["input_ids", "attention_mask", "position_ids", "past_key", "past_value",
             "perfit_r", "perfit_w", "perfit_b", "perfit_mask"]
    for module in modules:
        names += [f"lora_a.{module}", f"lora_b.{module}"]
    return names


OUTPUT_NAMES = ["logits", "present_key", "present_value"]


def check_llama(model: nn.Module) -> None:
    """Raise :class:`PflError` unless ``model`` has the Llama layout the step writes out."""
    inner = getattr(model, "model", None)
    config = getattr(model, "config", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb") \
            or getattr(config, "model_type", None) not in ("llama", "mistral", "qwen2"):
        raise PflError("the ONNX export supports Llama-family decoders (llama, mistral, "
                       f"qwen2); this model is {getattr(config, 'model_type', type(model))}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise PflError(f"the ONNX export expects a SiLU MLP, not {config.hidden_act}")


class DecoderStep(nn.Module):
    """One decoding step of ``model`` with per-row low-rank updates on ``modules`` and per-row
    PerFit stages; see the module docstring for the inputs and outputs."""

    def __init__(self, model: nn.Module, modules: Sequence[str] = DEFAULT_MODULES):
        super().__init__()
        check_llama(model)
        unknown = [m for m in modules if m not in MODULE_PARENT]
        if unknown or not modules:
            raise PflError(f"cannot carry updates on {unknown or 'no modules'}; choose among "
                           f"{', '.join(MODULE_PARENT)}")
        config = model.config
        self.model = model
        self.modules_with_updates = tuple(modules)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None)
                            or config.hidden_size // config.num_attention_heads)
        self.scaling = self.head_dim ** -0.5

    def _linear(self, layer: int, parent: nn.Module, name: str, x: torch.Tensor,
                lora: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        y = getattr(parent, name)(x)
        if name not in lora:
            return y
        A, B = lora[name][0][layer], lora[name][1][layer]  # (B, R, d_in), (B, d_out, R)
        return y + torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2))

    def forward(self, input_ids, attention_mask, position_ids, past_key, past_value,
                perfit_r, perfit_w, perfit_b, perfit_mask, *factors):
        inner = self.model.model
        lora = {m: (factors[2 * i], factors[2 * i + 1])
                for i, m in enumerate(self.modules_with_updates)}
        batch, steps = input_ids.shape
        past = past_key.shape[3]
        h = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(h, position_ids)
        # query t (absolute position past + t) sees key j when j <= past + t and j is real
        keys = torch.arange(past + steps, device=input_ids.device)
        queries = torch.arange(steps, device=input_ids.device) + past
        allowed = (keys[None, :] <= queries[:, None])[None] & (attention_mask[:, None, :] > 0)
        # a finite "minus infinity": a fully masked row (a padding query) stays finite, and
        # the constant means the same in a float32 and a float64 graph
        bias = torch.where(allowed, 0.0, -1e9).to(h.dtype)[:, None]
        mask = perfit_mask.to(h.dtype)[..., None]  # (B, T, 1)
        presents_k, presents_v = [], []
        for index, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(h)
            q = self._linear(index, attn, "q_proj", x, lora)
            k = self._linear(index, attn, "k_proj", x, lora)
            v = self._linear(index, attn, "v_proj", x, lora)
            q = q.view(batch, steps, self.num_heads, self.head_dim).transpose(1, 2)
            k = k.view(batch, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(batch, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = torch.cat([past_key[index], k], dim=2)
            v = torch.cat([past_value[index], v], dim=2)
            presents_k.append(k)
            presents_v.append(v)
            groups = self.num_heads // self.num_kv_heads
            scores = torch.matmul(q, repeat_kv(k, groups).transpose(2, 3)) * self.scaling + bias
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out = torch.matmul(probs, repeat_kv(v, groups)).transpose(1, 2)
            out = out.reshape(batch, steps, self.num_heads * self.head_dim)
            h = h + self._linear(index, attn, "o_proj", out, lora)
            x = layer.post_attention_layernorm(h)
            gate = self._linear(index, mlp, "gate_proj", x, lora)
            up = self._linear(index, mlp, "up_proj", x, lora)
            h = h + self._linear(index, mlp, "down_proj", mlp.act_fn(gate) * up, lora)
            for stage in range(PERFIT_STAGES):
                R, W = perfit_r[stage, index], perfit_w[stage, index]  # (B, r, d)
                b = perfit_b[stage, index][:, None, :]  # (B, 1, r)
                source = torch.bmm(h, W.transpose(1, 2)) + b - torch.bmm(h, R.transpose(1, 2))
                h = h + mask * torch.bmm(source, R)
        last = inner.norm(h[:, -1])
        logits = self.model.lm_head(last)
        return logits, torch.stack(presents_k), torch.stack(presents_v)


def example_inputs(model: nn.Module, modules: Sequence[str], *, batch: int = 2, steps: int = 3,
                   past: int = 5, rank: int = 7, perfit_rank: int = 4) -> tuple:
    """Inputs of the given sizes for tracing (sizes of 2 or more and all different, so that
    the exporter keeps every one of them dynamic)."""
    config = model.config
    layers = int(config.num_hidden_layers)
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, int(config.vocab_size), (batch, steps), generator=gen)
    attention = torch.ones(batch, past + steps, dtype=torch.long)
    positions = torch.arange(past, past + steps).expand(batch, steps).contiguous()
    cache = torch.zeros(layers, batch, kv_heads, past, head_dim, dtype=dtype)
    pr = torch.zeros(PERFIT_STAGES, layers, batch, perfit_rank, hidden, dtype=dtype)
    pb = torch.zeros(PERFIT_STAGES, layers, batch, perfit_rank, dtype=dtype)
    pmask = torch.zeros(batch, steps, dtype=dtype)
    factors = []
    shapes = {name: tuple(getattr(getattr(model.model.layers[0], MODULE_PARENT[name]),
                                  name).weight.shape) for name in modules}
    for name in modules:
        d_out, d_in = shapes[name]
        factors += [torch.zeros(layers, batch, rank, d_in, dtype=dtype),
                    torch.zeros(layers, batch, d_out, rank, dtype=dtype)]
    return (tokens, attention, positions, cache, cache.clone(), pr, pr.clone(), pb, pmask,
            *factors)
