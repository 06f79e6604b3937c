"""Dataset-level metrics: ELBO terms, IW-NLL (chunked over k), bits/dim, active units, KL per level."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .objectives import bits_per_dim, elbo_terms, iw_bound, log_importance_weights

ACTIVE_THRESHOLD = 0.01  # Burda et al.: a unit is active when Cov_x(E_q[z_u]) > 0.01
COLLAPSE_NATS = 0.01  # a level whose mean KL is below this carries no information about x
AU_SAMPLES = 16  # draws of the other levels per image, for E_q[z_t | x] of a level whose q depends on them


TENSOR_BYTES = 8 << 20  # largest activation per decoder call


def chunk_for(k: int, batch: int, n_dims: int, max_bytes: int = TENSOR_BYTES) -> int:
    """Importance samples per decoder call: chunk * batch rows of n_dims floats stay within max_bytes.

    Why so small: tensors above glibc's mmap threshold (<= 32 MB) are handed back to the OS when freed
    and page-faulted in afresh at every call (about 400,000 minor faults per 100-image, k = 1000 evaluation
    at 25,000-row chunks, against about 2,000 at this size). On a GPU larger calls may pay (not yet measured).
    """
    return max(1, min(k, max_bytes // (4 * n_dims * max(1, batch))))


def _mean_halves(level, n_samples: int, batch: int) -> tuple[Tensor, Tensor]:
    """Two independent estimates of E_q[z_t | x], [B, D_t] float64 each: the level's q mean, averaged over each half
    of the n_samples draws of the levels it depends on (both the exact mean where q depends on x alone)."""
    mean, units = level.q.mean.double(), math.prod(level.z.shape[level.z.ndim - level.q.event_ndim:])
    if mean.ndim == level.z.ndim:  # [S, B, *event]: depends on the sampled levels
        m_a, m_b = mean[: n_samples // 2].mean(0), mean[n_samples // 2:].mean(0)
    else:
        m_a = m_b = mean
    return m_a.reshape(batch, units), m_b.reshape(batch, units)


def posterior_means(model: nn.Module, x: Tensor, n_samples: int = AU_SAMPLES) -> list[Tensor]:
    """E_q[z_t | x] of every level, [B, D_t] float64 each, for x [B, *data] (see posterior_mean_moments)."""
    return [(m_a + m_b) / 2 for m_a, m_b in (_mean_halves(level, n_samples, len(x))
                                              for level in model.infer(x, n_samples).levels)]


def posterior_mean_moments(model: nn.Module, x: Tensor, n_samples: int = AU_SAMPLES) -> list[tuple[Tensor, Tensor]]:
    """Per level: (sum over the images x [B, *data] of m(x), sum of m_a(x) * m_b(x)), each [D_t] float64.

    m estimates E_q[z_t | x], the posterior mean of the Burda statistic Cov_x(E_q[z_u]). A level whose q depends
    on x alone gives it exactly (m_a = m_b = m). A level whose q depends on other sampled levels (MHVAE t >= 2,
    LadderVAE below the top) averages its q mean over n_samples draws of them, split in two halves m_a, m_b:
    independent given x, so E[m_a m_b | x] = E_q[z_t | x]^2 and the variance over x carries no Monte Carlo term
    (a single draw would add the spread of the other levels' samples and count uninformative units as active).
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 (two independent halves); got {n_samples}")
    moments = []
    for level in model.infer(x, n_samples).levels:
        m_a, m_b = _mean_halves(level, n_samples, len(x))
        moments.append(((m_a + m_b).sum(0) / 2, (m_a * m_b).sum(0)))
    return moments


def add_moments(total: list[tuple[Tensor, Tensor]] | None, batch: list[tuple[Tensor, Tensor]]):
    """Running sum of posterior_mean_moments over batches (None: nothing summed yet)."""
    return batch if total is None else [(a1 + b1, a2 + b2) for (a1, a2), (b1, b2) in zip(total, batch)]


def unit_variances(moments: list[tuple[Tensor, Tensor]], n: int) -> list[Tensor]:
    """Cov_x(E_q[z_u]) of each unit, per level [D_t], from posterior_mean_moments summed over n images."""
    return [s2 / n - (s1 / n) ** 2 for s1, s2 in moments]


@torch.inference_mode()
def evaluate(model: nn.Module, x: Tensor, k: int = 1000, batch_size: int = 100,
             device: str | torch.device = "cpu", progress: bool = True, seed: int = 0,
             chunk_bytes: int = TENSOR_BYTES) -> dict[str, Any]:
    """Means over the images x [N, *data] (already in the likelihood's input space), nats unless named.

    elbo = reconstruction - kl (1 sample, closed-form KL where allowed); iw_nll = -L_k; bits_per_dim of
    iw_nll; active units from the variance over x of each level's posterior mean (posterior_mean_moments); a level
    is collapsed when its mean KL is below COLLAPSE_NATS, or, where its rate is a Monte Carlo log-ratio (which may
    be negative), when none of its units is active.
    """
    if k < 1:
        raise ValueError(f"--k must be >= 1; got {k}")
    model.eval()
    torch.manual_seed(seed)
    n, n_dims = len(x), math.prod(x.shape[1:])
    chunk = chunk_for(k, min(batch_size, n), n_dims, chunk_bytes)  # fewer images than a batch: longer chunks
    sums = {"reconstruction": 0.0, "kl": 0.0, "iw": 0.0}
    kl_levels: Tensor | None = None
    moments: list[tuple[Tensor, Tensor]] | None = None  # per level, over images: see posterior_mean_moments
    analytic: list[bool] = []
    device = torch.device(device)
    start = time.perf_counter()
    for lo in tqdm(range(0, n, batch_size), desc=f"eval k={k}", file=sys.stderr, disable=not progress, leave=False):
        xb = x[lo:lo + batch_size].to(device)
        trace = model.infer(xb, 1)
        terms = elbo_terms(model, xb, trace)
        sums["reconstruction"] += terms.reconstruction.sum().item()
        sums["kl"] += terms.kl.sum().item()
        kl_levels = terms.kl_per_level.sum(1) if kl_levels is None else kl_levels + terms.kl_per_level.sum(1)
        analytic = [lvl.analytic_kl for lvl in trace.levels]
        # Why fork: the extra draws leave the IW samples' stream, and so every IW-NLL, as without them.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            moments = add_moments(moments, posterior_mean_moments(model, xb))
        sums["iw"] += iw_bound(log_importance_weights(model, xb, k, chunk)).sum().item()
    active = [int((v > ACTIVE_THRESHOLD).sum()) for v in unit_variances(moments, n)]
    iw_nll = -sums["iw"] / n
    rec, kl, kl_per_level = sums["reconstruction"] / n, sums["kl"] / n, (kl_levels / n).tolist()
    return {
        "elbo": rec - kl, "reconstruction": rec, "kl": kl, "iw_nll": iw_nll, "k": k, "n_images": n,
        "bits_per_dim": bits_per_dim(iw_nll, n_dims), "active_units": sum(active),
        "kl_per_level": kl_per_level, "active_units_per_level": active,
        "collapsed_levels": [t + 1 for t, kl_t in enumerate(kl_per_level)
                             if (kl_t < COLLAPSE_NATS if analytic[t] else active[t] == 0)],
        "seconds": time.perf_counter() - start,
    }
