"""Latent editing and latent views (the write-up: "latent vectors can be edited before being passed to the
decoder to more precisely control the data generated").

- Interpolation between posterior means, linear (1 - t) a + t b or spherical along the great circle.
- Attribute arithmetic: v = mean_{x in A} E_q[z|x] - mean_{x in B} E_q[z|x]; an image of class B is edited
  to decode(E_q[z|x] + s v).
- Traversal: z_d set to each of a range of values, one dimension d at a time, the others held.
- Views: per-dimension rate KL(q(z_d|x) || p(z_d)), PCA of posterior means, the decoded 2-d manifold.

Everything goes through the model protocol (encode, decode(z).mean). Editing acts on level 1, the level the
likelihood conditions on: `encode_means` is the one place that assumes `model.encode` returns the level-1
posterior mean [B, *event].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError, DataError


def lerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """(1 - t) a + t b. a, b: [B, D]; t: [T] -> [T, B, D]."""
    t = t.reshape(-1, 1, 1)
    return (1 - t) * a + t * b


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation along the great circle through a and b: [B, D] x2, t [T] -> [T, B, D].

    The angle is 2 atan2(|a^ - b^|, |a^ + b^|) of the unit vectors, accurate up to parallel and antipodal pairs
    (acos of a clamped cosine loses it there); where sin(angle) < 1e-6 (no single great circle, or none needed)
    it is lerp."""
    an, bn = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    omega = 2 * torch.atan2((an - bn).norm(dim=-1), (an + bn).norm(dim=-1))[None, :, None]  # [1, B, 1]
    t = t.reshape(-1, 1, 1)
    so = torch.sin(omega)
    flat = so < 1e-6
    out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.where(flat, torch.ones_like(so), so)
    return torch.where(flat, lerp(a, b, t.flatten()), out)


@torch.no_grad()
def encode_means(model, x: Tensor, batch_size: int = 500) -> Tensor:
    """E_q[z_1 | x], the level-1 posterior mean, in batches: [N, *data] -> [N, *event]."""
    device = model_device(model)
    return torch.cat([model.encode(x[lo:lo + batch_size].to(device)) for lo in range(0, len(x), batch_size)])


@torch.no_grad()
def decode_means(model, z: Tensor) -> Tensor:
    """Mean of p(x | z_1): [*lead, *event] -> [*lead, *data] (at most two lead dims, as [S, B])."""
    return model.decode(z).mean


@torch.no_grad()
def interpolate(model, x_a: Tensor, x_b: Tensor, steps: int = 10, spherical: bool = False) -> Tensor:
    """Decode the path between the posterior means of x_a and x_b: [B, *data] x2 -> [B, steps, *data]."""
    za, zb = encode_means(model, x_a), encode_means(model, x_b)
    t = torch.linspace(0, 1, steps, device=za.device)
    path = (slerp if spherical else lerp)(za.flatten(1), zb.flatten(1), t)  # [T, B, D]
    images = decode_means(model, path.reshape(steps, *za.shape))  # [T, B, *data]
    return images.transpose(0, 1)


def interpolation_rows(model, a: Tensor, b: Tensor, steps: int, method: str = "both") -> Tensor:
    """a, the decoded path to b, b, per method (linear, spherical or both rows): [rows, steps + 2, *data]."""
    kinds = {"linear": [False], "spherical": [True], "both": [False, True]}[method]
    paths = [interpolate(model, a, b, steps, spherical)[0] for spherical in kinds]  # [steps, *data] each
    return torch.stack([torch.cat([a, path, b]) for path in paths])


def latent_arrays(model, x: Tensor, labels: Tensor | None = None, batch_size: int = 500) -> dict:
    """What `hvae encode` writes: z{t}_mean [N, D_t] = E_q[z_t | x] for each level t (1 nearest x), float32 numpy
    arrays, and the labels when known."""
    from .evaluate import posterior_means

    means = [[m.float().cpu() for m in posterior_means(model, x[lo:lo + batch_size])]
             for lo in range(0, len(x), batch_size)]
    arrays = {f"z{t + 1}_mean": torch.cat([m[t] for m in means]).numpy() for t in range(len(means[0]))}
    if labels is not None:
        arrays["labels"] = labels[: len(x)].numpy()
    return arrays


