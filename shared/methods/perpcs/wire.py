"""PER-PCS's wire format: a recipe (piece ids and weights per layer and module) as the
inference service receives it (``Recipe`` in proto/pfl.proto), validated when decoded."""

from __future__ import annotations

import json
import math

from shared.methods.perpcs.recipe import Recipe
from shared.serialization import InvalidPiece, RemoteKind, is_piece_id, register_remote_kind
from shared.wire import pfl_pb2


def recipe_to_proto(recipe: Recipe) -> pfl_pb2.Recipe:
    """A PER-PCS recipe as a wire Recipe."""
    msg = pfl_pb2.Recipe(combination=recipe.combination,
                         config_json=json.dumps(recipe.config, sort_keys=True,
                                                separators=(",", ":")))
    for (layer, module), items in recipe.entries.items():
        msg.entries.add(layer=layer, module=module,
                        items=[pfl_pb2.RecipeItem(piece_id=p, weight=w) for p, w in items])
    return msg


def recipe_from_proto(msg: pfl_pb2.Recipe) -> Recipe:
    """Decode and validate a wire Recipe (piece ids well formed, weights finite)."""
    entries = {}
    for entry in msg.entries:
        key = (entry.layer, entry.module)
        if key in entries:
            raise InvalidPiece(f"recipe: layer {entry.layer} {entry.module} appears twice")
        for item in entry.items:
            if not is_piece_id(item.piece_id):
                raise InvalidPiece(f"recipe: malformed piece id {item.piece_id[:70]!r}")
            if not math.isfinite(item.weight) or abs(item.weight) > MAX_RECIPE_WEIGHT:
                raise InvalidPiece(f"recipe: weight {item.weight!r} of layer {entry.layer} "
                                   f"{entry.module} is not a finite number within "
                                   f"+-{MAX_RECIPE_WEIGHT:g}")
        entries[key] = [(item.piece_id, item.weight) for item in entry.items]
    if len(msg.config_json) > MAX_RECIPE_CONFIG:
        raise InvalidPiece(f"recipe: config of {len(msg.config_json)} characters (at most "
                           f"{MAX_RECIPE_CONFIG})")
    try:
        config = json.loads(msg.config_json) if msg.config_json else {}
    except RecursionError:
        raise InvalidPiece("recipe: config is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise InvalidPiece(f"recipe: config is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidPiece("recipe: config is not a JSON object")
    return Recipe(entries, msg.combination, config)


#: A recipe item's weight is a mixing weight (a gate's share, about 0..1): far beyond this
#: it can only overflow the assembly.
MAX_RECIPE_WEIGHT = 1e4
#: Characters of a recipe's ``config_json`` (the settings that produced it).
MAX_RECIPE_CONFIG = 64 << 10


register_remote_kind(RemoteKind(
    "perpcs", None,  # piece ids and weights of the service's own pool: no tensor leaves
    lambda msg: ({}, {"recipe_pieces": sum(len(e.items) for e in msg.entries)}, {})))
