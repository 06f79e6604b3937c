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


TENSOR_BYTES = 8 << 20  # largest activation per decoder call


def chunk_for(k: int, batch: int, n_dims: int, max_bytes: int = TENSOR_BYTES) -> int:
    """Importance samples per decoder call: chunk * batch rows of n_dims floats stay within max_bytes.

    Why so small: tensors above glibc's mmap threshold (<= 32 MB) are handed back to the OS when freed
    and page-faulted in afresh at every call (about 400,000 minor faults per 100-image, k = 1000 evaluation
    at 25,000-row chunks, against about 2,000 at this size). On a GPU larger calls may pay (not yet measured).
    """
    return max(1, min(k, max_bytes // (4 * n_dims * max(1, batch))))


@torch.inference_mode()
def evaluate(model: nn.Module, x: Tensor, k: int = 1000, batch_size: int = 100,
             device: str | torch.device = "cpu", progress: bool = True, seed: int = 0,
             chunk_bytes: int = TENSOR_BYTES) -> dict[str, Any]:
    """Means over the images x [N, *data] (already in the likelihood's input space), nats unless named.

    elbo = reconstruction - kl (1 sample, closed-form KL where allowed); iw_nll = -L_k; bits_per_dim of
    iw_nll; active units from the variance over x of each level's posterior mean.
    """
    if k < 1:
        raise ValueError(f"--k must be >= 1; got {k}")
    model.eval()
    torch.manual_seed(seed)
    n, n_dims = len(x), math.prod(x.shape[1:])
    chunk = chunk_for(k, min(batch_size, n), n_dims, chunk_bytes)  # fewer images than a batch: longer chunks
    sums = {"reconstruction": 0.0, "kl": 0.0, "iw": 0.0}
    kl_levels: Tensor | None = None
    mean_stats: list[list[Tensor]] | None = None  # per level: [sum, sum of squares] over images, float64
    start = time.perf_counter()
    for lo in tqdm(range(0, n, batch_size), desc=f"eval k={k}", file=sys.stderr, disable=not progress, leave=False):
        xb = x[lo:lo + batch_size].to(device)
        trace = model.infer(xb, 1)
        terms = elbo_terms(model, xb, trace)
        sums["reconstruction"] += terms.reconstruction.sum().item()
        sums["kl"] += terms.kl.sum().item()
        kl_levels = terms.kl_per_level.sum(1) if kl_levels is None else kl_levels + terms.kl_per_level.sum(1)
        means = [lvl.q.mean.reshape(len(xb), -1).double() for lvl in trace.levels]
        if mean_stats is None:
            mean_stats = [[torch.zeros(m.shape[1], dtype=torch.float64, device=m.device) for _ in range(2)] for m in means]
        for stats, m in zip(mean_stats, means):
            stats[0] += m.sum(0)
            stats[1] += m.pow(2).sum(0)
        sums["iw"] += iw_bound(log_importance_weights(model, xb, k, chunk)).sum().item()
    active = [int(((s2 / n - (s1 / n) ** 2) > ACTIVE_THRESHOLD).sum()) for s1, s2 in mean_stats]
    iw_nll = -sums["iw"] / n
    rec, kl, kl_per_level = sums["reconstruction"] / n, sums["kl"] / n, (kl_levels / n).tolist()
    return {
        "elbo": rec - kl, "reconstruction": rec, "kl": kl, "iw_nll": iw_nll, "k": k, "n_images": n,
        "bits_per_dim": bits_per_dim(iw_nll, n_dims), "active_units": sum(active),
        "kl_per_level": kl_per_level, "active_units_per_level": active,
        "collapsed_levels": [t + 1 for t, kl_t in enumerate(kl_per_level) if kl_t < COLLAPSE_NATS],
        "seconds": time.perf_counter() - start,
    }
