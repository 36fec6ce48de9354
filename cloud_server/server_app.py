"""The cloud's Flower ServerApp (flwr 1.41): the collective stage-1 phase, orchestration only.

Phase 1 of DESIGN.md: FedAvg rounds of the collective parameters over the collective clients.

- ``method = "lora"``: the stage-1 task LoRA (OPPU / PER-PCS / LoRA-C), initialised by peft
  (A random, seeded; B zero) on the base model this server hosts.
- ``method = "perfit"``: PerFit stage 1 (collective LoReFT shift) with the shared stage 2,
  fresh seeded stages; after every aggregation each R is re-orthonormalized (an average of
  matrices with orthonormal rows does not have orthonormal rows).

Each round: Flower's :class:`flwr.serverapp.strategy.FedAvg` samples clients and sends them
the global arrays; :class:`Stage1FedAvg` replaces its aggregation with the validated one of
:mod:`cloud_server.aggregation` (a failed client or a bad reply is logged and left out, the
round goes on with the rest; with no usable reply the global arrays stay as they were).
Sampling: ``min_train_nodes`` is set to the sample asked for (``ceil(fraction-train *
num-clients)``), because FedAvg sizes the round-1 sample from the nodes connected at that
moment (DESIGN.md pitfall).

Run config (``context.run_config``, or :func:`make_server_app` overrides; :data:`DEFAULTS`):
``method``, ``rounds``, ``fraction-train``, ``model``, ``num-users-per-client``, ``seed``,
``run-dir``, ``num-clients`` (0: as many as are connected), ``round-timeout``, ``task``,
``data-path``, ``sample-per-round`` (clients per round, exact; 0: ``fraction-train`` decides),
``output-dir`` (where the server's files go; default ``run-dir``) and the client
training knobs in :data:`CLIENT_KEYS`.

Output in ``run-dir``: ``global_arrays.npz`` (final), ``rounds/round-000.npz`` (initial) ..
``round-NNN.npz``, and ``summary.json`` (:func:`run_stage1`'s return value).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from cloud_server.aggregation import (Reply, average_metrics, delta_norm, fedavg,
                                      max_orthonormality_error, reorthonormalize_perfit)
from shared.errors import PflError

log = logging.getLogger("flwr.pfl.server")  # propagates to Flower's console handler

METHODS = ("lora", "perfit")
DEFAULTS: dict[str, Any] = {
    "method": "lora", "rounds": 2, "fraction-train": 1.0, "model": "tiny",
    "num-users-per-client": 2, "seed": 0, "run-dir": "runs/stage1", "num-clients": 0,
    "round-timeout": 3600.0, "task": "synthetic", "sample-per-round": 0,
}
#: Run-config keys forwarded to the clients in every round's ConfigRecord.
CLIENT_KEYS = ("method", "model", "task", "data-path", "num-users-per-client", "seed",
               "local-epochs", "lr", "max-steps", "batch-size", "max-history", "positions",
               "device", "keep-updates")


# ------------------------------------------------------------------------ initial arrays
def initial_arrays(method: str, model: str = "tiny", seed: int = 0, *,
                   device: str | None = None,
                   perfit_options: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Fresh global collective parameters (float32 numpy), reproducible from ``seed``.

    ``lora``: peft's init of the stage-1 LoRA on ``model`` (the base is left unchanged).
    ``perfit``: new seeded PerFit stage 1 + shared stage 2, keys ``stage1.layers.N.R|W|b`` /
    ``stage2.*`` (what :func:`edge_client.client_app.perfit_from_arrays` reads).
    """
    from shared.models import load_model

    loaded = load_model(model, device=device)
    if method == "lora":
        from shared.methods.oppu import attach_lora, lora_state, stage1_lora

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with attach_lora(loaded.model, stage1_lora()) as peft_model:
                state = lora_state(peft_model)
        return {k: v.numpy().astype(np.float32) for k, v in state.items()}
    if method == "perfit":
        from shared.methods.perfit import PerFitConfig, new_stages

        config = PerFitConfig(**dict(perfit_options or {}))
        stage1, stage2 = new_stages(config, loaded.num_layers, loaded.hidden_size, seed=seed)
        return {f"{prefix}.{key}": np.asarray(value, np.float32)
                for prefix, stage in (("stage1", stage1), ("stage2", stage2))
                for key, value in stage.export_arrays().items()}
    raise PflError(f"unknown stage-1 method {method!r} (known: {', '.join(METHODS)})")


