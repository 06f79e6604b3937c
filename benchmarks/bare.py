"""The reference: a bare, hand-written PyTorch VAE and training loop, independent of hvae's code.

Same network as hvae's default (784-512-256 -> 32 -> 256-512-784, ReLU, Bernoulli), Adam 1e-3, batch 128,
dynamic binarization, analytic KL, one sample. Its IW-NLL estimator is also written out here, so hvae's
evaluator is checked against an independent implementation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BareVAE(nn.Module):
    def __init__(self, latent: int = 32):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, 256), nn.ReLU(), nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 784))

    def loss(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        rec = F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return (rec + kl) / x.shape[0]


def bernoulli_binarize(images_u8: torch.Tensor) -> torch.Tensor:
    """The textbook dynamic binarization: x ~ Bernoulli(pixel / 255) drawn on floats."""
    return torch.bernoulli(images_u8.float() / 255)


def integer_binarize(images_u8: torch.Tensor) -> torch.Tensor:
    """The same distribution drawn as [u < pixel], u uniform on the integers 0..254 (cheaper on a CPU)."""
    return (torch.randint(0, 255, images_u8.shape, dtype=torch.uint8, device=images_u8.device) < images_u8).float()


def bare_epoch(model, opt, train_u8, batch: int = 128, gen=None, steps: int | None = None,
               binarize=bernoulli_binarize) -> int:
    """One epoch (or `steps` steps) of the textbook loop; returns the number of examples seen."""
    n = len(train_u8)
    perm = torch.randperm(n, generator=gen).to(train_u8.device)  # once per epoch: no host-device copy per step
    steps = n // batch if steps is None else steps
    for i in range(steps):
        x = binarize(train_u8[perm[i * batch:(i + 1) * batch]])
        loss = model.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch


@torch.no_grad()
def bare_eval(model, x, k: int = 1000, batch: int = 100, chunk: int = 250) -> dict:
    """-ELBO and IW-NLL (nats, means over x [N, 784] binarized): log (1/k) sum_k p(x,z_k)/q(z_k|x)."""
    neg_elbo = iw = 0.0
    log2pi = math.log(2 * math.pi)
    for lo in range(0, len(x), batch):
        xb = x[lo:lo + batch]
        mu, logvar = model.enc(xb).chunk(2, dim=1)
        std = torch.exp(0.5 * logvar)
        z = mu + std * torch.randn_like(mu)
        rec = F.binary_cross_entropy_with_logits(model.dec(z), xb, reduction="none").sum(1)
        neg_elbo += (rec - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), 1)).sum().item()
        log_w = []
        for start in range(0, k, chunk):
            c = min(chunk, k - start)
            eps = torch.randn(c, *mu.shape, device=mu.device)
            zs = mu + std * eps
            log_px = -F.binary_cross_entropy_with_logits(model.dec(zs), xb.expand(c, -1, -1), reduction="none").sum(-1)
            log_pz = -0.5 * (zs.pow(2) + log2pi).sum(-1)
            log_qz = -0.5 * (eps.pow(2) + log2pi + logvar).sum(-1)
            log_w.append(log_px + log_pz - log_qz)
        iw += (torch.logsumexp(torch.cat(log_w), 0) - math.log(k)).sum().item()
    return {"neg_elbo": neg_elbo / len(x), "iw_nll": -iw / len(x)}
