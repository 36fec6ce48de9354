"""``pfl bench storage``: what OPPU, PerFit and PER-PCS store, on the server and per user,
against the number of users (the PER-PCS paper's Figure 7, top).

Every size is that of a real artifact built on the model's real shapes and serialized the
way this system stores it:

- OPPU: a personal LoRA (q, v; r=8) saved in the standard peft format (safetensors + config)
  by :func:`shared.methods.oppu.save_adapter_state`; the server keeps the stage-1 LoRA.
- PerFit: a user's stage-2 intervention saved as the device does (``np.savez``); the server
  keeps stage 1 and the shared stage 2.
- PER-PCS: a user's compact recipe (:meth:`Recipe.to_compact`, ``pieces_per_module``
  pieces from ``sharers`` sharers at every layer and module); the server keeps the stage-1
  LoRA and the pool: every sharer's pieces (A, B and gate, :attr:`Piece.num_bytes`) at the
  pool's sharing ratio.

Per-user sizes do not depend on the number of users, so the total for N users is
``server + N x per user``; the benchmark builds each artifact once and prints that line.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from shared.methods.oppu import attach_lora, lora_state
from shared.methods.oppu import LoraSpec, personal_lora, save_adapter_state, stage1_lora
from shared.methods.perfit import PerFitConfig, new_stages
from shared.methods.perpcs.config import PerPcsConfig
from shared.methods.perpcs.pieces import pieces_from_peft_state_dict
from shared.methods.perpcs.recipe import Recipe
from shared.models import load_model


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _lora_state(model, spec) -> dict[str, torch.Tensor]:
    with attach_lora(model, spec) as peft_model:
        return {k: v.detach().clone() for k, v in lora_state(peft_model).items()}


def bench_storage(model: str = "smollm2-135m", users: Sequence[int] = (10, 100, 1000, 10000),
                  *, sharers: int = 10, pieces_per_module: int = 3,
                  sharing_ratio: float = 1.0) -> dict[str, Any]:

    loaded = load_model(model)
    config = loaded.model.config
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        personal = _lora_state(loaded.model, personal_lora())
        save_adapter_state(personal, personal_lora(), tmp / "oppu")
        oppu_user = _dir_bytes(tmp / "oppu")
        stage1 = _lora_state(loaded.model, stage1_lora())
        stage1_bytes = int(sum(t.numel() * t.element_size() for t in stage1.values()))

        stage1_perfit, shared2 = new_stages(PerFitConfig(), config.num_hidden_layers,
                                            config.hidden_size)
        np.savez(tmp / "perfit.npz", **shared2.clone().export_arrays())
        perfit_user = (tmp / "perfit.npz").stat().st_size
        perfit_server = int(sum(a.nbytes for s in (stage1_perfit, shared2)
                                for a in s.export_arrays().values()))

    # PER-PCS: one sharer's pieces (the sharer LoRA has the pool's target modules) with gates.
    perpcs_config = PerPcsConfig()
    sharer_spec = LoraSpec(target_modules=tuple(perpcs_config.target_modules))
    sharer_state = _lora_state(loaded.model, sharer_spec)
    pieces = pieces_from_peft_state_dict(sharer_state, sharer="s0",
                                         scaling=sharer_spec.alpha / sharer_spec.r)
    piece_bytes = [p.num_bytes + 4 * p.d_in for p in pieces]  # + its gate vector (float32)
    pool_bytes = int(sharers * sharing_ratio * sum(piece_bytes))
    keys = sorted({p.key for p in pieces})
    k = min(pieces_per_module, sharers)
    entries, sources = {}, {}
    for layer, module in keys:
        ids = [hashlib.sha256(f"{layer}{module}{s}".encode()).hexdigest() for s in range(sharers)]
        sources.update({pid: f"sharer-{s}" for s, pid in enumerate(ids)})
        entries[(layer, module)] = [(ids[s], 1.0 / k) for s in range(k)]
    recipe = Recipe(entries, perpcs_config.combination, {"top_k": perpcs_config.top_k},
                    sources)
    perpcs_user = len(recipe.to_compact())

    methods = {
        "oppu": {"server": stage1_bytes, "per_user": oppu_user},
        "perfit": {"server": perfit_server, "per_user": perfit_user},
        "perpcs": {"server": stage1_bytes + pool_bytes, "per_user": perpcs_user},
    }
    rows = [{"users": n, **{f"{m}_total": v["server"] + n * v["per_user"]
                            for m, v in methods.items()}} for n in users]
    return {"model": loaded.name, "sharers": sharers, "pieces_per_module": k,
            "sharing_ratio": sharing_ratio, "pieces_per_sharer": len(pieces),
            "methods": methods, "rows": rows}


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1000
    return f"{size} B"  # pragma: no cover


def storage_table(result: dict[str, Any]) -> str:
    m = result["methods"]
    lines = [f"storage, model {result['model']}; PER-PCS pool of {result['sharers']} sharers x "
             f"{result['pieces_per_sharer']} pieces (ratio {result['sharing_ratio']}), "
             f"{result['pieces_per_module']} pieces per module in a recipe",
             f"{'':<10} {'OPPU':>12} {'PerFit':>12} {'PER-PCS':>12}",
             f"{'server':<10} " + " ".join(f"{_human(m[k]['server']):>12}"
                                           for k in ("oppu", "perfit", "perpcs")),
             f"{'per user':<10} " + " ".join(f"{_human(m[k]['per_user']):>12}"
                                             for k in ("oppu", "perfit", "perpcs")),
             "total for N users (server + N x per user):"]
    for row in result["rows"]:
        lines.append(f"{row['users']:>10,} " + " ".join(
            f"{_human(row[k + '_total']):>12}" for k in ("oppu", "perfit", "perpcs")))
    oppu, perpcs = m["oppu"]["per_user"], m["perpcs"]["per_user"]
    lines.append(f"per user: OPPU / PER-PCS = {oppu / perpcs:,.0f}x, OPPU / PerFit = "
                 f"{oppu / m['perfit']['per_user']:,.0f}x")
    return "\n".join(lines)


def storage_plot(result: dict[str, Any], path: Path) -> Path:
    # lazy: matplotlib loads only when a figure is drawn
    from simulations.plots import new_figure, save_figure

    fig, axis = new_figure(size=(5.5, 4))
    xs = [r["users"] for r in result["rows"]]
    for key, label in (("oppu", "OPPU"), ("perfit", "PerFit"), ("perpcs", "PER-PCS")):
        axis.plot(xs, [r[f"{key}_total"] / 1e6 for r in result["rows"]], marker="o", label=label)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("users")
    axis.set_ylabel("total storage (MB)")
    axis.set_title(f"storage vs users, {result['model']}")
    axis.legend()
    return save_figure(fig, path)