# ------------------------------------------------------------------------------ strategy
def _to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def _to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value, np.float32))
                        for key, value in arrays.items()})


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def reply_of(msg: Message) -> Reply | tuple[int, str]:
    """A plain :class:`Reply` from a Flower reply, or ``(node, reason)`` when it is unusable
    (an error reply, or no 'arrays'/'metrics' record)."""
    node = msg.metadata.src_node_id
    if msg.has_error():
        return node, f"error reply (code {msg.error.code}): {msg.error.reason}"
    content = msg.content
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        return node, "reply lacks the 'arrays' ArrayRecord or the 'metrics' MetricRecord"
    metrics = dict(content["metrics"])
    return Reply(_to_numpy(content["arrays"]), metrics.get("num-examples", 0), node,
                 {k: v for k, v in metrics.items() if k != "num-examples"})


class Stage1FedAvg(FedAvg):
    """Flower's FedAvg with this project's aggregation: validated weighted average, bad or
    failed replies dropped (and logged), PerFit R re-orthonormalized after averaging, the
    global arrays of every round saved, and one history entry per round."""

    def __init__(self, method: str, *, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, round_dir: Path | None = None,
                 max_examples: float | None = None) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=0.0,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=0,
                         min_available_nodes=min_available_nodes)
        if method not in METHODS:
            raise PflError(f"unknown stage-1 method {method!r} (known: {', '.join(METHODS)})")
        self.method, self.round_dir = method, round_dir
        self.max_examples = max_examples  # the most examples one client's weight may claim
        self.history: list[dict[str, Any]] = []
        self._current: dict[str, np.ndarray] | None = None
        self._sampled = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._current = _to_numpy(arrays)  # the reference every reply must match
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sampled = len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        usable, failed = [], []
        for msg in replies:
            item = reply_of(msg)
            if isinstance(item, Reply):
                usable.append(item)
            else:
                log.warning("round %d: no update from node %s: %s", server_round, *item)
                failed.append({"node": str(item[0]), "reason": item[1]})
        result = fedavg(usable, self._current, max_examples=self.max_examples)
        entry: dict[str, Any] = {
            "round": server_round, "sampled": self._sampled, "replies": len(replies),
            "accepted": len(result.accepted), "errors": failed,
            "dropped": [{"node": str(node), "reason": why} for node, why in result.dropped],
            "num_examples": result.total_examples}
        if failed or result.dropped or len(replies) < self._sampled:
            log.warning("round %d: %d of %d sampled clients replied, %d usable",
                        server_round, len(replies), self._sampled, len(result.accepted))
        arrays = result.arrays
        if arrays is None:
            log.warning("round %d: no usable reply; the global arrays stay as they were",
                        server_round)
            arrays = self._current
        elif self.method == "perfit":
            # The average of matrices with orthonormal rows is not orthonormal: project each
            # averaged R back to the nearest matrix with orthonormal rows before it is used.
            arrays = reorthonormalize_perfit(arrays)
            entry["orthonormality_error"] = max_orthonormality_error(arrays)
        metrics = average_metrics(result.accepted)
        entry.update(train_loss=metrics.get("train-loss"),
                     train_loss_first=metrics.get("train-loss-first"),
                     delta_norm=delta_norm(self._current or {}, arrays))
        if self.round_dir is not None:
            entry["arrays_path"] = str(_save_npz(self.round_dir / f"round-{server_round:03d}.npz",
                                                 arrays))
        self.history.append(entry)
        log.info("round %d: %d/%d replies used, %.0f examples, train loss %s, |delta| %.4g",
                 server_round, len(result.accepted), self._sampled, result.total_examples,
                 "n/a" if entry["train_loss"] is None else f"{entry['train_loss']:.4f}",
                 entry["delta_norm"])
        if result.arrays is None:
            return None, None
        return _to_record(arrays), MetricRecord({**metrics,
                                                 "num-examples": result.total_examples})


# ---------------------------------------------------------------------------- the phase
def resolve_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """DEFAULTS overlaid with ``run_config``, checked."""
    config = {**DEFAULTS, **dict(run_config)}
    if config["method"] not in METHODS:
        raise PflError(f"unknown stage-1 method {config['method']!r} "
                       f"(known: {', '.join(METHODS)})")
    if int(config["rounds"]) < 1:
        raise PflError(f"rounds must be >= 1, got {config['rounds']}")
    if not 0.0 < float(config["fraction-train"]) <= 1.0:
        raise PflError(f"fraction-train must be in (0, 1], got {config['fraction-train']}")
    if int(config["num-users-per-client"]) < 1:
        raise PflError("num-users-per-client must be >= 1")
    if int(config["sample-per-round"]) < 0:
        raise PflError(f"sample-per-round must be >= 0, got {config['sample-per-round']}")
    return config


#: Examples one user may count toward a client's FedAvg weight when ``max-history`` is unset.
EXAMPLES_PER_USER_CAP = 1000


