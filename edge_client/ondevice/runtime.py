"""Greedy generation with plain ONNX Runtime on the exported graph
(:mod:`edge_client.ondevice.graph`): the same rows as the PyTorch engine.

:class:`OnnxEngine` has :class:`shared.serving.engine.BatchedEngine`'s interface
(``generate``, ``last_logits``, ``check``, ``close``) and takes the same per-row
personalization (:class:`shared.serving.rows.RowAdapter`, from ``Core.serving_adapter``), so a
device's personal state stays as it is on disk (adapter, recipe, stage-2 arrays) and becomes
the graph's inputs at each step:

- each row's low-rank updates (stage 1, OPPU, a PER-PCS assembly, their sums) are gathered
  per module into ``(L, B, R, d_in)`` / ``(L, B, d_out, R)`` arrays, zero-padded to the batch's
  largest rank on that module;
- each row's PerFit stages become ``perfit_r/w/b`` (zeros on layers a stage does not touch)
  and ``perfit_mask`` marks its intervened prompt positions on the first step only (decoding
  steps past the prompt are not intervened, as in the PyTorch engine);
- the prompt runs in one step on a left-padded batch, then one token a step with the KV cache
  the graph returns.

The model's work is ONNX Runtime's; PyTorch is still imported, since the rows are built by
the methods' own code (:meth:`Core.serving_adapter`) and their tensors read as numpy arrays.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from edge_client.ondevice import BACKENDS
from edge_client.ondevice.export import describe, exported_graph
from edge_client.ondevice.graph import PERFIT_STAGES
from shared.errors import PflError
from shared.methods.perfit.positions import intervention_mask
from shared.serving.rows import RowAdapter


def answer_engine(loaded, backend: str, *, cache=None, threads: int | None = None,
                  progress=print) -> "OnnxEngine | None":
    """The engine that answers for ``backend`` (None: PyTorch), on ``loaded``'s exported
    graph (exported or quantized first if the cache does not hold it)."""
    if backend not in BACKENDS:
        raise PflError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "torch":
        return None
    # one session per (frozen, memoized) model, graph and process: sessions are thread-safe,
    # and finding the graph hashes every weight, which a device's every phase need not redo
    key = (id(loaded.model), backend, str(cache), threads)
    if key not in _ENGINES:
        quantization = "fp32" if backend == "onnx" else backend.split("-", 1)[1]
        path = exported_graph(loaded, quantization=quantization, cache=cache,
                              progress=progress)
        # the model is kept beside its engine, so that its id cannot be reused meanwhile
        _ENGINES[key] = (loaded.model, OnnxEngine(path, loaded.tokenizer, threads=threads))
    return _ENGINES[key][1]


_ENGINES: dict[tuple, tuple] = {}


def _array(tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)


class OnnxEngine:
    """Greedy generation for mixed batches of personalized rows on an exported graph.

    ``threads``: ONNX Runtime's intra-op threads (default: ``OMP_NUM_THREADS`` or all
    cores). ``max_rank`` bounds a row's rank on a module, as in the PyTorch engine."""

    def __init__(self, path: str | Path, tokenizer, *, threads: int | None = None,
                 max_rank: int = 256):
        self.path = Path(path)
        self.tokenizer, self.max_rank = tokenizer, int(max_rank)
        options = ort.SessionOptions()
        threads = threads or int(os.environ.get("OMP_NUM_THREADS") or 0)
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:  # a graph or weights file cut short, missing or replaced: one clear error
            self.info = describe(self.path)
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise PflError(f"the ONNX graph {self.path} cannot be loaded ({type(exc).__name__}:"
                           f" a file of it is missing or damaged); delete {self.path.parent} "
                           "and it is exported again") from None
        info = self.info
        self.modules = tuple(info["modules"])
        self.num_layers, self.hidden_size = info["layers"], info["hidden_size"]
        self.shapes = {(layer, m): tuple(info["shapes"][m])
                       for layer in range(self.num_layers) for m in self.modules}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        self._outputs = ["logits", "present_key", "present_value"]
        kinds = {i.name: i.type for i in self.session.get_inputs()}
        self.dtype = np.float64 if kinds.get("past_key") == "tensor(double)" else np.float32

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> "OnnxEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check(self, adapter: RowAdapter | None) -> None:
        """Raise :class:`PflError` unless ``adapter`` fits the graph: its modules are among
        the graph's, its shapes and ranks fit, at most two PerFit stages."""
        if adapter is None:
            return
        outside = sorted({m for (_, m) in adapter.updates} - set(self.modules))
        if outside:
            wanted = ",".join(sorted(set(self.modules) | set(outside)))
            raise PflError(f"{adapter.name or 'adapter'}: the graph takes updates on "
                           f"{', '.join(self.modules)}, not {', '.join(outside)}; export "
                           f"again with --modules {wanted}")
        adapter.check(self.shapes, self.num_layers, self.hidden_size, max_rank=self.max_rank)
        if adapter.intervention is not None and len(adapter.intervention.stages) > PERFIT_STAGES:
            raise PflError(f"{adapter.name or 'adapter'}: the graph takes at most "
                           f"{PERFIT_STAGES} PerFit stages")

    # -- inputs ---------------------------------------------------------------------------

    def _factors(self, adapters: Sequence[RowAdapter | None]) -> dict[str, np.ndarray]:
        rows = len(adapters)
        feeds = {}
        for module in self.modules:
            d_out, d_in = self.info["shapes"][module]
            rank = max([u.A.shape[0] for a in adapters if a is not None
                        for (_, m), u in a.updates.items() if m == module] or [1])
            A = np.zeros((self.num_layers, rows, rank, d_in), self.dtype)
            B = np.zeros((self.num_layers, rows, d_out, rank), self.dtype)
            for row, adapter in enumerate(adapters):
                for (layer, m), update in (adapter.updates.items() if adapter else ()):
                    if m == module:
                        r = update.A.shape[0]
                        A[layer, row, :r] = _array(update.A)
                        B[layer, row, :, :r] = _array(update.B)
            feeds[f"lora_a.{module}"], feeds[f"lora_b.{module}"] = A, B
        return feeds

    def _perfit(self, adapters: Sequence[RowAdapter | None]) -> dict[str, np.ndarray]:
        rows, d = len(adapters), self.hidden_size
        stages = [a.intervention.stages if a is not None and a.intervention is not None else ()
                  for a in adapters]
        rank = max([s[layer].rank for row in stages for s in row for layer in s.layers] or [1])
        R = np.zeros((PERFIT_STAGES, self.num_layers, rows, rank, d), self.dtype)
        W, b = np.zeros_like(R), np.zeros((PERFIT_STAGES, self.num_layers, rows, rank),
                                          self.dtype)
        for row, row_stages in enumerate(stages):
            for index, stage in enumerate(row_stages):
                for layer in stage.layers:
                    arrays = stage[layer].export_arrays()
                    r = arrays["R"].shape[0]
                    R[index, layer, row, :r] = arrays["R"]
                    W[index, layer, row, :r] = arrays["W"]
                    b[index, layer, row, :r] = arrays["b"]
        return {"perfit_r": R, "perfit_w": W, "perfit_b": b}

    def _prompt_mask(self, adapters, lengths, width) -> np.ndarray:
        mask = np.zeros((len(adapters), width), self.dtype)
        for row, adapter in enumerate(adapters):
            if adapter is not None and adapter.intervention is not None:
                mask[row] = intervention_mask([lengths[row]], width,
                                              adapter.intervention.positions,
                                              "left")[0].numpy()
        return mask

    def _first_step(self, prompts, adapters):
        if len(prompts) != len(adapters) or not prompts:
            raise ValueError("give one adapter per prompt, and at least one prompt")
        if any(len(p) == 0 for p in prompts):
            raise PflError("an empty prompt cannot be continued")
        for adapter in {id(a): a for a in adapters}.values():  # a row once, not per prompt
            self.check(adapter)
        if self.session is None:
            raise PflError("the engine is closed")
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), self.pad_id, np.int64)
        attention = np.zeros((len(prompts), width), np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = prompt
            attention[row, width - len(prompt):] = 1
        positions = np.clip(attention.cumsum(-1) - 1, 0, None)
        info = self.info
        cache = np.zeros((self.num_layers, len(prompts), info["kv_heads"], 0, info["head_dim"]),
                         self.dtype)
        feeds = {"input_ids": ids, "attention_mask": attention, "position_ids": positions,
                 "past_key": cache, "past_value": cache,
                 "perfit_mask": self._prompt_mask(adapters, [len(p) for p in prompts], width),
                 **self._perfit(adapters), **self._factors(adapters)}
        return feeds

    # -- generation -----------------------------------------------------------------------

    def last_logits(self, prompts: Sequence[Sequence[int]],
                    adapters: Sequence[RowAdapter | None]) -> np.ndarray:
        """(rows, vocab) next-token logits after each prompt, each row personalized by its
        adapter, in one batch."""
        feeds = self._first_step(prompts, adapters)
        return self.session.run(["logits"], feeds)[0]

    def generate(self, prompts: Sequence[Sequence[int]],
                 adapters: Sequence[RowAdapter | None], *,
                 max_new_tokens: int = 32, min_new_tokens: int = 0) -> list[list[int]]:
        """Each prompt's greedy continuation (token ids, up to EOS), row i personalized by
        ``adapters[i]``, all rows in one batch (as :meth:`BatchedEngine.generate`)."""
        if not prompts and not adapters:
            return []
        feeds = self._first_step(prompts, adapters)
        eos = self.tokenizer.eos_token_id
        rows = len(prompts)
        done = np.zeros(rows, bool)
        out: list[list[int]] = [[] for _ in range(rows)]
        for step in range(int(max_new_tokens)):
            logits, keys, values = self.session.run(self._outputs, feeds)
            if step < min_new_tokens and eos is not None:
                logits[:, eos] = -np.inf
            tokens = logits.argmax(-1)
            for row in np.flatnonzero(~done):
                if tokens[row] == eos:
                    done[row] = True
                else:
                    out[row].append(int(tokens[row]))
            if done.all():
                break
            tokens = np.where(done, self.pad_id, tokens).astype(np.int64)
            attention = feeds["attention_mask"]
            feeds.update(
                input_ids=tokens[:, None], past_key=keys, past_value=values,
                attention_mask=np.concatenate([attention, np.ones((rows, 1), np.int64)], 1),
                position_ids=feeds["position_ids"][:, -1:] + 1,
                perfit_mask=np.zeros((rows, 1), self.dtype))
        return out