def attribute_vector(model, x: Tensor, labels: Tensor | None, to_class: int, from_class: int) -> Tensor:
    """v = mean E_q[z|x] over class `to_class` minus the same over `from_class`. x: [N, *data] -> [*event]."""
    if labels is None:
        raise DataError("latent arithmetic needs class labels, and this dataset has none "
                        "(IDX label files, or y_test in the .npz)")
    labels = labels.to("cpu")
    present = sorted(labels.unique().tolist())
    for name, c in (("--to", to_class), ("--from", from_class)):
        if c not in present:
            raise ConfigError(f"{name} class {c} has no images among the {len(labels)} labelled ones; "
                              f"classes present: {present}")
    z = encode_means(model, x).cpu()
    return z[labels == to_class].mean(0) - z[labels == from_class].mean(0)


@torch.no_grad()
def apply_attribute(model, x: Tensor, vector: Tensor, scales: Sequence[float]) -> Tensor:
    """decode(E_q[z|x] + s v) for each scale s: x [B, *data], v [*event] -> [B, len(scales), *data]."""
    z = encode_means(model, x)  # [B, *event]
    s = torch.tensor(list(scales), dtype=z.dtype, device=z.device).reshape(-1, 1, *[1] * vector.ndim)
    edited = z[None] + s * vector.to(z.device)[None, None]  # [S, B, *event]
    return decode_means(model, edited).transpose(0, 1)


def class_arithmetic(model, x: Tensor, labels: Tensor | None, from_class: int, to_class: int, n: int = 8,
                     scales: Sequence[float] = (0.0, 0.5, 1.0, 1.5)) -> Tensor:
    """The first n images of `from_class`, then each moved by s (mean_A - mean_B), A = to_class, B = from_class.

    The class means are taken over all of x. -> [n', 1 + len(scales), *data], the inputs in column 0.
    """
    if n < 1 or not len(scales):
        raise ConfigError(f"n must be >= 1 and scales not empty; got n={n}, scales={list(scales)}")
    vector = attribute_vector(model, x, labels, to_class, from_class)
    source = x[(labels == from_class).to(x.device)][:n].to(model_device(model))
    edited = apply_attribute(model, source, vector, scales)
    return torch.cat([source[:, None], edited], 1)


@torch.no_grad()
def traverse(model, z: Tensor, dims: Sequence[int], values: Tensor) -> Tensor:
    """Decode z with z_d set to each value, one d per row: z [*event] (level 1), values [V] -> [len(dims), V, *data]."""
    flat = z.flatten().to(model_device(model))
    bad = [d for d in dims if not 0 <= d < flat.numel()]
    if bad:
        raise ConfigError(f"latent dimension {bad[0]} is out of range; this model has {flat.numel()} "
                          f"(valid: 0..{flat.numel() - 1})")
    grid = flat.repeat(len(dims), len(values), 1)  # [n_dims, V, D]
    for row, d in enumerate(dims):
        grid[row, :, d] = values.to(grid)
    return decode_means(model, grid.reshape(len(dims), len(values), *z.shape))


def most_informative_dims(model, x: Tensor, n: int = 10) -> list[int]:
    """The (up to) n level-1 units with the highest mean KL over x, highest first."""
    kl = kl_per_dimension(model, x)[0]
    return torch.argsort(kl, descending=True, stable=True)[:n].tolist()


@torch.no_grad()
def kl_per_dimension(model, x: Tensor, batch_size: int = 500) -> list[Tensor]:
    """Mean over x of each unit's rate, per level: [N, *data] -> list of [D_t], nats.

    Closed form KL(q(z_d|x) || p(z_d)) where the level allows it, else log q(z_d) - log p(z_d) at one
    sample (Monte Carlo). Diagonal Gaussians factorize over units, so each list entry sums to the level's rate.
    """
    sums: list[Tensor] | None = None
    for lo in range(0, len(x), batch_size):
        xb = x[lo:lo + batch_size].to(model_device(model))
        trace = model.infer(xb, 1)
        rates = [_per_unit(_unit_rate(level), level).mean(0) * len(xb) for level in trace.levels]  # [D_t] each
        sums = rates if sums is None else [s + r for s, r in zip(sums, rates)]
    return [s.cpu() / len(x) for s in sums]


@torch.no_grad()
def posterior_mean_variance(model, x: Tensor, batch_size: int = 500) -> list[Tensor]:
    """Cov_x(E_q[z_u]) of each unit, per level: [N, *data] -> list of [D_t] (float64; a unit is active above 0.01).
    The estimate is evaluate's (posterior_mean_moments), with the global RNG stream left as it was."""
    from .evaluate import add_moments, posterior_mean_moments, unit_variances

    moments = None
    with torch.random.fork_rng(devices=[model_device(model)] if model_device(model).type == "cuda" else []):
        for lo in range(0, len(x), batch_size):
            moments = add_moments(moments, posterior_mean_moments(model, x[lo:lo + batch_size].to(model_device(model))))
    return [v.cpu() for v in unit_variances(moments, len(x))]


