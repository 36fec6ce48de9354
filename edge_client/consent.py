"""The device's consent policy: what may leave the device, read from a TOML file.

The documented defaults ship as ``edge_client/consent_default.toml``; a user's file overrides
any of its keys. Every allowed upload has a *rule name* such as ``"upload.stage1_lora"``
(the TOML section and key that allowed it), which the audit ledger records::

    policy = ConsentPolicy.load("consent.toml")       # or ConsentPolicy.load(None): defaults
    rule = policy.require("stage1_lora")              # "upload.stage1_lora" or ConsentDenied
    shared = policy.filter_pieces(pieces, seed=0)     # [] unless the user opted in

Kinds of upload (:data:`KINDS`): ``stage1_lora``, ``perfit_stage1``, ``oppu_personal_lora``,
``perfit_stage2``, ``perpcs_pieces`` (further limited by ``[sharing]``), ``cluster_index``,
``embeddings``, ``metrics`` and ``inference_remote`` (a query answered by the cloud's inference
service: its prompt text and the user's personal parameters leave the device).
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterable, Sequence

from shared.errors import PflError
from shared.methods.perpcs.gates import select_shared_pieces

DEFAULT_POLICY_FILE = "consent_default.toml"
POLICY_VERSION = 1
#: Modules a piece may come from (the Llama decoder layer's projections).
KNOWN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Upload kind -> (TOML section, key) of the boolean that allows it.
KINDS: dict[str, tuple[str, str]] = {
    "stage1_lora": ("upload", "stage1_lora"),
    "perfit_stage1": ("upload", "perfit_stage1"),
    "oppu_personal_lora": ("upload", "oppu_personal_lora"),
    "perfit_stage2": ("upload", "perfit_stage2"),
    "perpcs_pieces": ("upload", "perpcs_pieces"),
    "cluster_index": ("upload", "cluster_index"),
    "embeddings": ("embeddings", "may_leave_device"),
    "metrics": ("metrics", "may_report"),
    "inference_remote": ("inference", "remote"),
}
_SECTIONS = {"upload": {key for section, key in KINDS.values() if section == "upload"},
             "sharing": {"layers", "modules", "ratio"},
             "embeddings": {"may_leave_device"},
             "metrics": {"may_report"},
             "inference": {"remote"}}


class ConsentDenied(PflError):
    """An upload the consent policy does not allow; the message names the rule."""

    def __init__(self, message: str, rule: str):
        super().__init__(message)
        self.rule = rule


# ----------------------------------------------------------------------------- parsing
def _check_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise PflError(f"{where} must be true or false, got {value!r}")
    return value


def _check_layers(value: Any, where: str) -> str | tuple[int, ...]:
    if value == "all":
        return "all"
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                       and v >= 0 for v in value):
        return tuple(sorted(set(value)))
    raise PflError(f"{where} must be \"all\" or a list of layer indices (integers >= 0), "
                   f"got {value!r}")


def _check_modules(value: Any, where: str) -> str | tuple[str, ...]:
    if value == "all":
        return "all"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        unknown = [v for v in value if v not in KNOWN_MODULES]
        if not unknown:
            return tuple(m for m in KNOWN_MODULES if m in value)
        raise PflError(f"{where}: unknown module {unknown[0]!r} (known: "
                       f"{', '.join(KNOWN_MODULES)})")
    raise PflError(f"{where} must be \"all\" or a list of module names, got {value!r}")


def _check_ratio(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0.0 < float(value) <= 1.0:
        raise PflError(f"{where} must be a number in (0, 1], got {value!r}")
    return float(value)


_CHECKS = {("sharing", "layers"): _check_layers, ("sharing", "modules"): _check_modules,
           ("sharing", "ratio"): _check_ratio}


def _parse(data: dict, source: str) -> dict[tuple[str, str], Any]:
    """Validated ``{(section, key): value}`` of a parsed TOML document."""
    values: dict[tuple[str, str], Any] = {}
    for section, table in data.items():
        if section == "version":
            if isinstance(table, bool) or table != POLICY_VERSION:
                raise PflError(f"{source}: version must be {POLICY_VERSION}, got {table!r}")
            continue
        if section not in _SECTIONS:
            raise PflError(f"{source}: unknown key {section!r} (known: version, "
                           f"{', '.join('[' + s + ']' for s in _SECTIONS)})")
        if not isinstance(table, dict):
            raise PflError(f"{source}: {section!r} must be a table [{section}]")
        for key, value in table.items():
            if key not in _SECTIONS[section]:
                raise PflError(f"{source}: unknown key [{section}] {key} (known: "
                               f"{', '.join(sorted(_SECTIONS[section]))})")
            check = _CHECKS.get((section, key), _check_bool)
            values[(section, key)] = check(value, f"{source}: [{section}] {key}")
    return values


def _read_toml(path: str | os.PathLike) -> dict:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise PflError(f"no consent policy file at {path}")
    except IsADirectoryError:
        raise PflError(f"{path} is a directory, not a consent policy file")
    except tomllib.TOMLDecodeError as exc:
        raise PflError(f"{path}: malformed TOML: {exc}")
    except UnicodeDecodeError:
        raise PflError(f"{path}: not UTF-8 text (a consent policy is a TOML file)")


def _defaults() -> dict[tuple[str, str], Any]:
    text = resources.files("edge_client").joinpath(DEFAULT_POLICY_FILE).read_text("utf-8")
    values = _parse(tomllib.loads(text), DEFAULT_POLICY_FILE)
    expected = {(s, k) for s, keys in _SECTIONS.items() for k in keys}
    assert set(values) == expected, "consent_default.toml must set every key"
    return values


# ------------------------------------------------------------------------------ policy
@dataclass(frozen=True)
class ConsentPolicy:
    """A validated consent policy; ``source`` is the file it came from (or "defaults")."""

    values: dict[tuple[str, str], Any] = field(repr=False)
    source: str = "defaults"

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "ConsentPolicy":
        """The policy in ``path`` over the documented defaults; None gives the defaults.
        Unknown keys, bad values and malformed TOML raise PflError naming key and file."""
        values = _defaults()
        if path is None:
            return cls(values)
        values.update(_parse(_read_toml(path), str(path)))
        return cls(values, str(path))

    # ------------------------------------------------------------------ settings
    def setting(self, section: str, key: str) -> Any:
        """The effective value of ``[section] key``."""
        return self.values[(section, key)]

    @property
    def layers(self) -> str | tuple[int, ...]:
        """Layers whose pieces may be shared: "all" or sorted indices."""
        return self.setting("sharing", "layers")

    @property
    def modules(self) -> str | tuple[str, ...]:
        """Modules whose pieces may be shared: "all" or names."""
        return self.setting("sharing", "modules")

    @property
    def ratio(self) -> float:
        """Fraction of eligible pieces that is shared."""
        return self.setting("sharing", "ratio")

    def check_model(self, num_layers: int) -> "ConsentPolicy":
        """Raise PflError when ``[sharing] layers`` names a layer the model does not have (a
        policy written for another model should not silently mean something else)."""
        if self.layers != "all" and any(layer >= num_layers for layer in self.layers):
            raise PflError(f"consent policy ({self.source}): [sharing] layers lists layer "
                           f"{max(self.layers)}, but the model has layers 0..{num_layers - 1}")
        return self

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """The effective policy as ``{section: {key: value}}`` (lists for tuples)."""
        out: dict[str, dict[str, Any]] = {}
        for (section, key), value in sorted(self.values.items()):
            out.setdefault(section, {})[key] = list(value) if isinstance(value, tuple) else value
        return out

    @property
    def fingerprint(self) -> str:
        """Hex sha256 of the effective policy (to tie ledger entries to the policy in force)."""
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    # ------------------------------------------------------------------- decisions
    def _denial(self, kind: str, layer: int | None, module: str | None) -> str | None:
        """Why ``kind`` is not allowed (None when it is)."""
        if kind not in KINDS:
            raise ValueError(f"unknown upload kind {kind!r} (known: {', '.join(KINDS)})")
        section, key = KINDS[kind]
        if not self.setting(section, key):
            return f"[{section}] {key} = false"
        if kind == "perpcs_pieces":
            if layer is not None and self.layers != "all" and int(layer) not in self.layers:
                return f"layer {layer} is outside [sharing] layers = {list(self.layers)}"
            if module is not None and self.modules != "all" and module not in self.modules:
                return f"module {module} is outside [sharing] modules = {list(self.modules)}"
        return None

    def allows(self, kind: str, *, layer: int | None = None,
               module: str | None = None) -> str | None:
        """The rule name that allows uploading ``kind`` (e.g. ``"upload.perpcs_pieces"``),
        or None. ``layer`` / ``module`` narrow a piece upload to the ``[sharing]`` scope."""
        if self._denial(kind, layer, module) is not None:
            return None
        section, key = KINDS[kind]
        return f"{section}.{key}"

    def require(self, kind: str, *, layer: int | None = None, module: str | None = None) -> str:
        """Like :meth:`allows`, but raise :class:`ConsentDenied` naming the rule when not."""
        why = self._denial(kind, layer, module)
        section, key = KINDS[kind]
        if why is not None:
            raise ConsentDenied(f"consent policy ({self.source}) does not allow "
                                f"{'uploading ' if section == 'upload' else ''}{kind} "
                                f"(rule {section}.{key}): {why}", f"{section}.{key}")
        return f"{section}.{key}"

    def filter_pieces(self, pieces: Iterable, seed: int = 0) -> list:
        """The pieces this device may share: none unless ``upload.perpcs_pieces``; else those
        in the ``[sharing]`` layers and modules, then a ``ratio`` subset drawn as
        :func:`shared.methods.perpcs.gates.select_shared_pieces` draws it (deterministic in
        ``seed`` and the pieces), in canonical (layer, module) order."""
        if self.allows("perpcs_pieces") is None:
            return []
        eligible = [p for p in pieces
                    if self.allows("perpcs_pieces", layer=p.layer, module=p.module)]
        if not eligible:
            return []

        return select_shared_pieces(eligible, self.ratio, seed)

    def describe(self) -> str:
        """A few readable lines: what may and may not leave the device."""
        lines = [f"consent policy: {self.source}"]
        for kind, (section, key) in KINDS.items():
            state = "allowed" if self.setting(section, key) else "denied"
            lines.append(f"  {kind:<20} {state:<8} ({section}.{key})")
        lines.append(f"  sharing: layers={self._show(self.layers)} "
                     f"modules={self._show(self.modules)} ratio={self.ratio:g}")
        return "\n".join(lines)

    @staticmethod
    def _show(value: str | Sequence) -> str:
        return value if isinstance(value, str) else ",".join(map(str, value))


def device_policy(context) -> ConsentPolicy:
    """A Flower device's consent policy: node config ``consent-policy``, else the documented
    defaults (never a path from the server)."""
    path = context.node_config.get("consent-policy")
    return ConsentPolicy.load(str(path) if path else None)
