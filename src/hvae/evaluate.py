"""Dataset-level metrics, one family per capability of the model (see `capabilities`).

Explicit levels (protocol.LatentVariableModel): ELBO terms (eq. 8, one sample), IW-NLL = -L_k (chunked over k),
bits/dim of it, active units, KL per level, collapsed levels.
Stochastic bound (protocol.StochasticBoundModel, e.g. VDM): the mean over R passes of one draw per image of the
bound's terms, and the standard error of the mean ELBO over the R pass means.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .errors import ConfigError
from .objectives import bits_per_dim, elbo_terms, iw_bound, log_importance_weights
from .protocol import BoundTerms, DiffusionModel, LatentVariableModel, StochasticBoundModel

ACTIVE_THRESHOLD = 0.01  # Burda et al.: a unit is active when Cov_x(E_q[z_u]) > 0.01
COLLAPSE_NATS = 0.01  # a level whose mean KL is below this carries no information about x
AU_SAMPLES = 16  # draws of the other levels per image, for E_q[z_t | x] of a level whose q depends on them

EXPLICIT_LEVELS, STOCHASTIC_BOUND = "explicit_levels", "stochastic_bound"  # the capabilities evaluate knows
# Every key evaluate may return: a stochastic bound's extra terms may not take one of these names.
RESULT_KEYS = frozenset({"elbo", "elbo_se", "passes", "draws", "reconstruction", "kl", "iw_nll", "k", "n_images",
                         "bits_per_dim", "active_units", "kl_per_level", "active_units_per_level",
                         "collapsed_levels", "seconds"})

TENSOR_BYTES = 8 << 20  # largest activation per decoder call


def row_floats(model: LatentVariableModel, x: Tensor) -> int:
    """Floats per row of the widest tensor a module of the model returns in one importance sample of x [B, *data]
    (at least the data's size), probed on one image: what chunk_for must bound. A convolutional model's feature
    maps are tens of times the image (32 channels x 28 x 28 = 32 x 784); an MLP's widest tensor is its output."""
    widest = math.prod(x.shape[1:])
    if not isinstance(model, nn.Module):  # the protocol asks for no modules: nothing to probe
        return widest

    def hook(_module, _inputs, output) -> None:
        nonlocal widest
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, Tensor):
                widest = max(widest, t.numel())
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            log_importance_weights(model, x[:1], 1)  # one image, one sample: one row
    finally:
        for h in handles:
            h.remove()
    return widest


