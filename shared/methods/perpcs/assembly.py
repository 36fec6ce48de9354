"""Auto-regressive, layer-by-layer assembly of a target's adapter from pool pieces (no training).

For each batch of the target's history examples one forward pass of the (stage-1) model runs
with an empty :class:`~shared.methods.perpcs.pieces.PieceLinear` on every (layer, module) that has
candidates. Just before a wrapped module runs, a pre-hook scores every candidate piece s of
that (layer, module) on the module's input v::

    alpha_s = sum over scored positions t of cos(g_s, v_t)

keeps the top-k, weighs them ``w = softmax(alpha / sqrt(n))`` (n = d_in, the embedding
dimension) and installs the combined update on the wrapper at once. The forward pass then
continues through that module *with* its assembled update, so every later module and layer is
scored on activations that include the assembled earlier ones (auto-regressive; one forward
pass per batch does the whole stack, as in the authors' code). Per-batch selections are
averaged over all batches into a :class:`~shared.methods.perpcs.recipe.Recipe`.

Scored positions ("output"): the positions whose next token is a target token, i.e. the
positions that produce the item's output (the same positions the loss, and so the gates, were
trained on; the authors' code uses these too); a row without target tokens is scored on all of
its tokens. "target_tokens": the output tokens themselves (one position later), same fallback.
"all": every non-padding token.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from shared.methods.perpcs.config import PerPcsConfig
from shared.methods.perpcs.pieces import Key, Piece, combine, key_order, wrapped
from shared.methods.perpcs.recipe import Recipe, average_weights, float16_value
from shared.training import Example, batches, target_positions

#: on_score(layer, module, inputs (N, d_in), alphas (m,), candidate piece ids) for tracing.
ScoreCallback = Callable[[int, str, torch.Tensor, torch.Tensor, list[str]], None]
#: fetch(piece ids) -> {piece id: Piece}: where a pool of gates gets the pieces it selects
Fetch = Callable[[Sequence[str]], Mapping[str, Piece]]


def group_candidates(pool: Sequence[Piece],
                     modules: Sequence[str] | None = None) -> dict[Key, list[Piece]]:
    """Pool pieces by (layer, module), each list sorted by piece id (a stable tie order).

    Pieces on modules outside ``modules`` are left out; ungated pieces are an error (a
    piece cannot be scored without its gate); the same content twice is kept once.
    """
    groups: dict[Key, dict[str, Piece]] = defaultdict(dict)
    for piece in pool:
        if modules is not None and piece.module not in modules:
            continue
        if piece.gate is None:
            raise ValueError(f"{piece!r} has no gate: train gates before pooling it")
        groups[piece.key][piece.piece_id] = piece
    return {key: [group[pid] for pid in sorted(group)]
            for key, group in sorted(groups.items(), key=lambda kv: key_order(kv[0]))}


def scoring_mask(batch: dict, positions: str = "output") -> torch.Tensor:
    """(batch, seq) bool: the positions whose module inputs are scored (module docstring)."""
    attended = batch["attention_mask"].bool()
    if positions == "all":
        return attended
    if positions == "target_tokens":
        mask = batch["labels"] != -100
    else:
        mask = torch.zeros_like(attended)
        (rows, cols), _ = target_positions(batch["labels"])
        mask[rows, cols] = True
    empty = ~mask.any(dim=1)
    mask[empty] = attended[empty]
    return mask


def select_pieces(alphas: torch.Tensor, piece_ids: Sequence[str], top_k: int,
                  dim: int) -> list[tuple[int, float]]:
    """Top-k candidates by alpha (ties: lower piece id first) with softmax(alpha / sqrt(dim))
    weights over the kept ones; returns [(candidate index, weight)], best first."""
    values = alphas.detach().double().cpu().tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], piece_ids[i]))[:top_k]
    kept = torch.tensor([values[i] for i in order], dtype=torch.float64) / math.sqrt(dim)
    # float16 values: what a recipe stores, so scoring uses exactly the stored weights
    weights = [float16_value(w) for w in torch.softmax(kept, dim=0).tolist()]
    return list(zip(order, weights))


@torch.no_grad()
def assemble(model: torch.nn.Module, pool: Sequence[Piece], examples: Sequence[Example],
             pad_id: int, config: PerPcsConfig | None = None, *,
             on_score: ScoreCallback | None = None, progress: bool = False,
             fetch: Fetch | None = None) -> Recipe:
    """Assemble a target's adapter from ``pool`` on its history ``examples``; no training.

    With ``fetch`` the pool may hold gates only (anything with ``piece_id``, ``sharer``,
    ``layer``, ``module``, ``gate``, e.g. :class:`shared.serialization.Gate`): a piece's
    factors are fetched (``fetch(ids) -> {id: Piece}``, once each) when a layer first
    selects it, and its gate must equal the one it was scored with. The recipe is the same
    as with the whole pool (``tests/test_perpcs.py``); a device downloads only what it uses.

    ``model`` is the (stage-1) model; it is left exactly as it was. Returns the recipe (piece
    ids and averaged weights per layer and module); :func:`~shared.methods.perpcs.recipe.
    rebuild` turns it into the adapter. ``config.autoregressive=False`` scores every layer on
    the stage-1 model's own activations (an ablation).
    """
    config = config or PerPcsConfig()
    if not examples:
        raise ValueError("assembly needs the target's history: no examples")
    candidates = group_candidates(pool, config.target_modules)
    if not candidates:
        raise ValueError("the pool has no pieces for the target modules")
    device = next(model.parameters()).device
    # Unit-norm gates per (layer, module), on the model's device, float32.
    gates = {key: F.normalize(torch.stack([p.gate.float() for p in pieces]), dim=-1).to(device)
             for key, pieces in candidates.items()}
    ids = {key: [p.piece_id for p in pieces] for key, pieces in candidates.items()}
    state: dict = {"mask": None, "selection": {}}
    fetched: dict[str, Piece] = {}

    def factors(entries: list) -> list[Piece]:
        """The chosen entries as whole pieces (fetched once each when the pool is gates)."""
        if fetch is None:
            return entries
        missing = [e.piece_id for e in entries if e.piece_id not in fetched]
        if missing:
            got = fetch(missing)
            for entry in (e for e in entries if e.piece_id in missing):
                piece = got.get(entry.piece_id)
                if piece is None or piece.piece_id != entry.piece_id or piece.gate is None \
                        or not torch.equal(piece.gate.float().reshape(-1),
                                           entry.gate.float().reshape(-1)):
                    raise ValueError(f"fetched piece {entry.piece_id[:12]} does not match "
                                     "the gate it was scored with")
                fetched[entry.piece_id] = piece
        return [fetched[e.piece_id] for e in entries]

    def make_hook(key: Key):
        def hook(module, args):
            x = args[0]
            v = x[state["mask"]].float()  # (N, d_in) inputs at the scored positions
            alphas = (F.normalize(v, dim=-1) @ gates[key].t()).sum(dim=0)
            if on_score is not None:
                on_score(key[0], key[1], v, alphas, ids[key])
            chosen = select_pieces(alphas, ids[key], config.top_k, v.shape[-1])
            state["selection"][key] = [(ids[key][i], w) for i, w in chosen]
            if config.autoregressive:
                module.set_update(combine(factors([candidates[key][i] for i, _ in chosen]),
                                          [w for _, w in chosen], config.combination))
        return hook

    decoder = model.get_decoder()
    per_batch: list[dict] = []
    was_training = model.training
    model.eval()
    with wrapped(model, candidates) as installed:
        handles = [installed[key].register_forward_pre_hook(make_hook(key)) for key in installed]
        try:
            todo = list(batches(examples, config.assembly_batch_size, pad_id, shuffle=False,
                                device=device))
            for batch in tqdm(todo, desc="assemble", disable=not progress, leave=False):
                for wrapper in installed.values():
                    wrapper.set_update(None)
                state["mask"], state["selection"] = scoring_mask(batch, config.score_positions), {}
                decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                missing = set(installed) - set(state["selection"])
                if missing:
                    raise RuntimeError(f"modules never ran during assembly: {sorted(missing)}")
                per_batch.append(state["selection"])
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
    settings = config.to_dict()
    settings["batches"] = len(per_batch)
    sources = {p.piece_id: p.sharer for pieces in candidates.values() for p in pieces}
    return Recipe(average_weights(per_batch), config.combination, settings, sources)