def max_examples(config: Mapping[str, Any]) -> float:
    """The cap on one client's FedAvg weight: run config ``max-examples``, else what the server
    asked it to train on: ``num-users-per-client`` x ``max-history`` (or x
    :data:`EXAMPLES_PER_USER_CAP`). A client's own count is never taken beyond it."""
    if config.get("max-examples"):
        return float(config["max-examples"])
    per_user = int(config.get("max-history") or EXAMPLES_PER_USER_CAP)
    return float(int(config["num-users-per-client"]) * per_user)


def sample_size(fraction_train: float, num_clients: int) -> int:
    """How many clients a round trains: ceil(fraction * clients), at least 1."""
    return max(1, math.ceil(float(fraction_train) * int(num_clients) - 1e-9))


def run_stage1(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Run the collective stage-1 phase over ``grid``; save and return its summary."""
    config = resolve_config(run_config)
    started = time.perf_counter()
    method, rounds = str(config["method"]), int(config["rounds"])
    config["run-dir"] = str(Path(str(config["run-dir"])).expanduser().resolve())
    # The server's files go to "output-dir" when set (a phase of a whole federation), else to
    # the run folder; devices always use the run folder (their state and ledgers).
    run_dir = Path(str(config.get("output-dir") or config["run-dir"])).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    perfit_options = {k: config[key] for key, k in (("collective-rank", "collective_rank"),
                                                     ("personal-rank", "personal_rank"),
                                                     ("positions", "positions"))
                      if key in config}
    arrays = initial_arrays(method, str(config["model"]), int(config["seed"]),
                            device=config.get("device") or None, perfit_options=perfit_options)
    round_dir = run_dir / "rounds"
    _save_npz(round_dir / "round-000.npz", arrays)

    num_clients = int(config["num-clients"])
    fraction = float(config["fraction-train"])
    wanted = sample_size(fraction, num_clients) if num_clients > 0 else 1
    if int(config["sample-per-round"]) > 0 and num_clients > 0:  # an exact count wins
        wanted = min(int(config["sample-per-round"]), num_clients)
        fraction = wanted / num_clients
    strategy = Stage1FedAvg(method, fraction_train=fraction, min_train_nodes=wanted,
                            min_available_nodes=max(1, num_clients), round_dir=round_dir,
                            max_examples=max_examples(config))
    client_config = ConfigRecord({key: config[key] for key in CLIENT_KEYS
                                  if config.get(key) not in (None, "")})
    log.info("stage 1 (%s): %d rounds, %s clients, %d sampled per round, run dir %s", method,
             rounds, num_clients or "all connected", wanted, run_dir)
    result = strategy.start(grid=grid, initial_arrays=_to_record(arrays), num_rounds=rounds,
                            timeout=float(config["round-timeout"]), train_config=client_config)

    final = _to_numpy(result.arrays) if len(result.arrays) else arrays
    final_path = _save_npz(run_dir / "global_arrays.npz", final)
    history = strategy.history
    summary = {
        "method": method, "rounds": rounds, "model": str(config["model"]),
        "task": str(config["task"]), "seed": int(config["seed"]),
        "num_clients": num_clients, "fraction_train": fraction, "sample_size": wanted,
        "num_users_per_client": int(config["num-users-per-client"]),
        "run_dir": str(run_dir), "final_arrays": str(final_path),
        "initial_arrays": str(round_dir / "round-000.npz"),
        "params": int(sum(np.asarray(v).size for v in final.values())),
        "bytes_per_update": int(sum(np.asarray(v).size * 4 for v in final.values())),
        "train_loss": [h["train_loss"] for h in history],
        "replies": [h["replies"] for h in history],
        "accepted": [h["accepted"] for h in history],
        "history": history,
        "seconds": time.perf_counter() - started,
    }
    if method == "perfit":
        summary["orthonormality_error"] = max_orthonormality_error(final)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp running :func:`run_stage1` with ``DEFAULTS``, then the run config, then
    ``overrides`` (e.g. from :func:`simulations.simulate.run_stage1_simulation`, whose
    ``run_simulation`` has no run config of its own)."""
    server_app = ServerApp()
    fixed = dict(overrides or {})

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        summary = run_stage1(grid, {**dict(context.run_config), **fixed})
        print(f"stage 1 ({summary['method']}) done: {summary['rounds']} rounds, replies "
              f"{summary['replies']}, train loss {summary['train_loss']}, "
              f"arrays in {summary['final_arrays']}", flush=True)

    return server_app


#: ``flwr run`` entry point (pyproject: [tool.flwr.app.components] serverapp).
app = make_server_app()