def chunk_for(k: int, batch: int, n_dims: int, max_bytes: int = TENSOR_BYTES) -> int:
    """Importance samples per decoder call: chunk * batch rows of n_dims floats (row_floats) stay within max_bytes.

    Why so small: tensors above glibc's mmap threshold (<= 32 MB) are handed back to the OS when freed
    and page-faulted in afresh at every call (about 400,000 minor faults per 100-image, k = 1000 evaluation
    at 25,000-row chunks, against about 2,000 at this size). Rows are counted in the model's widest tensor
    (row_floats), not the image: sized by the image, the conv ladder's 14x14 maps made 65 MB tensors, and a third
    of its k = 1000 evaluation went to the kernel (11.3 s of 34 s CPU for 100 images; 0.4 s of 27 s sized by its
    maps). On a GPU larger calls may pay (not yet measured).
    """
    return max(1, min(k, max_bytes // (4 * n_dims * max(1, batch))))


def iw_chunk(model: LatentVariableModel, x: Tensor, k: int, batch_size: int, max_bytes: int = TENSOR_BYTES) -> int:
    """Importance samples per call of the IW bound over batches of batch_size images of x [N, *data] (fewer images
    than a batch: longer chunks): chunk_for sized by row_floats."""
    return chunk_for(k, min(batch_size, len(x)), row_floats(model, x), max_bytes)


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


def capabilities(model) -> frozenset[str]:
    """What evaluate can measure on `model`: EXPLICIT_LEVELS where it is a protocol.LatentVariableModel (infer,
    decode, ...), STOCHASTIC_BOUND where it is a protocol.StochasticBoundModel (stochastic_bound); either, both or
    neither.

    A model narrows this with a class attribute `eval_capabilities` (a set of these names), e.g. a diffusion model
    whose `infer` serves pictures but whose many levels make an IW bound too dear; it cannot claim one whose
    methods it lacks.
    """
    found = frozenset(name for name, protocol in ((EXPLICIT_LEVELS, LatentVariableModel),
                                                  (STOCHASTIC_BOUND, StochasticBoundModel),
                                                  (STOCHASTIC_BOUND, DiffusionModel))
                      if isinstance(model, protocol))
    declared = getattr(model, "eval_capabilities", None)
    if declared is None:
        return found
    if not frozenset(declared) <= found:
        raise TypeError(f"{type(model).__name__}.eval_capabilities claims {sorted(frozenset(declared) - found)}, "
                        f"but the model has the methods of only {sorted(found)}")
    return frozenset(declared)


def _check_at_least(name: str, value: int, minimum: int, why: str = "") -> None:
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}{why}; got {value}")


def _check_batches(x: Tensor, batch_size: int) -> None:
    _check_at_least("batch_size", batch_size, 1)
    _check_at_least("the number of images in x", len(x), 1)


@torch.inference_mode()
def evaluate_levels(model: LatentVariableModel, x: Tensor, k: int = 1000, batch_size: int = 100,
                    device: str | torch.device = "cpu", progress: bool = True, seed: int = 0,
                    chunk_bytes: int = TENSOR_BYTES) -> dict[str, Any]:
    """The explicit-level metrics, means over the images x [N, *data] (in the likelihood's input space), nats.

    elbo = reconstruction - kl (1 sample, closed-form KL where allowed); iw_nll = -L_k; bits_per_dim of
    iw_nll; active units from the variance over x of each level's posterior mean (posterior_mean_moments); a level
    is collapsed when its mean KL is below COLLAPSE_NATS, or, where its rate is a Monte Carlo log-ratio (which may
    be negative), when none of its units is active. Seeds torch's global RNG with `seed` first.
    """
    _check_at_least("k", k, 1)
    _check_batches(x, batch_size)
    model.eval()
    torch.manual_seed(seed)
    n, n_dims = len(x), math.prod(x.shape[1:])
    chunk = iw_chunk(model, x, k, batch_size, chunk_bytes)
    sums = {"reconstruction": 0.0, "kl": 0.0, "iw": 0.0}
    kl_levels: Tensor | None = None
    moments: list[tuple[Tensor, Tensor]] | None = None  # per level, over images: see posterior_mean_moments
    analytic: list[bool] = []
    device = torch.device(device)
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
    }


def _named_terms(terms: BoundTerms, batch: int) -> dict[str, Tensor]:
    """reconstruction, kl, elbo and the extra terms of one draw by name, each checked to be [B]."""
    clash = sorted(RESULT_KEYS & set(terms.extra))
    if clash:
        raise ValueError(f"stochastic_bound's extra terms may not be named {clash}: evaluate reports those keys")
    named = {"reconstruction": terms.reconstruction, "kl": terms.kl, "elbo": terms.elbo, **terms.extra}
    for name, term in named.items():
        if term.shape != (batch,):
            raise ValueError(f"stochastic_bound's {name} must be per example, [{batch}]; got {list(term.shape)}")
    return named


@torch.inference_mode()
def stochastic_bound_of(model, draws: int = 1) -> Callable[[Tensor], BoundTerms]:
    """An estimate of the model's stochastic bound per image, the mean of `draws` draws: a diffusion model's VLB
    (diffusion.vdm_bound, its times stratified per image: objectives are written once against the protocol), else
    the model's own stochastic_bound, called `draws` times."""
    if isinstance(model, DiffusionModel):
        from .diffusion import vdm_bound

        return lambda x: vdm_bound(model, x, draws=draws)
    if draws == 1:
        return model.stochastic_bound

    def mean_of_draws(x: Tensor) -> BoundTerms:
        terms = [model.stochastic_bound(x) for _ in range(draws)]
        mean = lambda get: torch.stack([get(t) for t in terms]).mean(0)  # noqa: E731
        return BoundTerms(mean(lambda t: t.reconstruction), mean(lambda t: t.kl), mean(lambda t: t.elbo),
                          {k: mean(lambda t, k=k: t.extra[k]) for k in terms[0].extra})
    return mean_of_draws


