"""Secure aggregation (SecAgg+) of the collective stage-1 updates, with Flower's own protocol.

With run config ``secagg = true`` the server never holds one device's update: every device
masks its quantized update with pairwise masks (agreed with its neighbours) and a private
mask, the server sums the masked vectors, and the masks cancel or are rebuilt from secret
shares that the surviving devices send back (Bell et al. 2020, SecAgg+). What reaches this
project's code is the sum, already divided by the sum of the weights.

In flwr 1.41 SecAgg+ exists only on the legacy path, so this module is the one place that
speaks it: a :class:`~flwr.server.compat.LegacyContext` with
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` around :class:`SecureStage1`, a
legacy ``FedAvg`` whose ``aggregate_fit`` receives the securely aggregated arrays (every
result carries the same aggregate) and finishes the round with the Message-API strategy's
bookkeeping (:meth:`cloud_server.server_app.Stage1FedAvg.record_round`: PerFit's R
re-orthonormalized, the round's arrays saved, one history entry). The device half is
:mod:`edge_client.secagg`. Moving to a Message-API SecAgg+ later changes these two modules.

Legacy parameters are an ordered list, so the fit config names the arrays
(:data:`shared.config.SECAGG_NAMES_KEY`, the sorted names comma-joined: a legacy config
holds scalars only) and gives the largest weight a device
may claim (:data:`shared.config.SECAGG_WEIGHT_KEY`, the run's ``max-examples`` cap, also
SecAgg+'s ``max_weight``): the weighted average is FedAvg's, within the quantization error
(``secagg-clipping-range`` / 2^21 per value with Flower's 2^22 levels).

With DP (``dp-noise-multiplier`` > 0) each device clips its own update with Flower's
``fixedclipping_mod`` (the server cannot clip what it cannot see), weighs 1 (equal weights:
the average's sensitivity is C/k), and the server adds the Gaussian noise to the aggregate
(:meth:`cloud_server.privacy.CentralDP.release`) before PerFit's re-orthonormalization.

What the server gives up: it checks only the aggregate (names, shapes, finite values, and
an update no larger than :data:`cloud_server.aggregation.MAX_UPDATE_RATIO` times the global
norm, else the round keeps the global arrays), not each update; a hostile device's influence
is bounded by the clipping range and its weight cap. Flower's SecAgg+ protects the devices
from an honest-but-curious server; a server that lies to different devices about who dropped
out could unmask one device (the protocol's consistency round is not implemented by Flower);
each device refuses the inconsistencies it can see on its own (:mod:`edge_client.secagg`).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
from flwr.app import Context, RecordDict
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.compat import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from cloud_server.aggregation import (MAX_UPDATE_RATIO, Aggregate, Reply, check_reply,
                                      delta_norm, global_norm)
from shared.config import SECAGG_MIN_DEVICES, SECAGG_NAMES_KEY, SECAGG_WEIGHT_KEY, RunConfig
from shared.errors import PflError

log = logging.getLogger("flwr.pfl.server")

MIN_DEVICES = SECAGG_MIN_DEVICES
#: Quantization levels of a value (Flower's default, 2^22; sums of up to 1023 devices fit
#: its 2^32 modulus).
QUANTIZATION_RANGE = 1 << 22


def protocol_sizes(config: RunConfig, sampled: int) -> tuple[int, int]:
    """(shares, threshold) for rounds of ``sampled`` devices: ``secagg-num-shares`` (0: every
    sampled device) and ``secagg-threshold`` (0: a majority of the shares)."""
    if sampled < MIN_DEVICES:
        raise PflError(f"secure aggregation needs at least {MIN_DEVICES} devices per round, "
                       f"the run samples {sampled}")
    shares = min(config.secagg_num_shares or sampled, sampled)
    if shares < MIN_DEVICES:
        raise PflError(f"secagg-num-shares must be >= {MIN_DEVICES}, got {shares}")
    threshold = config.secagg_threshold or shares // 2 + 1
    if not shares / 2 < threshold <= shares:
        raise PflError(f"secagg-threshold must be a majority of the {shares} shares "
                       f"(more than {shares / 2:g}, at most {shares}), got {threshold}")
    return shares, threshold


class SecureStage1(LegacyFedAvg):
    """The legacy strategy SecAgg+ drives: it samples ``sample`` devices per round and
    receives only the aggregate, which ``books`` (a
    :class:`~cloud_server.server_app.Stage1FedAvg`) turns into the round's result.

    ``received`` keeps, per round, how many results reached :meth:`aggregate_fit` and how
    many distinct parameter lists they carried (1: the aggregate; tests check it)."""

    def __init__(self, books, initial: Mapping[str, np.ndarray], client_config: Mapping,
                 *, sample: int, max_weight: float) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=sample,
                         min_evaluate_clients=0, min_available_clients=sample,
                         accept_failures=True)
        self.books, self.sample, self.max_weight = books, sample, float(max_weight)
        self.names = sorted(initial)
        if any("," in name for name in self.names):  # the fit config lists them comma-joined
            raise PflError("secure aggregation needs array names without commas")
        self.arrays = {k: np.asarray(initial[k], np.float32) for k in self.names}
        self.client_config = dict(client_config)
        self.received: list[dict[str, int]] = []

    def _parameters(self, arrays: Mapping[str, np.ndarray]) -> Parameters:
        return ndarrays_to_parameters([np.asarray(arrays[k], np.float32) for k in self.names])

    def initialize_parameters(self, client_manager) -> Parameters:
        return self._parameters(self.arrays)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager):
        current = dict(zip(self.names, (np.asarray(a, np.float32)
                                        for a in parameters_to_ndarrays(parameters))))
        config: dict[str, Any] = {**self.client_config, "server-round": server_round,
                                  SECAGG_NAMES_KEY: ",".join(self.names),
                                  SECAGG_WEIGHT_KEY: self.max_weight}
        dp = self.books.dp
        if dp is not None:  # the devices clip (fixedclipping_mod) and learn the DP terms
            config.update(dp.round_config(self.sample))
            config[KEY_CLIPPING_NORM] = float(dp.clipping_norm)
        clients = client_manager.sample(num_clients=self.sample, min_num_clients=self.sample)
        self.books.start_round(current, len(clients))
        return [(client, FitIns(parameters, dict(config))) for client in clients]

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def evaluate(self, server_round, parameters):
        return None

    def aggregate_fit(self, server_round: int, results, failures):
        lists = {id(fitres.parameters.tensors) for _, fitres in results}
        self.received.append({"round": server_round, "results": len(results),
                              "distinct_parameters": len(lists)})
        if len(lists) > 1:  # the workflow hands every result the same aggregate
            raise RuntimeError("secure aggregation passed individual updates to the strategy")
        errors = [str(failure) for failure in failures]  # the devices' error codes
        accepted = [Reply({}, float(fitres.num_examples), proxy.node_id,
                          {k: float(v) for k, v in fitres.metrics.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)})
                    for proxy, fitres in results]
        arrays = None
        if results:
            values = parameters_to_ndarrays(results[0][1].parameters)
            arrays = {k: np.asarray(v, np.float32) for k, v in zip(self.names, values)}
            problem = (f"{len(values)} arrays, expected {len(self.names)}"
                       if len(values) != len(self.names) else
                       check_reply(arrays, 1.0, self.books.current) or
                       self._too_far(arrays))
            if problem:
                log.warning("round %d: the secure aggregate is unusable (%s); the global "
                            "arrays stay as they were", server_round, problem)
                arrays, accepted = None, []
            elif self.books.dp is not None:
                arrays = self.books.dp.release(arrays, len(results))
        result = Aggregate(arrays, accepted, [])
        new, metrics = self.books.record_round(server_round, len(results) + len(failures),
                                               errors, result)
        self.books.history[-1]["secagg"] = True
        if new is None:
            return None, {}
        self.arrays = new
        return self._parameters(new), metrics

    def _too_far(self, arrays: Mapping[str, np.ndarray]) -> str | None:
        """Why the aggregate moved too far from the global arrays (None when it did not)."""
        current = self.books.current
        update, scale = delta_norm(current, arrays), max(1.0, global_norm(current))
        if update > MAX_UPDATE_RATIO * scale:  # fedavg's per-update bound, on the sum
            return f"update norm {update:.3g} exceeds {MAX_UPDATE_RATIO:g} x {scale:.3g}"
        return None


def run_secure_rounds(grid: Grid, config: RunConfig, books, initial: Mapping[str, np.ndarray],
                      client_config: Mapping, *, sample: int, max_weight: float
                      ) -> tuple[dict[str, np.ndarray], SecureStage1]:
    """Run ``config.rounds`` securely aggregated stage-1 rounds of ``sample`` devices on
    ``grid``; returns (the final global arrays, the strategy)."""
    shares, threshold = protocol_sizes(config, sample)
    strategy = SecureStage1(books, initial, client_config, sample=sample,
                            max_weight=max_weight)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={},
                                    state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=config.rounds,
                                                round_timeout=config.round_timeout),
                            strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=shares, reconstruction_threshold=threshold,
        max_weight=max(1.0, float(max_weight)),
        clipping_range=float(config.secagg_clipping_range),
        quantization_range=QUANTIZATION_RANGE, timeout=config.round_timeout))
    log.info("stage 1 under SecAgg+: %d devices per round, %d shares, threshold %d, "
             "values clipped to +-%g", sample, shares, threshold,
             config.secagg_clipping_range)
    workflow(grid, context)
    return strategy.arrays, strategy


def secagg_summary(config: RunConfig, sample: int) -> dict[str, Any]:
    """For the summary and the results JSON."""
    shares, threshold = protocol_sizes(config, sample)
    return {"protocol": "SecAgg+ (Flower, legacy workflow)", "devices_per_round": sample,
            "shares": shares, "threshold": threshold,
            "clipping_range": float(config.secagg_clipping_range),
            "quantization_levels": QUANTIZATION_RANGE}
