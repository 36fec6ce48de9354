"""``pfl export onnx``: write (or find in the cache) the base model's ONNX graph and its
weight-only quantized variants, optionally copied to a folder to ship to devices.

    pfl export onnx                              # SmolLM2-135M, fp32, into the cache
    pfl export onnx --quantize int8,int4 --out dist/onnx
    pfl generate --backend onnx --prompt "..."   # answer with it (edge_client.generate_cli)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from shared.errors import PflError


def cmd_export(args) -> int:
    """Export the base model to ONNX for on-device inference (once; kept in the cache)."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from edge_client.ondevice.export import QUANTIZATIONS, describe, exported_graph
    from shared.models import load_model

    quantizations = ["fp32"] + [q for q in (args.quantize or "").split(",")
                                if q and q != "fp32"]
    for q in quantizations:
        if q not in QUANTIZATIONS:
            raise PflError(f"--quantize: {q!r} is not one of {', '.join(QUANTIZATIONS[1:])}")
    modules = [m for m in (args.modules or "").split(",") if m] or None
    loaded = load_model(args.model, device="cpu", cache=args.cache_dir)
    print(f"{'graph':6}  {'size':>9}  path")
    for q in quantizations:
        path = exported_graph(loaded, modules=modules, quantization=q, cache=args.cache_dir)
        files = [path, path.with_name(path.name + ".data")]
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copyfile(f, out / f.name)
            path = out / path.name
        size = sum(f.stat().st_size for f in files)
        print(f"{q:6}  {size / 2**20:7.1f} MB  {path}")
    info = describe(path)
    print(f"model {info['model']} ({info['layers']} layers), updates on "
          f"{', '.join(info['modules'])}, PerFit stages as inputs; base digest "
          f"{info['base_digest'][:16]}")
    return 0


def add_export_command(subparsers) -> None:
    """Register ``pfl export onnx`` on an argparse subparsers object."""
    export = subparsers.add_parser("export", help="export the base model for on-device "
                                   "inference", description=cmd_export.__doc__)
    export.add_argument("format", choices=["onnx"])
    export.add_argument("--model", default=None, help="base model (default smollm2-135m)")
    export.add_argument("--modules", default=None,
                        help="linear modules whose per-row LoRA factors are inputs (default "
                             "q_proj,k_proj,v_proj,o_proj: every method's default)")
    export.add_argument("--quantize", default=None, metavar="int8,int4",
                        help="also write weight-only quantized variants")
    export.add_argument("--out", default=None,
                        help="copy the graphs (and their .data weights) to this folder")
    export.add_argument("--cache-dir", default=None,
                        help="the model cache (default $PFL_CACHE_DIR or ~/.cache/pfl)")
    export.set_defaults(func=cmd_export)