def _per_unit(t: Tensor, level) -> Tensor:
    """[*lead, *event] -> [rows, D_t]: a level's q may carry the sample dim S in front of B (S = 1 here)."""
    event_ndim = level.q.event_ndim
    return t.reshape(-1, math.prod(level.z.shape[level.z.ndim - event_ndim:]))


def _unit_rate(level) -> Tensor:
    """Per-unit rate of one level: [*lead, *event]."""
    q, p = (dataclasses.replace(d, event_ndim=0) for d in (level.q, level.p))
    if level.analytic_kl:
        return q.kl(p)
    return (q.log_prob(level.z) - p.log_prob(level.z)).mean(0)  # [S, B, *event] -> [B, *event]


def principal_components(z: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """PCA by SVD of the centred data: z [N, D] -> (projections [N, k], explained variance ratios [k]).

    Where D < k the missing components are zeros.
    """
    z = np.asarray(z, dtype=np.float64).reshape(len(z), -1)
    centred = z - z.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    proj = np.zeros((len(z), k))
    m = min(k, vt.shape[0])
    proj[:, :m] = centred @ vt[:m].T
    total = (s ** 2).sum()
    ratio = np.zeros(k)
    ratio[:m] = (s[:m] ** 2) / total if total > 0 else 0.0
    return proj, ratio


def tsne_class():
    """sklearn.manifold.TSNE; t-SNE needs scikit-learn, which hvae does not depend on."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ConfigError("t-SNE needs scikit-learn (pip install scikit-learn); PCA needs nothing") from None
    return TSNE


def tsne_2d(z: np.ndarray, seed: int = 0) -> np.ndarray:
    """t-SNE embedding [N, D] -> [N, 2] (perplexity capped for small N)."""
    tsne = tsne_class()
    z = np.asarray(z, dtype=np.float64).reshape(len(z), -1)
    return tsne(2, perplexity=min(30.0, max(2.0, (len(z) - 1) / 3)), random_state=seed).fit_transform(z)


def manifold_values(n: int = 15, quantile: float = 0.95) -> Tensor:
    """n values of z spaced evenly in probability under N(0, 1): Phi^-1(linspace(1 - q, q, n)). -> [n]."""
    p = torch.linspace(1 - quantile, quantile, n, dtype=torch.float64)
    return torch.special.ndtri(p).float()


@torch.no_grad()
def manifold_grid(model, event_shape: Sequence[int] = (2,), n: int = 15, quantile: float = 0.95) -> Tensor:
    """Decoded 2-d latent plane: z = (v_j, v_i) on the grid of manifold_values, z_2 falling down the rows.

    For 2-d latents only. -> [n, n, *data] (row i, column j).
    """
    if math.prod(event_shape) != 2:
        raise ConfigError(f"the manifold grid needs a 2-d latent; this model's level 1 has {math.prod(event_shape)} "
                          "dimensions (use the PCA view instead)")
    v = manifold_values(n, quantile).to(model_device(model), next(model.parameters()).dtype)
    z2, z1 = torch.meshgrid(v.flip(0), v, indexing="ij")  # rows: z_2 high to low; columns: z_1 low to high
    z = torch.stack([z1, z2], -1).reshape(n, n, *event_shape)  # [n, n, *event]
    return decode_means(model, z)


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def level_resamples(model, x: Tensor, samples: int = 4, temperature: float | Sequence[float] = 1.0) -> Tensor:
    """What each level controls: for keep = T, T-1, ..., 0, `samples` images that keep the top `keep` levels
    of x's posterior means and redraw the levels below from the prior. x: [B, *data] ->
    [B, 1 + (T + 1) * samples, *data], the input first. Needs a hierarchical model (resample_lower)."""
    if not hasattr(model, "resample_lower"):
        raise ConfigError("this picture needs a hierarchical model (mhvae or ladder); a flat VAE has one level")
    if samples < 1:
        raise ConfigError(f"samples must be >= 1; got {samples}")
    try:
        columns = [model.resample_lower(x, keep, temperature) for keep in range(model.n_levels, -1, -1)
                   for _ in range(samples)]
    except ValueError as e:  # e.g. the wrong number of per-level temperatures
        raise ConfigError(str(e)) from None
    return torch.stack([x.to(columns[0].dtype), *columns], dim=1)

