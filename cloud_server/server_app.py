"""The cloud's Flower ServerApp (flwr 1.41): the collective stage-1 phase, orchestration only.

The collective stage-1 phase: FedAvg rounds of the collective parameters over the collective clients.

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
moment (a Flower 1.41 pitfall).

Run config (``context.run_config``, or :func:`make_server_app` overrides; parsed once into
:class:`shared.config.RunConfig`, whose defaults are pyproject's):
``method``, ``rounds``, ``fraction-train``, ``model``, ``num-users-per-client``, ``seed``,
``run-dir``, ``num-clients`` (0: as many as are connected), ``round-timeout``, ``task``,
``data-path``, ``sample-per-round`` (clients per round, exact; 0: ``fraction-train`` decides),
``output-dir`` (where the server's files go; default ``run-dir``), the privacy keys
(``dp-*``: :mod:`cloud_server.privacy`; ``secagg`` and ``secagg-*``: the rounds run under
SecAgg+, :mod:`cloud_server.secagg`, and the server sees only the sum of the updates) and
the client training knobs in :data:`CLIENT_KEYS`.

Output in ``run-dir``: ``global_arrays.npz`` (final), ``rounds/round-000.npz`` (initial) ..
``round-NNN.npz``, and ``summary.json`` (:func:`run_stage1`'s return value).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from cloud_server.aggregation import Aggregate, Reply, average_metrics, delta_norm, fedavg
from cloud_server.privacy import CentralDP
from cloud_server.secagg import run_secure_rounds, secagg_summary
from shared.config import RunConfig, options_to_message
from shared.files import save_npz, write_json
from shared.methods import collective
from shared.models import load_model
from shared.records import from_array_record, to_array_record

log = logging.getLogger("flwr.pfl.server")  # propagates to Flower's console handler

#: Run-config keys forwarded to the clients in every round's ConfigRecord.
CLIENT_KEYS = ("method", "model", "task", "data-path", "num-users-per-client", "seed",
               "local-epochs", "lr", "max-steps", "batch-size", "max-history", "positions",
               "device", "keep-updates")


# ------------------------------------------------------------------------ initial arrays
def initial_arrays(method: str, model: str = "tiny", seed: int = 0, *,
                   device: str | None = None,
                   options: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Fresh global collective parameters of kind ``method`` (float32 numpy), reproducible
    from ``seed``: :meth:`shared.methods.base.Collective.initial_arrays` on ``model`` (the
    base is left unchanged). ``options``: the run config (PerFit reads its ranks and
    positions there)."""
    part = collective(method)
    return part.initial_arrays(load_model(model, device=device), seed, dict(options or {}))


# ------------------------------------------------------------------------------ strategy
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
    return Reply(from_array_record(content["arrays"]), metrics.get("num-examples", 0), node,
                 {k: v for k, v in metrics.items() if k != "num-examples"})


def split_replies(replies: Iterable[Message], server_round: int
                  ) -> tuple[list[Reply], list[dict[str, str]]]:
    """(usable replies, {"node", "reason"} of each unusable one, logged)."""
    usable, failed = [], []
    for msg in replies:
        item = reply_of(msg)
        if isinstance(item, Reply):
            usable.append(item)
        else:
            log.warning("round %d: no update from node %s: %s", server_round, *item)
            failed.append({"node": str(item[0]), "reason": item[1]})
    return usable, failed


