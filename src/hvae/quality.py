"""Distances between two sets of image features (generated vs test images): Fréchet distance, KID, k-NN precision
and recall. Pure functions of feature matrices [N, D] (float64); which network makes the features is features.py's.

- Fréchet distance (Heusel et al. 2017): ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) between Gaussians
  fitted to the two sets; torchmetrics' FrechetInceptionDistance computes it (float64 state, the matrix square
  root's trace through the eigenvalues of S_1 S_2), fed the features through an identity "feature extractor".
- KID (Bińkowski et al. 2018): the unbiased MMD^2 estimate with the cubic polynomial kernel
  k(a, b) = (a.b / D + 1)^3 (torchmetrics' poly_mmd), averaged over disjoint blocks of both sets, so its standard
  error is the blocks' standard deviation / sqrt(blocks).
- Precision and recall (Kynkäänniemi et al. 2019): a generated feature is "precise" when it lies inside the
  k-nearest-neighbour ball of some real feature (radius: distance to that real feature's k-th nearest real
  neighbour); recall swaps the roles. Samples of only some modes keep precision and lose recall.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import poly_mmd


class _Given(nn.Module):
    """The 'feature extractor' for features computed already: the identity, with the size torchmetrics reads."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def _check(a: Tensor, b: Tensor, least: int) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D; got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(len(a), len(b)) < least:
        raise ValueError(f"each feature set needs at least {least} rows; got {len(a)} and {len(b)}")


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets: [N, D], [M, D] -> float (>= 0, 0 for equal
    sets up to rounding). Symmetric."""
    _check(real, fake, 2)
    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]), normalize=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kid(real: Tensor, fake: Tensor, blocks: int = 10, degree: int = 3) -> tuple[float, float]:
    """Kernel distance: the mean of unbiased MMD^2 estimates over `blocks` disjoint blocks (each min(N, M) //
    blocks rows of both sets, in order) and its standard error. -> (kid, kid_se). An unbiased estimate: its mean is
    0 for two samples of one distribution, and it may be slightly negative.

    Real block i is scored against fake block i + 1 (mod blocks): a set made image by image from the real one (the
    reconstructions of the test images) would otherwise meet its own sources, which breaks the estimate's
    independence and biases it below 0."""
    m = min(len(real), len(fake)) // blocks
    _check(real, fake, 2 * blocks)
    block = lambda f, i: f[(i % blocks) * m:(i % blocks + 1) * m].double()  # noqa: E731
    values = torch.stack([poly_mmd(block(real, i), block(fake, i + 1), degree=degree) for i in range(blocks)])
    return float(values.mean()), float(values.std() / math.sqrt(blocks))


def knn_radii(features: Tensor, k: int = 3, chunk: int = 1000) -> Tensor:
    """Distance of each row to its k-th nearest other row: [N, D] -> [N]."""
    if len(features) <= k:
        raise ValueError(f"k-NN radii with k = {k} need more than {k} rows; got {len(features)}")
    return torch.cat([torch.cdist(features[lo:lo + chunk], features).topk(k + 1, largest=False).values[:, k]
                      for lo in range(0, len(features), chunk)])  # column 0 is the row itself (distance 0)


def coverage(points: Tensor, centres: Tensor, radii: Tensor, chunk: int = 1000) -> float:
    """Share of `points` [N, D] inside at least one ball (centres [M, D], radii [M])."""
    inside = [(torch.cdist(points[lo:lo + chunk], centres) <= radii).any(dim=1)
              for lo in range(0, len(points), chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """k-NN precision (share of fake inside the real manifold) and recall (share of real inside the fake
    manifold): [N, D], [M, D] -> (precision, recall), each in [0, 1]."""
    _check(real, fake, k + 1)
    real, fake = real.double(), fake.double()
    return coverage(fake, real, knn_radii(real, k)), coverage(real, fake, knn_radii(fake, k))


def scores(real: Tensor, fake: Tensor) -> dict[str, float]:
    """All four distances of fake to real features, under the eval JSON's keys."""
    value, se = kid(real, fake)
    precision, recall = precision_recall(real, fake)
    return {"fid": frechet_distance(real, fake), "kid": value, "kid_se": se, "precision": precision,
            "recall": recall}