def evaluate_stochastic_bound(model: StochasticBoundModel, x: Tensor, passes: int = 10, batch_size: int = 100,
                              device: str | torch.device = "cpu", progress: bool = True,
                              seed: int = 0, draws: int = 1) -> dict[str, Any]:
    """E[elbo] of a stochastic bound over images x [N, *data]: each of `passes` = R passes takes, per image, the
    mean of `draws` draws of the bound (stochastic_bound_of; for VDM one (t, eps) each, the times stratified per
    image); every term is the mean over the passes and images, nats.

    elbo_se = sd(m_1..m_R) / sqrt(R), m_r the mean ELBO of pass r: the Monte Carlo standard error of elbo for these
    images (the spread of the test set itself is not in it). reconstruction, kl and the model's extra terms
    (VDM: prior_kl, diffusion) are averaged the same way; bits_per_dim = -elbo / (D ln 2), no +8 (the likelihood
    is discrete). Seeds torch's global RNG with `seed` first.
    """
    _check_at_least("passes", passes, 2, " (the standard error needs two pass means)")
    _check_batches(x, batch_size)
    model.eval()
    torch.manual_seed(seed)
    n, n_dims, device = len(x), math.prod(x.shape[1:]), torch.device(device)
    _check_at_least("draws", draws, 1)
    bound = stochastic_bound_of(model, draws)
    pass_sums: list[dict[str, float]] = []  # per pass: each term summed over the images, float64
    with tqdm(total=passes * math.ceil(n / batch_size), desc=f"eval bound passes={passes}", file=sys.stderr,
              disable=not progress, leave=False) as bar:
        for _ in range(passes):
            sums: dict[str, float] = {}
            for lo in range(0, n, batch_size):
                xb = x[lo:lo + batch_size].to(device)
                for name, term in _named_terms(bound(xb), len(xb)).items():
                    sums[name] = sums.get(name, 0.0) + term.sum(dtype=torch.float64).item()
                bar.update()
            if pass_sums and sums.keys() != pass_sums[0].keys():
                raise ValueError(f"stochastic_bound's terms changed between calls: {sorted(pass_sums[0])} "
                                 f"then {sorted(sums)}")
            pass_sums.append(sums)
    mean = {name: sum(s[name] for s in pass_sums) / (passes * n) for name in pass_sums[0]}
    extra = {name: value for name, value in mean.items() if name not in ("elbo", "reconstruction", "kl")}
    return {
        "elbo": mean["elbo"], "elbo_se": statistics.stdev(s["elbo"] / n for s in pass_sums) / math.sqrt(passes),
        "passes": passes, "draws": draws, "reconstruction": mean["reconstruction"], "kl": mean["kl"], **extra, "n_images": n,
        "bits_per_dim": bits_per_dim(-mean["elbo"], n_dims),
    }


def evaluate(model: nn.Module, x: Tensor, k: int = 1000, batch_size: int = 100,
             device: str | torch.device = "cpu", progress: bool = True, seed: int = 0,
             chunk_bytes: int = TENSOR_BYTES, passes: int = 10, draws: int = 1) -> dict[str, Any]:
    """The metrics that apply to `model` (see `capabilities`) over the images x [N, *data], merged; plus seconds.

    Explicit levels: evaluate_levels (k, chunk_bytes). Stochastic bound: evaluate_stochastic_bound (passes). Each
    family seeds torch's RNG with `seed` itself, so its figures are the same whether or not the other runs.
    A model with both gets the union of the keys, one name per figure (DESIGN.md, Contracts): elbo, reconstruction
    and kl are the stochastic bound's, so that elbo_se and the extra terms stand beside the elbo they belong to and
    kl = the sum of its extra terms (VDM: prior_kl + diffusion); iw_nll, k and bits_per_dim (of iw_nll, the
    tighter bound) are the IW bound's; the per-level lists come from the one-sample trace, whose own ELBO (of the same
    bound, for a coherent model) is not reported (sum(kl_per_level) then agrees with kl within Monte Carlo error only).
    """
    _check_at_least("k", k, 1)
    _check_at_least("passes", passes, 2, " (the standard error needs two pass means)")
    _check_batches(x, batch_size)  # all checked before a long first family runs
    can = capabilities(model)
    if not can:
        raise TypeError(f"{type(model).__name__} offers nothing to evaluate: give it data_shape and infer, decode, "
                        "sample (protocol.LatentVariableModel) or stochastic_bound (protocol.StochasticBoundModel)")
    start, result = time.perf_counter(), {}
    if EXPLICIT_LEVELS in can:
        result = evaluate_levels(model, x, k, batch_size, device, progress, seed, chunk_bytes)
    if STOCHASTIC_BOUND in can:
        bound = evaluate_stochastic_bound(model, x, passes, batch_size, device, progress, seed, draws)
        if EXPLICIT_LEVELS in can:
            del bound["bits_per_dim"]  # it stays that of iw_nll
        result.update(bound)
    return result | {"seconds": time.perf_counter() - start}
