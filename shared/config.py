"""A federation's run configuration: one typed dataclass, one set of defaults.

``flwr run`` reads ``[tool.flwr.app.config]`` of pyproject.toml, which lists exactly the
defaults of :class:`RunConfig` (``tests/test_config.py`` checks that they agree); ``pfl
simulate`` and ``pfl demo`` build the same keys from their flags; a ServerApp parses what it
gets once, with :meth:`RunConfig.parse`, and an unknown key is an error (a typo does not pass
silently).

Keys are dashed (``fraction-train``). Method settings are dotted keys ``SECTION.FIELD``
(``stage1.lr``, ``oppu.epochs``, ``perpcs.top_k``, ``perfit.positions`` ...; each section
registered by its method folder, :mod:`shared.settings`), laid over the
training recipe (:mod:`shared.recipes`) with ``max-history``, ``stage1-epochs`` and
``personal-epochs``; they are the same settings as ``pfl eval --set SECTION.FIELD=VALUE``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping

from shared.errors import PflError
from shared.settings import check_settings, section as settings_section, sections

#: Top-level recipe keys that are also run-config keys (dashed there).
RECIPE_KEYS = ("max_history", "stage1_epochs", "personal_epochs")
#: The method settings pyproject declares, each "unset" (0 or ""): ``flwr run --run-config``
#: takes only keys the app declares, so these are the ones it can set. Any other
#: ``SECTION.FIELD`` works where no Flower check stands between (``pfl simulate``,
#: :func:`cloud_server.federation.run_federation`); declare it in pyproject to use it with
#: ``flwr run``. A declared setting at 0 or "" leaves the recipe's value.
DECLARED_SETTINGS: dict[str, dict[str, Any]] = {
    "stage1": {"lr": 0.0, "epochs": 0.0, "batch_size": 0},
    "oppu": {"lr": 0.0, "epochs": 0.0, "batch_size": 0},
    "perpcs": {"top_k": 0, "gate_steps": 0, "gate_lr": 0.0, "sharing_ratio": 0.0},
    "perfit": {"lr": 0.0, "epochs": 0.0, "positions": ""},
}


#: The history a trained method uses by default: each user's 50 most recent items, in `pfl
#: eval`, `pfl tune`, `pfl simulate` and a federation's run config alike (0 in a run config:
#: all of it).
MAX_HISTORY = 50

#: Config keys the server sends with each round of DP stage 1 (cloud_server.privacy); a
#: device's ledger keeps them as meta with underscores (edge_client.audit).
DP_ROUND_KEYS = ("dp-clipping-norm", "dp-noise-multiplier", "dp-epsilon", "dp-delta")
#: Fit-config keys of a securely aggregated stage-1 round (cloud_server.secagg, read by
#: edge_client.secagg): the arrays' names in the order of the legacy parameter list, and the
#: most examples a device may weigh (SecAgg+'s max weight).
#: A phase message's config key: the digest (shared.methods.store.arrays_digest) of
#: its collective arrays; a device that kept them (metric KEPT_METRIC = 1 in its
#: personalize reply) gets the digest alone at evaluation and uses its own copy.
ARRAYS_DIGEST_KEY, KEPT_METRIC = "arrays-digest", "collective-kept"
#: Fewest devices a securely aggregated round may have (with two, each learns the other's
#: update from the sum): the server plans no smaller round, a device joins no smaller one.
SECAGG_MIN_DEVICES = 3
SECAGG_NAMES_KEY = "array-names"
SECAGG_WEIGHT_KEY = "max-examples"


@dataclass(frozen=True)
class RunConfig:
    """Every key of a federation's run config (dashed in the run config: ``fraction_train``
    is ``fraction-train``). 0 and "" mean "not set" where a comment says so."""

    methods: str = "nonpersonalized,oppu,perpcs,perfit"
    targets: int = 1  # target devices, personalized and evaluated
    sharers: int = 1  # PER-PCS sharers, chosen by federated k-means
    collective: int = 0  # collective devices for stage 1 (0: all others)
    selection: str = "kmeans"  # or "most-active"
    kmeans_iterations: int = 3
    small_cluster_items: int = 0
    rounds: int = 1  # stage-1 FedAvg rounds
    fraction_train: float = 1.0
    sample_per_round: int = 0  # stage-1 clients per round, exact (0: fraction-train decides)
    selection_sample: int = 0  # candidates asked in sharer selection (0: all)
    target_nodes: str = ""  # fix the targets: comma-separated node ids ("": seeded draw)
    sharer_nodes: str = ""  # fix the sharers (skips selection)
    max_steps: int = 0  # cap on local stage-1 steps per round (0: none)
    model: str = "tiny"  # or "smollm2-135m"
    task: str = "synthetic"  # or news-headline / news-category (data-path on the devices)
    data_path: str = ""
    num_users_per_client: int = 1  # a device is one user
    num_clients: int = 0  # wait for this many devices before starting (0: as connected)
    wait_for_nodes: float = 120.0
    phase_timeout: float = 3600.0  # seconds a phase waits for devices
    round_timeout: float = 3600.0  # the same for each stage-1 round
    seed: int = 0
    run_dir: str = "runs/federation"
    pool_address: str = ""  # host:port of `pfl pool serve` (needed by perpcs)
    grant_key: str = ""  # the server's federation.key (from `pfl certs`): signs sharer grants
    recipe: str = "tuned"  # tuned (shipped for model+task, else paper), paper, or a file
    max_history: int = MAX_HISTORY  # trained methods use each user's N most recent items (0: all)
    stage1_epochs: float = 0.0  # 0: the recipe's
    personal_epochs: float = 0.0  # 0: the recipe's
    local_epochs: float = 0.0  # stage-1 epochs per round (0: the recipe's)
    lr: float = 0.0  # stage-1 learning rate (0: the recipe's)
    batch_size: int = 0  # stage-1 batch size (0: the recipe's)
    batch_size_eval: int = 8  # generation batch size on the devices
    device: str = ""  # cpu, cuda ("": auto)
    keep_updates: bool = False  # stage-1 clients keep their last update on disk
    positions: str = ""  # PerFit's intervened positions ("": the method's default)
    collective_rank: int = 0  # PerFit's collective rank (0: the method's default)
    personal_rank: int = 0  # PerFit's personal rank (0: the method's default)
    max_examples: float = 0.0  # cap on one client's FedAvg weight (0: from the run)
    dp_noise_multiplier: float = 0.0  # stage-1 central DP: Gaussian noise multiplier (0: off)
    dp_clipping_norm: float = 1.0  # stage-1 DP: each update clipped to this L2 norm
    dp_delta: float = 1e-5  # stage-1 DP: the delta epsilon is reported at
    secagg: bool = False  # stage-1 secure aggregation (SecAgg+): the server sees only sums
    secagg_num_shares: int = 0  # SecAgg+ neighbours per device (0: every sampled device)
    secagg_threshold: int = 0  # shares that rebuild a secret (0: a majority of the shares)
    secagg_clipping_range: float = 8.0  # SecAgg+ quantizes values in [-range, range]
    method: str = "lora"  # the collective kind of a stage-1 phase (set by the server)
    output_dir: str = ""  # where a stage-1 phase writes ("": run-dir; set by the server)
    #: method settings from the dotted keys: {section: {field: value}}
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    # ------------------------------------------------------------------- parsing
    @classmethod
    def keys(cls) -> dict[str, dataclasses.Field]:
        """{dashed run-config key: field} of every plain key."""
        return {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)
                if f.name != "settings"}

    @classmethod
    def parse(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """The config a run-config mapping describes, over the defaults; values are converted
        to the field's type and checked; an unknown key is an error."""
        known = cls.keys()
        values: dict[str, Any] = {}
        settings: dict[str, dict[str, Any]] = {}
        for key, value in run_config.items():
            section, dot, name = str(key).partition(".")
            if dot and value in (0, "") and name in DECLARED_SETTINGS.get(section, {}):
                continue  # a declared setting left unset: the recipe decides
            if dot and section and name:
                settings_section(section, f"run-config key {key!r}")  # a known section?
                settings.setdefault(section, {})[name] = value
            elif key in known:
                values[known[key].name] = _convert(key, value, known[key].type)
            else:
                close = difflib.get_close_matches(str(key), list(known), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise PflError(f"unknown run-config key {key!r} ({hint}known: "
                               f"{', '.join(sorted(known))}, and SECTION.FIELD of a "
                               "method's settings)")
        check_settings(settings, "run config")
        config = cls(**values, settings=settings)
        config.check()
        return config

    def check(self) -> None:
        if self.rounds < 1:
            raise PflError(f"rounds must be >= 1, got {self.rounds}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise PflError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if self.num_users_per_client < 1:
            raise PflError("num-users-per-client must be >= 1")
        if self.sample_per_round < 0:
            raise PflError(f"sample-per-round must be >= 0, got {self.sample_per_round}")
        if self.targets < 1:
            raise PflError("need at least one target")
        if self.dp_noise_multiplier < 0 or self.dp_clipping_norm <= 0 or \
                not 0 < self.dp_delta < 1:
            raise PflError("dp-noise-multiplier must be >= 0, dp-clipping-norm > 0 and "
                           "dp-delta in (0, 1)")
        if self.secagg_num_shares < 0 or self.secagg_threshold < 0 or \
                self.secagg_clipping_range <= 0:
            raise PflError("secagg-num-shares and secagg-threshold must be >= 0 and "
                           "secagg-clipping-range > 0")
        if self.selection not in ("kmeans", "most-active"):
            raise PflError(f"selection must be kmeans or most-active, got {self.selection!r}")

    # ------------------------------------------------------------------- views
    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a dashed key (``default`` when the key is unknown)."""
        f = self.keys().get(key)
        return default if f is None else getattr(self, f.name)

    def __getitem__(self, key: str) -> Any:
        f = self.keys().get(key)
        if f is None:
            raise KeyError(key)
        return getattr(self, f.name)

    def run_config(self) -> dict[str, Any]:
        """Back to dashed (and dotted) keys: what :meth:`parse` reads."""
        out = {key: getattr(self, f.name) for key, f in self.keys().items()}
        out.update(settings_keys(self.method_settings()))
        return out

    def method_settings(self) -> dict[str, Any]:
        """The run's own method settings (what ``pfl eval --set`` and its epoch flags give):
        the dotted keys plus ``max_history``, ``stage1_epochs``, ``personal_epochs`` when set;
        the recipe lies under them (:func:`shared.recipes.over_recipe`)."""
        out: dict[str, Any] = {section: dict(values) for section, values in self.settings.items()}
        for key in RECIPE_KEYS:
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out


def settings_keys(options: Mapping[str, Any]) -> dict[str, Any]:
    """Method options (``{"max_history": 8, "perpcs": {"gate_steps": 20}}``) as run-config
    keys (``{"max-history": 8, "perpcs.gate_steps": 20}``): the inverse of the parsing."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in RECIPE_KEYS:
            out[key.replace("_", "-")] = value
        elif isinstance(value, Mapping) and key in sections():
            out.update({f"{key}.{name}": v for name, v in value.items()})
        else:
            raise PflError(f"unknown method option {key!r} (known: "
                           f"{', '.join(RECIPE_KEYS + tuple(sorted(sections())))})")
    return out


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _convert(key: str, value: Any, kind: str) -> Any:
    cast = _TYPES[str(kind)]
    try:
        if cast is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", ""):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if cast is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if cast is str:
            return "" if value is None else str(value)
        return cast(value) if value not in (None, "") else cast(0)
    except (TypeError, ValueError):
        raise PflError(f"run-config key {key!r}: {value!r} is not a {cast.__name__}") from None


#: The prefix of the method options in a phase message's ConfigRecord.
OPTIONS_PREFIX = "options."


def options_to_message(options: Mapping[str, Any]) -> dict[str, Any]:
    """The run's resolved method options as flat ConfigRecord entries ``options.KEY`` /
    ``options.SECTION.FIELD`` (None values are left out)."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            out.update({f"{OPTIONS_PREFIX}{key}.{name}": v for name, v in value.items()
                        if v is not None})
        elif value is not None:
            out[f"{OPTIONS_PREFIX}{key}"] = value
    return out


def options_from_message(entries: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`options_to_message` (other entries are ignored)."""
    out: dict[str, Any] = {}
    for key, value in entries.items():
        if not str(key).startswith(OPTIONS_PREFIX):
            continue
        head, dot, name = str(key)[len(OPTIONS_PREFIX):].partition(".")
        if dot:
            out.setdefault(head, {})[name] = list(value) if isinstance(value, (list, tuple)) \
                else value
        else:
            out[head] = value
    return out


# ------------------------------------------------------------------ run-config files
def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """TOML tables to dotted keys (``[oppu] lr = 1e-3`` and ``oppu.lr = 1e-3`` are both
    ``oppu.lr``), as ``flwr run --run-config FILE`` reads them."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_run_config_file(path) -> dict[str, Any]:
    """The keys a run-config TOML file sets (dotted for method settings), checked with
    :meth:`RunConfig.parse` (an unknown key or a bad value is a one-line error)."""
    import tomllib
    from pathlib import Path

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PflError(f"no run-config file {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PflError(f"{path}: not a readable TOML file ({exc})") from None
    keys = _flatten(data)
    try:
        RunConfig.parse(keys)
    except RecursionError:
        raise PflError(f"{path}: nested too deeply") from None
    except PflError as exc:
        raise PflError(f"{path}: {exc}") from None
    return keys


def _toml_value(value: Any) -> str:
    import json
    import math

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PflError(f"a run-config value must be finite, got {value}")
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string (JSON escapes are TOML's)


def run_config_toml(keys: Mapping[str, Any]) -> str:
    """``keys`` (dashed and dotted run-config keys) as the text of a run-config TOML file
    that :func:`read_run_config_file` and ``flwr run --run-config`` read back."""
    RunConfig.parse(keys)
    lines = [f"{key} = {_toml_value(value)}" for key, value in keys.items() if "." not in key]
    lines += [f"{key} = {_toml_value(value)}" for key, value in keys.items() if "." in key]
    return "\n".join(lines) + "\n"


def parse_key_value(text: str) -> tuple[str, Any]:
    """``max-history=8`` or ``oppu.lr=0.001`` -> (key, value): a ``--set KEY=VALUE`` of a
    run-config key; the value is JSON when it parses as JSON, else the string."""
    import json

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise PflError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(raw)
    except ValueError:
        return key.strip(), raw

