"""Objectives written once against the model protocol (protocol.py); pure functions, no model classes.

1. ELBO, eq. 1-3:  ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)); the reconstruction term by a Monte
   Carlo average over L = n_samples draws, the prior-matching term in closed form where the level allows
   it (else log q(z) - log p(z) at the sample).
2. Hierarchical ELBO, eq. 8:  E_q[log p(x, z_1:T) - log q(z_1:T|x)] = log p(x|z_1) - sum_t rate_t,
   with each level's rate taken as in 1. For the Markovian HVAE (eq. 6-7) this gives the Contracts'
   terms: rate_t = log q(z_t|z_{t-1}) - log p(z_t|z_{t+1}) for t < T, closed-form KL at t = T.
3. Importance weights log w_k = log p(x, z_k) - log q(z_k|x), z_k ~ q, and the bound
   L_K = log (1/K) sum_k w_k (Burda et al.), K = 1 the one-sample ELBO, rising towards log p(x).
4. Training objectives chosen by name: the beta-weighted ELBO with free bits per level (on batch means), and IWAE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .numerics import log_mean_exp
from .protocol import ElboTerms, LatentVariableModel, Level, Trace
from .schema import option


def level_rate(level: Level, analytic_kl: bool = True) -> Tensor:
    """KL(q || p) in closed form when allowed and asked for, else mean_S [log q(z) - log p(z)]. -> [B]."""
    if analytic_kl and level.analytic_kl:
        kl = level.q.kl(level.p)
        # Why: a q conditioned on sampled latents has [S, B] parameters; average its KL over those S samples.
        return kl.mean(0) if kl.dim() == level.z.dim() - level.q.event_ndim else kl
    log_ratio = level.q.log_prob(level.z) - level.p.log_prob(level.z)  # [S, B], may be < 0
    return log_ratio.mean(0)


def reconstruction(model: LatentVariableModel, x: Tensor, trace: Trace) -> Tensor:
    """E_q[log p(x|z_1)] by a Monte Carlo mean over the trace's S samples (eq. 3, first term). -> [B]."""
    return model.decode(trace.z1).log_prob(x).mean(0)


def elbo(model: LatentVariableModel, x: Tensor, n_samples: int = 1, analytic_kl: bool = True) -> ElboTerms:
    """ELBO (eq. 3 / eq. 8) with L = n_samples Monte Carlo samples. x: [B, *data] -> ElboTerms of [B]."""
    trace = model.infer(x, n_samples)
    return elbo_terms(model, x, trace, analytic_kl)


def elbo_terms(model: LatentVariableModel, x: Tensor, trace: Trace, analytic_kl: bool = True) -> ElboTerms:
    """The ELBO terms of eq. 8 for an existing trace: log p(x|z_1) - sum_t rate_t. -> ElboTerms of [B]."""
    rec = reconstruction(model, x, trace)
    kl_per_level = torch.stack([level_rate(level, analytic_kl) for level in trace.levels])
    kl = kl_per_level.sum(0)
    return ElboTerms(rec, kl, rec - kl, kl_per_level)


def log_weights_of_trace(model: LatentVariableModel, x: Tensor, trace: Trace, log_px: Tensor | None = None) -> Tensor:
    """log w = log p(x|z_1) + sum_t [log p(z_t|.) - log q(z_t|.)] at the trace's samples: [S, B], nats.

    `log_px` ([S, B]) may be passed when the caller has already decoded the trace.
    """
    log_w = model.decode(trace.z1).log_prob(x) if log_px is None else log_px
    for level in trace.levels:
        log_w = log_w + level.p.log_prob(level.z) - level.q.log_prob(level.z)
    return log_w


def log_importance_weights(model: LatentVariableModel, x: Tensor, k: int, chunk_size: int | None = None) -> Tensor:
    """log w_k = log p(x, z_k) - log q(z_k|x), z_k ~ q(z|x), k = 1..K. x: [B, *data] -> [K, B], nats.

    Computed `chunk_size` samples at a time, so memory is bounded by the chunk, not by K.
    """
    chunk_size = k if chunk_size is None else max(1, chunk_size)
    chunks = [log_weights_of_trace(model, x, model.infer(x, min(chunk_size, k - start)))
              for start in range(0, k, chunk_size)]
    return torch.cat(chunks, dim=0)


def iw_bound(log_w: Tensor) -> Tensor:
    """L_K = log (1/K) sum_k w_k, the importance-weighted bound.  [K, B] -> [B], nats.

    L_1 is the one-sample ELBO; E[L_K] rises with K towards log p(x).
    """
    return log_mean_exp(log_w, dim=0)


def bits_per_dim(nats: Tensor | float, n_dims: int, dequantized_8bit: bool = False) -> Tensor | float:
    """bits/dim = nats / (D ln 2), plus 8 only for a continuous density on [0, 1]-scaled 8-bit data
    with uniform dequantization (never for Bernoulli or discretized likelihoods)."""
    return nats / (n_dims * math.log(2)) + (8.0 if dequantized_8bit else 0.0)


def nats_from_bits_per_dim(bpd: Tensor | float, n_dims: int, dequantized_8bit: bool = False) -> Tensor | float:
    """The inverse of bits_per_dim."""
    return (bpd - (8.0 if dequantized_8bit else 0.0)) * n_dims * math.log(2)


