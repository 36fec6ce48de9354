"""Central differential privacy for the collective stage 1, with Flower's own pieces.

With run config ``dp-noise-multiplier`` z > 0, each round of stage 1 releases the average of
the clients' *clipped* updates plus Gaussian noise (the DP-FedAvg of McMahan et al. 2018,
server-side fixed clipping, as Flower's ``DifferentialPrivacyServerSideFixedClipping``):

1. the replies are validated first (:func:`cloud_server.aggregation.fedavg`'s checks: names,
   shapes, finite and bounded values), so a malformed reply cannot reach the clipping; the
   robust path's norm bound and median clip are off, since the clipping bounds every
   update's influence;
2. every update ``w_i - w`` is clipped to L2 norm ``dp-clipping-norm`` C
   (Flower's ``compute_clip_model_update``);
3. the clipped updates are averaged with *equal* weights (the sensitivity of the average of
   k clipped updates is C/k; weighting by example counts would let one client weigh more);
4. Gaussian noise of standard deviation z·C/k is added to every coordinate (Flower's
   ``compute_stdv`` and ``add_gaussian_noise_inplace``), from an unseeded generator: noise
   anyone could regenerate from the run's seed would protect nothing, so DP runs are not
   bit-reproducible;
5. PerFit's R is re-orthonormalized after the noise (post-processing keeps the guarantee).

Flower's ``RdpAccountant`` composes one Gaussian release per round (client-level,
add-or-remove-one neighbours, no amplification by sampling: conservative) and reports the
(epsilon, ``dp-delta``) spent. The server sends each round's parameters and the epsilon the
run will have spent after that round to the sampled devices, whose ledgers record them.

Trust: server-side clipping protects the devices from whoever reads the *released* arrays
(other devices, the published model), not from the server, which still sees each update;
secure aggregation is what hides individual updates from the server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from flwr.serverapp import GaussianPrivacyEvent, RdpAccountant
from flwr.supercore.differential_privacy import (add_gaussian_noise_inplace,
                                                 compute_clip_model_update, compute_stdv)
from flwr.supercore.privacy_accounting import (NeighboringRelation, PrivacyConfig,
                                               SamplingMethod)

from cloud_server.aggregation import Aggregate, Reply, fedavg

log = logging.getLogger("flwr.pfl.server")

@dataclass
class CentralDP:
    """Stage 1's DP settings and its accountant; ``population``: the clients the rounds
    sample from (the accountant's population size)."""

    noise_multiplier: float
    clipping_norm: float
    delta: float
    population: int
    accountant: RdpAccountant = field(init=False, repr=False)
    samples: list[int] = field(default_factory=list, init=False)  # each release's size

    def __post_init__(self) -> None:
        if self.noise_multiplier <= 0 or self.clipping_norm <= 0:
            raise ValueError("central DP needs a positive noise multiplier and clipping norm")
        self.accountant = RdpAccountant(self._config())

    def _config(self) -> PrivacyConfig:
        return PrivacyConfig(target_delta=self.delta, population_size=max(1, self.population),
                             neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                             sampling_method=SamplingMethod.NO_AMPLIFICATION)

    def _event(self, sample: int) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(noise_multiplier=self.noise_multiplier,
                                    sample_size=max(1, min(sample, self.population)),
                                    population_size=max(1, self.population))

    @property
    def epsilon(self) -> float:
        """The epsilon spent so far (0 before the first release), at ``delta``."""
        if self.accountant.num_releases == 0:
            return 0.0
        return float(self.accountant.get_privacy_spent().epsilon)

    def epsilon_after_next(self, sample: int) -> float:
        """The epsilon the run will have spent once the next round is released."""
        ahead = RdpAccountant(self._config())  # the releases so far, then the next one
        for size in self.samples + [sample]:
            ahead.compose(self._event(size))
        return float(ahead.get_privacy_spent().epsilon)

    def round_config(self, sample: int) -> dict[str, float]:
        """What the devices of a round are told (:data:`shared.config.DP_ROUND_KEYS`)."""
        return {"dp-noise-multiplier": float(self.noise_multiplier),
                "dp-clipping-norm": float(self.clipping_norm), "dp-delta": float(self.delta),
                "dp-epsilon": self.epsilon_after_next(sample)}

    def aggregate(self, replies: Sequence[Reply], reference: Mapping[str, Any]) -> Aggregate:
        """Validate, clip, average with equal weights, add noise; compose the release."""
        # names, shapes, finite values; no norm bound or median clip: the clipping below
        # bounds every update's influence, a data-dependent drop would only blur it
        checked = fedavg(replies, reference, max_examples=None, clip_factor=None,
                         max_update_ratio=None)
        if not checked.accepted:
            return checked
        names = sorted(reference)
        current = [np.asarray(reference[k], np.float32) for k in names]
        clipped = []
        for reply in checked.accepted:
            arrays = [np.asarray(reply.arrays[k], np.float32).copy() for k in names]
            compute_clip_model_update(arrays, current, self.clipping_norm)
            clipped.append(Reply(dict(zip(names, arrays)), 1.0, reply.node, reply.metrics))
        averaged = fedavg(clipped, reference, max_examples=None, clip_factor=None,
                          max_update_ratio=None).arrays
        # the example counts stay what the clients reported (metrics, not the weights)
        return Aggregate(self.release(averaged, len(clipped)), list(checked.accepted),
                         checked.dropped)

    def release(self, averaged: Mapping[str, Any], count: int) -> dict[str, np.ndarray]:
        """The equal-weight average of ``count`` updates clipped to the clipping norm, plus
        Gaussian noise of std z·C/count; the release is composed into the accountant. Used
        here (clipped by the server) and under secure aggregation (clipped by each device
        with Flower's ``fixedclipping_mod``, :mod:`cloud_server.secagg`)."""
        names = sorted(averaged)
        noisy = [np.array(averaged[k], np.float32) for k in names]
        stdv = compute_stdv(self.noise_multiplier, self.clipping_norm, count)
        add_gaussian_noise_inplace(noisy, stdv)
        self.accountant.compose(self._event(count))
        self.samples.append(count)
        log.info("DP round: %d updates clipped to %g, noise std %.4g, epsilon %.4g at "
                 "delta %g", count, self.clipping_norm, stdv, self.epsilon, self.delta)
        return dict(zip(names, noisy))

    def describe(self) -> dict[str, float]:
        """For the summary and the results JSON."""
        return {"noise_multiplier": float(self.noise_multiplier),
                "clipping_norm": float(self.clipping_norm), "delta": float(self.delta),
                "epsilon": self.epsilon, "releases": int(self.accountant.num_releases),
                "population": int(self.population), "accounting": "rdp, client-level, "
                "add-or-remove-one, no sampling amplification"}