class Stage1FedAvg(FedAvg):
    """Flower's FedAvg with this project's aggregation: validated weighted average, bad or
    failed replies dropped (and logged), PerFit R re-orthonormalized after averaging, the
    global arrays of every round saved, and one history entry per round."""

    def __init__(self, method: str, *, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, round_dir: Path | None = None,
                 max_examples: float | None = None, dp: CentralDP | None = None) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=0.0,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=0,
                         min_available_nodes=min_available_nodes)
        self.method, self.collective = method, collective(method)
        self.round_dir = round_dir
        self.max_examples = max_examples  # the most examples one client's weight may claim
        self.history: list[dict[str, Any]] = []
        self._current: dict[str, np.ndarray] | None = None
        self._sampled = 0
        self.dp = dp  # central DP (cloud_server.privacy): clipped, equal-weight, noised

    @property
    def current(self) -> dict[str, np.ndarray] | None:
        """The global arrays the round in progress started from."""
        return self._current

    def start_round(self, current: Mapping[str, np.ndarray], sampled: int) -> None:
        """A round starts from ``current`` with ``sampled`` clients (here, or under secure
        aggregation, :mod:`cloud_server.secagg`)."""
        self._current, self._sampled = dict(current), int(sampled)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._current = from_array_record(arrays)  # the reference every reply must match
        if self.dp is not None:  # the devices learn the round's DP terms (their ledgers keep them)
            config = ConfigRecord({**dict(config),
                                   **self.dp.round_config(self.min_train_nodes)})
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.start_round(self._current, len(messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        usable, failed = split_replies(replies, server_round)
        if self.dp is None:
            result = fedavg(usable, self._current, max_examples=self.max_examples)
        else:
            result = self.dp.aggregate(usable, self._current)
        arrays, metrics = self.record_round(server_round, len(replies), failed, result)
        if arrays is None:
            return None, None
        return to_array_record(arrays), MetricRecord(metrics)

    def record_round(self, server_round: int, replies: int, failed: list, result: Aggregate
                     ) -> tuple[dict[str, np.ndarray] | None, dict[str, float]]:
        """Finish a round from its aggregate (here, or secure aggregation's): make the
        arrays valid again (PerFit's R), log, save the round's arrays and add its history
        entry. Returns (the new global arrays, or None when no reply was usable; the
        averaged metrics with ``num-examples``)."""
        entry: dict[str, Any] = {
            "round": server_round, "sampled": self._sampled, "replies": replies,
            "accepted": len(result.accepted), "errors": failed,
            "dropped": [{"node": str(node), "reason": why} for node, why in result.dropped],
            "num_examples": result.total_examples,
            **({"dp_epsilon": self.dp.epsilon} if self.dp is not None else {})}
        if failed or result.dropped or replies < self._sampled:
            log.warning("round %d: %d of %d sampled clients replied, %d usable",
                        server_round, replies, self._sampled, len(result.accepted))
        arrays = result.arrays
        if arrays is None:
            log.warning("round %d: no usable reply; the global arrays stay as they were",
                        server_round)
            arrays = self._current
        else:  # e.g. PerFit: every averaged R projected back to orthonormal rows
            arrays, facts = self.collective.after_aggregation(arrays)
            entry.update(facts)
        metrics = average_metrics(result.accepted)
        entry.update(train_loss=metrics.get("train-loss"),
                     train_loss_first=metrics.get("train-loss-first"),
                     delta_norm=delta_norm(self._current or {}, arrays))
        if self.round_dir is not None:
            entry["arrays_path"] = str(save_npz(self.round_dir / f"round-{server_round:03d}.npz",
                                                arrays))
        self.history.append(entry)
        log.info("round %d: %d/%d replies used, %.0f examples, train loss %s, |delta| %.4g",
                 server_round, entry["accepted"], self._sampled, result.total_examples,
                 "n/a" if entry["train_loss"] is None else f"{entry['train_loss']:.4f}",
                 entry["delta_norm"])
        if result.arrays is None:
            return None, {}
        return arrays, {**metrics, "num-examples": result.total_examples}


# ---------------------------------------------------------------------------- the phase
def resolve_config(run_config: Mapping[str, Any] | RunConfig) -> RunConfig:
    """The run config parsed and checked (a :class:`RunConfig` is taken as it is)."""
    config = run_config if isinstance(run_config, RunConfig) else RunConfig.parse(run_config)
    config.check()
    collective(config.method)  # an unknown kind is a clear error now
    return config


#: Examples one user may count toward a client's FedAvg weight when ``max-history`` is unset.
EXAMPLES_PER_USER_CAP = 1000


def max_examples(config: RunConfig) -> float:
    """The cap on one client's FedAvg weight: run config ``max-examples``, else what the server
    asked it to train on: ``num-users-per-client`` x ``max-history`` (or x
    :data:`EXAMPLES_PER_USER_CAP`). A client's own count is never taken beyond it."""
    if config.max_examples:
        return float(config.max_examples)
    return float(config.num_users_per_client * (config.max_history or EXAMPLES_PER_USER_CAP))


def sample_size(fraction_train: float, num_clients: int) -> int:
    """How many clients a round trains: ceil(fraction * clients), at least 1."""
    return max(1, math.ceil(float(fraction_train) * int(num_clients) - 1e-9))


def sampling(config: RunConfig) -> tuple[int, float]:
    """(clients trained per round, the fraction FedAvg samples): ``sample-per-round`` exactly
    when set, else ``ceil(fraction-train * num-clients)``."""
    num_clients, fraction = config.num_clients, config.fraction_train
    wanted = sample_size(fraction, num_clients) if num_clients > 0 else 1
    if config.sample_per_round > 0 and num_clients > 0:  # an exact count wins
        wanted = min(config.sample_per_round, num_clients)
        fraction = wanted / num_clients
    return wanted, fraction


def run_stage1(grid: Grid, run_config: Mapping[str, Any] | RunConfig,
               options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the collective stage-1 phase over ``grid``; save and return its summary.
    ``options``: the run's resolved method options (the recipe with the run's settings on
    top, :func:`shared.recipes.over_recipe`); the server builds the initial arrays from them
    and every round's message carries them (``options.*``), so the devices train with the
    settings the targets and ``pfl eval`` use. Without them: the methods' own defaults."""
    config = resolve_config(run_config)
    method_options = options_to_message(options or {})
    started = time.perf_counter()
    config = config.replace(run_dir=str(Path(config.run_dir).expanduser().resolve()))
    # The server's files go to "output-dir" when set (a phase of a whole federation), else to
    # the run folder; devices always use the run folder (their state and ledgers).
    run_dir = Path(config.output_dir or config.run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    arrays = initial_arrays(config.method, config.model, config.seed,
                            device=config.device or None,
                            options={**config.run_config(), **method_options})
    save_npz(run_dir / "rounds" / "round-000.npz", arrays)
    wanted, fraction = sampling(config)
    dp = (CentralDP(config.dp_noise_multiplier, config.dp_clipping_norm, config.dp_delta,
                    population=max(wanted, config.num_clients))
          if config.dp_noise_multiplier > 0 else None)
    strategy = Stage1FedAvg(config.method, fraction_train=fraction, min_train_nodes=wanted,
                            min_available_nodes=max(1, config.num_clients),
                            round_dir=run_dir / "rounds", max_examples=max_examples(config),
                            dp=dp)
    client_config = ConfigRecord({**{key: config[key] for key in CLIENT_KEYS
                                     if config.get(key) not in (None, "")}, **method_options})
    log.info("stage 1 (%s): %d rounds, %s clients, %d sampled per round, run dir %s",
             config.method, config.rounds, config.num_clients or "all connected", wanted,
             run_dir)
    if config.secagg:  # the server sees only sums (cloud_server.secagg)
        final, _ = run_secure_rounds(grid, config, strategy, arrays, dict(client_config),
                                     sample=wanted,
                                     max_weight=1.0 if dp is not None else max_examples(config))
    else:
        result = strategy.start(grid=grid, initial_arrays=to_array_record(arrays),
                                num_rounds=config.rounds, timeout=config.round_timeout,
                                train_config=client_config)
        final = from_array_record(result.arrays) if len(result.arrays) else arrays
    summary = stage1_summary(config, strategy, final, run_dir, wanted, fraction)
    summary["seconds"] = time.perf_counter() - started
    write_json(run_dir / "summary.json", summary, indent=2)
    return summary


def stage1_summary(config: RunConfig, strategy: Stage1FedAvg, final: Mapping[str, np.ndarray],
                   run_dir: Path, wanted: int, fraction: float) -> dict[str, Any]:
    """What a stage-1 phase did (``summary.json``), with the final arrays saved."""
    history = strategy.history
    return {
        "method": config.method, "rounds": config.rounds, "model": config.model,
        "task": config.task, "seed": config.seed,
        "num_clients": config.num_clients, "fraction_train": fraction, "sample_size": wanted,
        "num_users_per_client": config.num_users_per_client,
        "run_dir": str(run_dir), "final_arrays": str(save_npz(run_dir / "global_arrays.npz",
                                                              final)),
        "initial_arrays": str(run_dir / "rounds" / "round-000.npz"),
        "params": int(sum(np.asarray(v).size for v in final.values())),
        "bytes_per_update": int(sum(np.asarray(v).size * 4 for v in final.values())),
        "train_loss": [h["train_loss"] for h in history],
        "replies": [h["replies"] for h in history],
        "accepted": [h["accepted"] for h in history],
        "history": history,
        "dp": strategy.dp.describe() if strategy.dp is not None else None,
        "secagg": secagg_summary(config, wanted) if config.secagg else None,
        **strategy.collective.describe(final),  # e.g. PerFit's orthonormality error
    }


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp running :func:`run_stage1` with the run config, then
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
