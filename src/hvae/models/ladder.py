"""A top-down hierarchical VAE (LVAE, Sønderby et al. 2016; the MLP form of NVAE / VDVAE), level 1 nearest x.

Generative, top-down:  p(x, z_1:T) = p(z_T) prod_{t<T} p(z_t | z_{>t}) p(x | z_1)   (p(x | z_1:T) with skip)
    h_{T-1} = f(z_T),  h_t = f(z_{t+1}, h_{t+1}):  a deterministic top-down state; p(z_t | z_{>t}) = N(h_t).
Inference, top-down as well:  q(z_1:T | x) = q(z_T | x) prod_{t<T} q(z_t | z_{>t}, x)
    a deterministic bottom-up pass d_1 = f(x), d_t = f(d_{t-1}), then at each level, side by side with
    the prior, the posterior from d_t and h_t, one of:
      residual     q = N(mu_p + dmu, exp(log_var_p + dlv)),  (dmu, dlv) = f(d_t, h_t)      (NVAE)
      precision    q = N(mu_hat, var_hat) * p(z_t | z_{>t}) renormalized, (mu_hat, var_hat) = f(d_t)  (LVAE)
      independent  q = N(f(d_t, h_t))
Because q(z_t | .) and p(z_t | .) condition on the same z_{>t}, sampled before z_t, the closed-form KL is
valid at every level (STYLE.md); objectives.py takes eq. 8 as log p(x|.) - sum_t KL_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..distributions import DiagonalGaussian
from ..likelihoods import channels_per_pixel, decode_likelihood
from ..nets import GaussianHead, GaussianMLP, ResidualCell, activation, conv_decoder, conv_encoder, mlp, normed_mlp
from ..numerics import bounded_log_var
from ..protocol import Level, Trace
from .levels import per_level

POSTERIORS = ("residual", "precision", "independent")


@dataclass(frozen=True)
class SkipTrace(Trace):
    """A Trace for a likelihood that sees every level: z1, what decode takes, is [z_1, ..., z_T]
    concatenated on the last dim: [S, B, D_1 + ... + D_T]."""

    @property
    def z1(self) -> Tensor:
        return torch.cat([level.z for level in self.levels], dim=-1)


def precision_merge(bottom_up: DiagonalGaussian, prior: DiagonalGaussian) -> DiagonalGaussian:
    """N(mu_hat, v_hat) * N(mu_p, v_p) renormalized: 1/v = 1/v_hat + 1/v_p, mu = v (mu_hat/v_hat + mu_p/v_p).

    Why the sigmoid / logaddexp form: the weights v_p / (v_p + v_hat) = sigmoid(log v_p - log v_hat)
    stay finite whatever the variances' range.
    """
    w = torch.sigmoid(prior.log_var - bottom_up.log_var)  # weight on the bottom-up mean
    mean = w * bottom_up.mean + (1 - w) * prior.mean
    log_var = -torch.logaddexp(-bottom_up.log_var, -prior.log_var)
    return DiagonalGaussian(mean, log_var, prior.event_ndim)


class LadderVAE(nn.Module):
    """T levels with top-down inference. data_shape: [C, H, W] (or [D]); latent_dims D_1..D_T; z_t [S, B, D_t].

    hidden: the bottom-up encoder x -> d_1 and (reversed) the decoder; level_hidden: each level's small
    MLPs (bottom-up d_{t-1} -> d_t, top-down state, posterior). skip: the likelihood sees z_1..z_T.
    arch 'conv': x -> d_1 and the decoder are conv stacks (conv_channels) with a residual cell each.
    """

    def __init__(self, data_shape: Sequence[int] = (1, 28, 28), latent_dims: Sequence[int] = (32, 32),
                 hidden: Sequence[int] = (512, 256), level_hidden: Sequence[int] = (256,),
                 likelihood: str = "bernoulli", activation: str = "relu", variance: str = "clamp",
                 posterior: str = "residual", skip: bool = False, norm: str = "none", arch: str = "mlp",
                 conv_channels: Sequence[int] = (32, 64)):
        super().__init__()
        if posterior not in POSTERIORS:
            raise ValueError(f"unknown posterior {posterior!r}; choose one of {', '.join(POSTERIORS)}")
        self.data_shape, self.latent_dims = tuple(data_shape), tuple(latent_dims)
        self.likelihood, self.posterior_kind, self.skip, self.variance = likelihood, posterior, skip, variance
        n_data, k, d, T = math.prod(self.data_shape), channels_per_pixel(likelihood), self.latent_dims, len(latent_dims)
        lh = list(level_hidden)
        # 1. Bottom-up d_1 = encoder(x) [B, f_1], d_t = up[t-2](d_{t-1}) [B, f_t]; the decoder of
        #    p(x | z_1) or, with skip, p(x | z_1:T).
        if arch == "conv":
            self.encoder, self.decoder, f = self._conv_nets(conv_channels, sum(d) if skip else d[0], activation, k)
        elif arch == "mlp":
            self.encoder = nn.Sequential(nn.Flatten(), mlp([n_data, *hidden], activation, final_act=True))
            self.decoder = mlp([sum(d) if skip else d[0], *reversed(hidden), k * n_data], activation)
            f = [hidden[-1] if hidden else n_data]
        else:
            raise ValueError(f"unknown arch {arch!r}; choose 'mlp' or 'conv'")
        for _ in range(T - 1):
            f.append(lh[-1] if lh else f[-1])
        self.up = nn.ModuleList(normed_mlp([f[t], *lh], activation, True, norm) for t in range(T - 1))
        # 2. Top-down state: h_t = down[t-1](z_{t+1} [, h_{t+1}]) [.., w_t], t = 1..T-1; prior p(z_t | h_t).
        w = [0] * T  # w[t-1]: width of h_t; h_T does not exist
        for t in range(T - 1, 0, -1):
            n_in = d[t] + w[t]
            w[t - 1] = lh[-1] if lh else n_in
        self.down = nn.ModuleList(normed_mlp([d[t] + w[t], *lh], activation, True, norm) for t in range(1, T))
        self.prior = nn.ModuleList(GaussianHead(w[t], d[t], variance) for t in range(T - 1))
        # 3. Posteriors: the top from d_T alone (its prior is N(0, I)); below, per `posterior`.
        self.top = GaussianHead(f[-1], d[-1], variance)
        if posterior == "precision":
            self.post = nn.ModuleList(GaussianHead(f[t], d[t], variance) for t in range(T - 1))
        elif posterior == "independent":
            self.post = nn.ModuleList(GaussianMLP(f[t] + w[t], lh, d[t], activation, norm, variance)
                                      for t in range(T - 1))
        else:  # residual: a plain linear head on (d_t, h_t) -> (dmu, dlv); default init, never zero (collapse)
            self.post = nn.ModuleList(nn.Sequential(normed_mlp([f[t] + w[t], *lh], activation, True, norm),
                                                    nn.Linear(lh[-1] if lh else f[t] + w[t], 2 * d[t]))
                                      for t in range(T - 1))

    def _conv_nets(self, channels: Sequence[int], n_z: int, act: str, k: int):
        """Conv encoder x [B, C, H, W] -> d_1 [B, f_1] and decoder [N, n_z] -> [N, k*C, H, W]: stride-2 convs
        around one residual cell at the lowest resolution (its last conv starts small)."""
        c, h, w = self.data_shape
        down = 2 ** len(channels)
        if h % down or w % down:
            raise ValueError(f"conv arch needs H and W divisible by {down}; got {h}x{w}")
        grid = (channels[-1], h // down, w // down)
        encoder = nn.Sequential(conv_encoder(c, channels, act), ResidualCell(channels[-1], act), nn.Flatten())
        decoder = nn.Sequential(nn.Linear(n_z, math.prod(grid)), activation(act), nn.Unflatten(1, grid),
                                ResidualCell(channels[-1], act), conv_decoder(list(reversed(channels)), k * c, act))
        return encoder, decoder, [math.prod(grid)]

    @property
    def n_levels(self) -> int:
        return len(self.latent_dims)

    def bottom_up(self, x: Tensor) -> list[Tensor]:
        """The deterministic pass d_1 = f(x), d_t = f(d_{t-1}): T x [B, f_t]."""
        ds = [self.encoder(x)]
        for up in self.up:
            ds.append(up(ds[-1]))
        return ds

    def level_posterior(self, t: int, d: Tensor, h: Tensor, prior: DiagonalGaussian) -> DiagonalGaussian:
        """q(z_t | z_{>t}, x) for t < T from d_t [B, f_t] and h_t [*lead, B, w_t]: over [*lead, B, D_t]."""
        d = d.expand(*h.shape[:-1], d.shape[-1])
        if self.posterior_kind == "precision":
            return precision_merge(self.post[t - 1](d), prior)
        if self.posterior_kind == "independent":
            return self.post[t - 1](torch.cat([d, h], -1))
        dmu, dlv = self.post[t - 1](torch.cat([d, h], -1)).chunk(2, dim=-1)
        # Why clamp whatever `variance` says: dlv is a log-ratio of variances, not a raw variance output.
        return DiagonalGaussian(prior.mean + dmu, bounded_log_var(prior.log_var + dlv, "clamp"))

    def _descend(self, n: int, ds: list[Tensor] | None, keep: int, temps: list[float], use_mean: bool,
                 n_samples: int | None) -> list[tuple[Tensor, DiagonalGaussian, DiagonalGaussian]]:
        """The top-down pass, t = T..1: levels t > T - keep from the posterior (a sample, or its mean if
        use_mean), the rest from the prior with their temperatures. -> [(z_t, q_t or None, p_t)], level 1 first.

        z_T: [S, B, D_T] (n_samples = S) or [n, D_T] (n_samples None); lower levels follow its leading dims.
        """
        T, out = self.n_levels, []
        z = h = None
        for t in range(T, 0, -1):
            if t == T:
                q = self.top(ds[-1]) if keep > 0 else None
                weight = self.top.linear.weight  # z_T on the model's device, in its dtype
                p = DiagonalGaussian.standard(q.mean if q is not None else torch.empty(
                    n, self.latent_dims[-1], device=weight.device, dtype=weight.dtype))
            else:
                h = self.down[t - 1](z if h is None else torch.cat([z, h], -1))  # h_t: [*lead, w_t]
                p = self.prior[t - 1](h)
                q = self.level_posterior(t, ds[t - 1], h, p) if t > T - keep else None
            if q is None:
                z = p.rsample(temperature=temps[t - 1])
            elif use_mean:
                z = q.mean
            else:
                z = q.rsample(n_samples if t == T else None)
            out.append((z, q, p))
        return out[::-1]

    def infer(self, x: Tensor, n_samples: int = 1) -> Trace:
        """Bottom-up pass, then z_T ~ q(z_T|x), z_t ~ q(z_t | z_{>t}, x) top-down, each scored under
        p(z_t | z_{>t}) computed alongside (closed-form KL valid at every level). z_t: [S, B, D_t]."""
        steps = self._descend(len(x), self.bottom_up(x), self.n_levels, [1.0] * self.n_levels, False, n_samples)
        levels = [Level(z, q, p, analytic_kl=True) for z, q, p in steps]
        return SkipTrace(tuple(levels)) if self.skip else Trace(tuple(levels))

    def decode(self, z1: Tensor):
        """p(x | z_1), or p(x | z_1:T) with skip (z1 then [*lead, D_1 + ... + D_T], as SkipTrace.z1 gives):
        a likelihood with parameters [*lead, k*C, H, W]."""
        return decode_likelihood(self.decoder, z1, self.likelihood, self.data_shape)

    def _decoder_input(self, steps) -> Tensor:
        zs = [z for z, _, _ in steps]
        return torch.cat(zs, -1) if self.skip else zs[0]

    def encode(self, x: Tensor) -> Tensor:
        """Top-down posterior means (each level's mean given the means above): what decode takes,
        [B, D_1] or, with skip, [B, D_1 + ... + D_T]."""
        return self._decoder_input(self._descend(len(x), self.bottom_up(x), self.n_levels, [1.0] * self.n_levels,
                                                 True, None))

    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean of p(x | posterior means): [B, *data]."""
        return self.decode(self.encode(x)).mean

    def sample(self, n: int, temperature: float | Sequence[float] = 1.0) -> Tensor:
        """z_T ~ N(0, t_T^2 I), z_t ~ p(z_t | z_{>t}) with std scaled by t_t (0: the mean); the mean of the
        likelihood: [n, *data]. `temperature`: one float, or T floats (level 1 first)."""
        temps = per_level(temperature, self.n_levels)
        return self.decode(self._decoder_input(self._descend(n, None, 0, temps, False, None))).mean

    def resample_lower(self, x: Tensor, keep: int, temperature: float | Sequence[float] = 1.0,
                       use_mean: bool = True) -> Tensor:
        """Encode x, keep the top `keep` levels from the top-down posterior (means, or samples if not
        use_mean), redraw the levels below from p(z_t | z_{>t}) with their temperatures; the mean of the
        likelihood: [B, *data]. keep = T is a reconstruction, keep = 0 a sample."""
        if not 0 <= keep <= self.n_levels:
            raise ValueError(f"keep must be in 0..{self.n_levels}; got {keep}")
        temps = per_level(temperature, self.n_levels)
        ds = self.bottom_up(x) if keep > 0 else None
        return self.decode(self._decoder_input(self._descend(len(x), ds, keep, temps, use_mean, None))).mean