def free_bits(kl_per_level: Tensor, min_nats: float) -> Tensor:
    """Free bits per level (Kingma et al. 2016) on batch means: a level whose mean KL is below
    `min_nats` contributes the constant min_nats (no gradient) instead. [T, B] -> [T, B]."""
    if min_nats <= 0:
        return kl_per_level
    below = kl_per_level.mean(1, keepdim=True) < min_nats  # [T, 1]
    return torch.where(below, torch.full_like(kl_per_level, min_nats), kl_per_level)


def kl_balance(kl_per_level: Tensor, sizes: Tensor) -> Tensor:
    """NVAE's KL balancing (Vahdat & Kautz 2020, appendix A): weights w_t proportional to (mean_B KL_t + 0.01) / a_t,
    a_t = D_t / mean(D) the level's share of latent values, normalized to mean 1 over the T levels and detached, so
    that a level with more KL per value than the others is pushed back harder while the KL weight warms up and no
    level is left behind at KL 0. kl_per_level [T, B], sizes [T] -> weights [T, 1] (no gradient)."""
    alpha = sizes.to(kl_per_level) / sizes.to(kl_per_level).mean()
    w = (kl_per_level.detach().abs().mean(1) + 0.01) / alpha
    return (w / w.mean()).unsqueeze(1)


# 4. Training objectives, chosen by name (`objective.name`). Each is its own small config and a function over the
#    model protocol: objective(model, x, kl_weight) -> (surrogate to maximize [B], ElboTerms for logging), with
#    the KL weight of this step (warm-up) passed in by the loop. Settings an objective does not use are not its
#    fields, so a config that sets them is refused, not ignored. A new objective: a class here (or in its own
#    module) plus one line in OBJECTIVES.

@dataclass
class ElboObjective:
    """`objective.name: elbo`: reconstruction - kl_weight * free_bits(KL per level)  (eq. 3 / eq. 8, beta-weighted).

    The KL weight of a step is beta ramped linearly from 0 over warmup_epochs (KL warm-up), then beta; with balance,
    each level's rate is weighted by kl_balance while the weight is below beta (the ELBO itself is unchanged)."""

    name: ClassVar[str] = "elbo"
    beta: float = option(1.0, ge=0, help="weight of the rate (beta-VAE)")
    warmup_epochs: float = option(0.0, ge=0, help="KL warm-up: beta ramps linearly from 0 over this many epochs")
    free_bits: float = option(0.0, ge=0, help="nats per level, on batch means")
    n_samples: int = option(1, ge=1, help="L Monte Carlo samples of the reconstruction term")
    analytic_kl: bool = option(True, help="closed-form KL where the level allows it")
    balance: bool = option(False, help="NVAE's KL balancing of the levels while the KL weight warms up (kl_balance)")

    def kl_weight(self, step: int, steps_per_epoch: int) -> float:
        """beta * min(1, step / (warmup_epochs * steps_per_epoch)); beta when there is no warm-up."""
        if self.warmup_epochs <= 0:
            return self.beta
        return self.beta * min(1.0, step / (self.warmup_epochs * steps_per_epoch))

    def __call__(self, model: LatentVariableModel, x: Tensor, kl_weight: Tensor | float) -> tuple[Tensor, ElboTerms]:
        terms = elbo(model, x, self.n_samples, self.analytic_kl)
        rates = free_bits(terms.kl_per_level, self.free_bits)  # [T, B]
        if self.balance and len(rates) > 1:  # a select, not an `if`: no host sync, one compiled graph
            sizes = torch.tensor(getattr(model, "latent_dims", [1] * len(rates)), dtype=torch.float64)
            rates = torch.where(torch.as_tensor(kl_weight) < self.beta, kl_balance(rates, sizes) * rates, rates)
        return terms.reconstruction - kl_weight * rates.sum(0), terms


@dataclass
class IwaeObjective:
    """`objective.name: iwae`: the importance-weighted bound L_k over k samples (Burda et al.); no KL weight.

    The logged terms are the one-sample ELBO's, averaged over the k samples (closed-form KL where allowed)."""

    name: ClassVar[str] = "iwae"
    k: int = option(8, ge=2, help="importance samples per example")

    def kl_weight(self, step: int, steps_per_epoch: int) -> float:
        return 1.0

    def __call__(self, model: LatentVariableModel, x: Tensor, kl_weight: Tensor | float = 1.0) -> tuple[Tensor, ElboTerms]:
        trace = model.infer(x, self.k)
        log_px = model.decode(trace.z1).log_prob(x)  # [K, B]
        bound = iw_bound(log_weights_of_trace(model, x, trace, log_px))
        rec = log_px.mean(0).detach()
        kl_per_level = torch.stack([level_rate(level) for level in trace.levels]).detach()
        kl = kl_per_level.sum(0)
        return bound, ElboTerms(rec, kl, rec - kl, kl_per_level)


from .diffusion import VdmObjective  # noqa: E402 (diffusion.py builds on this module)

OBJECTIVES: dict[str, type] = {"elbo": ElboObjective, "iwae": IwaeObjective, "vdm": VdmObjective}
