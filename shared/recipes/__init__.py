"""Training recipes: the learning rates, epochs and steps of every trained part, per base model.

A recipe is a JSON file whose ``options`` use the same sections as ``--set SECTION.KEY=VALUE``
(and a federation's ``method-options``):

- ``stage1``: the stage-1 task LoRA's :class:`~shared.training.TrainConfig` (``lr``,
  ``epochs``, ``batch_size``, ...);
- ``oppu``: the personal LoRA's TrainConfig (OPPU, LoRA-P and the PER-PCS sharers);
- ``perpcs``: :class:`~shared.methods.perpcs.PerPcsConfig` (``gate_lr``, ``gate_steps``, ...);
- ``perfit``: :class:`~shared.methods.perfit.PerFitConfig` (``lr``, ``epochs``, ranks, ...).

``paper`` is the papers' recipe (Llama-2-7B, users with hundreds of items): the code's
defaults, an empty ``options``. ``tuned`` is the recipe that ``pfl tune`` chose for this base
model and task on validation users (never on reported targets), shipped in this package as
``recipes/<model>/<task>.json``, with the tuning report beside it; where none ships, ``tuned``
falls back to ``paper`` and says so. Any other value is the path of a recipe file.

Settings given on the command line (``--set``, ``--stage1-epochs`` ...) override the recipe's
(:func:`over_recipe`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from shared.errors import PflError
from shared.settings import section as settings_section

log = logging.getLogger(__name__)

FORMAT = "pfl-recipe/1"
PACKAGED = Path(__file__).resolve().parent
#: top-level options a recipe may set
TOP_LEVEL = ("stage1_epochs", "personal_epochs")


def packaged_path(model: str, task: str) -> Path:
    return PACKAGED / model / f"{task}.json"


def check_options(options: Any, where: str) -> dict:
    """``options`` if it is a recipe's options (known sections of scalar values), else a
    PflError naming the problem."""
    if not isinstance(options, dict):
        raise PflError(f"{where}: options must be an object")
    for key, value in options.items():
        if key in TOP_LEVEL:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise PflError(f"{where}: {key} must be a positive number")
            continue
        known = settings_section(key, where)  # registered by a method folder
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float, str, bool, type(None)))
                for k, v in value.items()):
            raise PflError(f"{where}: {key} must map field names to plain values")
        known.check(value, where)
    return options


def read_recipe(path: Path) -> dict:
    """A recipe file's content, checked."""
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PflError(f"no recipe file at {path}") from None
    except RecursionError:
        raise PflError(f"{path} is not a recipe file (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PflError(f"{path} is not a recipe file ({exc})") from None
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise PflError(f"{path} is not a recipe file (format is not {FORMAT!r})")
    check_options(recipe.get("options"), str(path))
    return recipe


def resolve_recipe(spec: str | None, model: str, task: str) -> tuple[str, dict]:
    """(name, options) of ``--recipe spec`` for this model and task.

    ``paper`` -> the code's defaults; ``tuned`` (the default) -> the packaged recipe of this
    model and task, else ``paper``; anything else -> a recipe file, which must have been made
    for this model and task.
    """
    spec = (spec or "tuned").strip()
    if spec == "paper":
        return "paper", {}
    if spec == "tuned":
        path = packaged_path(model, task)
        if not path.is_file():
            log.info("no tuned recipe for %s on %s: using the papers' recipe", model, task)
            return "paper", {}
        return f"tuned ({model}/{task})", read_recipe(path)["options"]
    path = Path(spec).expanduser()
    recipe = read_recipe(path)
    made_for = (recipe.get("model"), recipe.get("task"))
    if made_for != (model, task):
        raise PflError(f"{path} was tuned for model {made_for[0]} on {made_for[1]}, not "
                       f"{model} on {task}: recipes are per base model and task")
    return str(path), recipe["options"]


#: top-level options (the command line's epoch flags) that set a field of a section
FLAG_FIELDS = {"stage1_epochs": ("stage1", "epochs"), "personal_epochs": ("oppu", "epochs")}


def over_recipe(recipe: Mapping[str, Any], options: Mapping[str, Any]) -> dict:
    """A run's ``options`` laid over its ``recipe``: the options win field by field, and
    their epoch flags (``stage1_epochs``, ``personal_epochs``) also win over the recipe's
    ``stage1.epochs`` / ``oppu.epochs``. A section or field that no method registered is
    an error naming the closest known one."""
    for key, value in options.items():
        if isinstance(value, Mapping):
            settings_section(key, "settings").check(value, "settings")
    flagged = merge_options({}, options)  # a copy, sections included
    for flag, (section, key) in FLAG_FIELDS.items():
        if flag in options and key not in (options.get(section) or {}):
            flagged.setdefault(section, {})[key] = options[flag]
    return merge_options(recipe, flagged)


def merge_options(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict:
    """``base`` with ``override`` on top; sections (dicts) are merged key by key."""
    merged = {key: dict(value) if isinstance(value, dict) else value
              for key, value in base.items()}
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged
