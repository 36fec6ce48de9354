"""``pfl export onnx``: the base model as one ONNX graph (:mod:`edge_client.ondevice.graph`),
exported once per model and kept in the cache like the safetensors copy, plus weight-only
quantized variants made from it with ONNX Runtime's own quantizer.

Layout: ``CACHE/onnx/<model>-<digest>-<modules>-g<format>/`` holds ``model.onnx`` (with its
weights in ``model.onnx.data``) and, once asked for, ``model-int8.onnx`` / ``model-int4.onnx``
(weight-only, ``MatMulNBits``, block 32). Each graph carries a JSON description in its
metadata (``pfl``): the model, the base digest, the modules that take updates, the shapes;
:func:`describe` reads it back. A folder is written under a temporary name and renamed, so a
reader never sees a half-written export.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import onnx
import torch

from edge_client.ondevice.graph import (DEFAULT_MODULES, OUTPUT_NAMES, DecoderStep,
                                        example_inputs, input_names)
from shared.errors import PflError
from shared.files import write_dir_atomically
from shared.methods.store import model_digest
from shared.models import cache_dir
from shared.serving.rows import module_shapes

log = logging.getLogger(__name__)

#: Bumped when the graph's inputs, outputs or computation change (old exports are not reused).
GRAPH_FORMAT = 1
QUANTIZATIONS = ("fp32", "int8", "int4")
#: Block size of the weight-only quantization (ONNX Runtime's MatMulNBits): per 32 weights of
#: a column, one scale and zero point.
QUANT_BLOCK = 32
#: MatMulNBits' compute type: 4 = int8 activations (quantized per block on the fly) with
#: the integer kernels, the fast path on x86 and ARM CPUs.
ACCURACY_LEVEL = 4

# which axes of each input are dynamic, and their names in the written graph
_DYNAMIC_AXES = {
    "input_ids": {0: "batch", 1: "steps"},
    "attention_mask": {0: "batch", 1: "total"},
    "position_ids": {0: "batch", 1: "steps"},
    "past_key": {1: "batch", 3: "past"},
    "past_value": {1: "batch", 3: "past"},
    "perfit_r": {2: "batch", 3: "perfit_rank"},
    "perfit_w": {2: "batch", 3: "perfit_rank"},
    "perfit_b": {2: "batch", 3: "perfit_rank"},
    "perfit_mask": {0: "batch", 1: "steps"},
}
_OUTPUT_AXES = {"logits": {0: "batch"}, "present_key": {1: "batch", 3: "total"},
                "present_value": {1: "batch", 3: "total"}}


def _axes(name: str) -> dict[int, str]:
    if name.startswith("lora_a."):
        return {1: "batch", 2: f"rank.{name[7:]}"}
    if name.startswith("lora_b."):
        return {1: "batch", 3: f"rank.{name[7:]}"}
    return _DYNAMIC_AXES[name]


def export_folder(loaded, modules: Sequence[str], digest: str, cache=None) -> Path:
    """Where the export of ``loaded`` (whose :func:`model_digest` is ``digest``) with updates
    on ``modules`` is kept."""
    tag = "+".join(sorted(modules))
    return cache_dir(cache) / "onnx" / f"{loaded.name}-{digest[:16]}-{tag}-g{GRAPH_FORMAT}"


def graph_file(folder: Path, quantization: str = "fp32") -> Path:
    if quantization not in QUANTIZATIONS:
        raise PflError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, "
                       f"not {quantization!r}")
    return folder / ("model.onnx" if quantization == "fp32" else f"model-{quantization}.onnx")


def exported_graph(loaded, *, modules: Sequence[str] | None = None,
                   quantization: str = "fp32", cache=None, progress=print) -> Path:
    """The graph file of ``loaded`` (fp32, or a weight-only quantized variant), exported or
    quantized now if the cache does not hold it yet."""
    modules = tuple(modules or DEFAULT_MODULES)
    digest = model_digest(loaded.model)
    folder = export_folder(loaded, modules, digest, cache)
    target = graph_file(folder, quantization)
    if target.is_file():
        return target
    if not graph_file(folder).is_file():
        progress(f"exporting {loaded.name} to ONNX (once; kept in {folder})")
        started = time.monotonic()
        write_dir_atomically(folder, lambda tmp: export_graph(
            loaded, tmp / "model.onnx", modules, digest))
        progress(f"exported in {time.monotonic() - started:.0f} s")
    if quantization != "fp32":
        progress(f"quantizing {loaded.name}'s graph to {quantization} (weight-only, once)")
        quantize_graph(graph_file(folder), target, bits=8 if quantization == "int8" else 4)
    return target


def export_graph(loaded, path: Path, modules: Sequence[str], digest: str) -> dict:
    """Export ``loaded``'s :class:`DecoderStep` to ``path`` (weights beside it, in
    ``path.data``) and return the description stored in its metadata."""
    model = loaded.model
    if next(model.parameters()).device.type != "cpu":
        raise PflError("export from a model on the CPU (--device cpu)")
    step = DecoderStep(model, modules).eval()
    example = example_inputs(model, modules)
    names = input_names(modules)

    def shapes(name, tensor):
        dynamic = _axes(name)
        return {axis: (torch.export.Dim.AUTO if axis in dynamic else torch.export.Dim.STATIC)
                for axis in range(tensor.dim())}

    fixed = [shapes(n, t) for n, t in zip(names[:9], example[:9])]
    factors = tuple(shapes(n, t) for n, t in zip(names[9:], example[9:]))
    with torch.no_grad():
        program = torch.onnx.export(step, example, dynamo=True, input_names=names,
                                    output_names=OUTPUT_NAMES,
                                    dynamic_shapes=(*fixed, factors), optimize=True,
                                    verbose=False)
    proto = program.model_proto
    _name_axes(proto)
    info = describe_model(loaded, modules, digest)
    proto.metadata_props.add(key="pfl", value=json.dumps(info, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return info


def _name_axes(proto) -> None:
    """Give the graph's dynamic axes readable names (batch, steps, past, total, rank.M ...)
    everywhere they occur, instead of the exporter's s0, s1 ..."""
    rename: dict[str, str] = {}
    for value, axes in [(v, _axes(v.name)) for v in proto.graph.input] + \
            [(v, _OUTPUT_AXES[v.name]) for v in proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for axis, name in axes.items():
            if dims[axis].dim_param:
                rename.setdefault(dims[axis].dim_param, name)
    for value in list(proto.graph.input) + list(proto.graph.output) + \
            list(proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def describe_model(loaded, modules: Sequence[str], digest: str) -> dict:
    """What a runtime needs to know about the graph of ``loaded`` (stored in its metadata)."""
    config = loaded.model.config
    heads = int(config.num_attention_heads)
    shapes = module_shapes(loaded.model, modules)
    return {"format": GRAPH_FORMAT, "model": loaded.name, "base_digest": digest,
            "modules": list(modules), "layers": int(config.num_hidden_layers),
            "hidden_size": int(config.hidden_size), "heads": heads,
            "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
            "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            "vocab_size": int(config.vocab_size),
            "shapes": {m: list(shapes[(0, m)]) for m in modules},
            "quantization": "fp32"}


def describe(path: str | Path) -> dict:
    """The ``pfl`` description in a graph's metadata (raises :class:`PflError` if absent)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises its own types for a bad file
        raise PflError(f"{path}: not a readable ONNX graph ({type(e).__name__})") from None
    for prop in proto.metadata_props:
        if prop.key == "pfl":
            info = json.loads(prop.value)
            if info.get("format") != GRAPH_FORMAT:
                raise PflError(f"{path}: graph format {info.get('format')}, this pfl reads "
                               f"{GRAPH_FORMAT}: export again (pfl export onnx)")
            return info
    raise PflError(f"{path}: not a pfl graph (no 'pfl' metadata); export with pfl export onnx")


def quantize_graph(source: Path, target: Path, *, bits: int) -> None:
    """A weight-only quantized copy of ``source``: every MatMul with a constant weight (the
    linear layers; the per-row factors are inputs and stay float) becomes ONNX Runtime's
    ``MatMulNBits`` with ``bits``-bit weights in blocks of :data:`QUANT_BLOCK` (symmetric),
    computed with int8 activations (:data:`ACCURACY_LEVEL`). Embeddings and the tied lm head
    (a Gemm) stay float32."""
    # lazy: the quantizer pulls in sympy and more, needed only here
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                  MatMulNBitsQuantizer)

    model = onnx.load(str(source))
    config = DefaultWeightOnlyQuantConfig(block_size=QUANT_BLOCK, is_symmetric=True, bits=bits,
                                          accuracy_level=ACCURACY_LEVEL)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=QUANT_BLOCK,
                                     is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                     algo_config=config)
    quantizer.process()
    proto = quantizer.model.model
    for prop in proto.metadata_props:
        if prop.key == "pfl":
            info = json.loads(prop.value)
            info["quantization"] = f"int{bits}"
            prop.value = json.dumps(info, sort_keys=True)
    tmp = target.with_name(target.name + ".tmp")
    onnx.save_model(proto, str(tmp), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=target.name + ".data",
                    size_threshold=1024)
    # the graph last: a reader that finds it finds its weights
    tmp.rename(target)
