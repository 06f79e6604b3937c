"""Latent editing (the write-up: "latent vectors can be edited before being passed to the decoder"):
interpolation between encoded images, linear or spherical."""

from __future__ import annotations

import torch
from torch import Tensor


def lerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """(1 - t) a + t b. a, b: [B, D]; t: [T] -> [T, B, D]."""
    t = t.reshape(-1, 1, 1)
    return (1 - t) * a + t * b


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation along the great circle through a and b (lerp where they are parallel). -> [T, B, D]."""
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1 + 1e-7, 1 - 1e-7)
    omega = torch.acos(cos)[None, :, None]  # [1, B, 1]
    t = t.reshape(-1, 1, 1)
    so = torch.sin(omega)
    out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / so
    return torch.where(so.abs() < 1e-4, lerp(a, b, t.flatten()), out)


@torch.no_grad()
def interpolate(model, x_a: Tensor, x_b: Tensor, steps: int = 10, spherical: bool = False) -> Tensor:
    """Decode the path between the posterior means of x_a and x_b: [B, *data] x2 -> [B, steps, *data]."""
    za, zb = model.encode(x_a), model.encode(x_b)
    t = torch.linspace(0, 1, steps, device=za.device)
    path = (slerp if spherical else lerp)(za.flatten(1), zb.flatten(1), t)  # [T, B, D]
    images = model.decode(path.reshape(steps, *za.shape)).mean  # [T, B, *data]
    return images.transpose(0, 1)
