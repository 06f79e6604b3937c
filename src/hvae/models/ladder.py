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

Code: one TopDownBlock per level (VDVAE's DecBlock), blocks[t - 1] for level t, looped over from the top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar, Sequence

import torch
from torch import Tensor, nn

from ..cells import CELLS
from ..distributions import DiagonalGaussian
from ..errors import ConfigError
from ..likelihoods import channels_per_pixel, decode_likelihood
from ..nets import GaussianHead, GaussianMLP, ResidualCell, activation, conv_decoder, conv_encoder, mlp, normed_mlp
from ..numerics import bounded_log_var
from ..protocol import Level, Trace
from ..schema import option
from .levels import HierarchyOptions, ModelOptions, per_level

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


def residual_normal(prior: DiagonalGaussian, dmu: Tensor, dlv: Tensor) -> DiagonalGaussian:
    """NVAE's residual normal q = N(mu_p + dmu, exp(log_var_p + dlv)) over the prior's event dims.

    Why clamp whatever the model's `variance` says: dlv is a log-ratio of variances, not a raw variance output."""
    return DiagonalGaussian(prior.mean + dmu, bounded_log_var(prior.log_var + dlv, "clamp"), prior.event_ndim)


class Draw(str, Enum):
    """Where a level's z_t comes from in the top-down pass."""

    SAMPLE = "sample"  # z_t ~ q(z_t | z_{>t}, x)
    MEAN = "mean"  # z_t = E q(z_t | z_{>t}, x)
    PRIOR = "prior"  # z_t ~ p(z_t | z_{>t}) with its std scaled by a temperature (0: the mean)


def draw(mode: Draw, p: DiagonalGaussian, q: DiagonalGaussian | None, temperature: float = 1.0,
         n_samples: int | None = None) -> Tensor:
    """A level's z_t as `mode` says: from p with its std scaled by `temperature` (PRIOR), q's mean (MEAN), or
    q.rsample(n_samples) (SAMPLE)."""
    if mode is Draw.PRIOR:
        return p.rsample(temperature=temperature)
    return q.mean if mode is Draw.MEAN else q.rsample(n_samples)


class TopDownBlock(nn.Module):
    """Level t of the top-down pass (VDVAE's DecBlock); below the top:

        h_t = state(z_{t+1} [, h_{t+1}]),  p(z_t | z_{>t}) = prior(h_t),  q(z_t | z_{>t}, x) from post(d_t [, h_t]).
    The top level (state = prior = None) has p(z_T) = N(0, I) and q(z_T | x) = post(d_T), a GaussianHead.
    """

    def __init__(self, dim: int, post: nn.Module, state: nn.Module | None = None, prior: nn.Module | None = None,
                 posterior: str = "residual"):
        super().__init__()
        self.dim, self.kind = dim, posterior  # D_t; one of POSTERIORS (unused at the top)
        self.state, self.prior, self.post = state, prior, post

    def forward(self, *, d: Tensor | None, z_above: Tensor | None, h_above: Tensor | None, mode: Draw | str,
                temperature: float = 1.0, n_samples: int | None = None, batch: int | None = None):
        """-> (z_t, q_t or None if mode is PRIOR, p_t, h_t or None at the top).  d: d_t [B, f_t] (None if PRIOR);
        z_above, h_above: z_{t+1} [*lead, B, D_{t+1}], h_{t+1} [*lead, B, w_{t+1}] (None at the top, h_above also
        at T - 1). z_T: [S, B, D_T] (n_samples = S; no S dim if None) or, from the prior, [batch, D_T]; below the
        top z_t follows z_above: [*lead, B, D_t]."""
        mode = Draw(mode)
        if self.state is None:  # level T: p = N(0, I), shaped like q's mean or, from the prior, [batch, D_T]
            h, q = None, self.post(d) if mode is not Draw.PRIOR else None
            like = q.mean if q is not None else self.post.linear.weight.new_empty(batch, self.dim)  # device, dtype
            p = DiagonalGaussian.standard(like)
        else:
            h = self.state(z_above if h_above is None else torch.cat([z_above, h_above], -1))  # [*lead, w_t]
            p = self.prior(h)
            q = self.posterior(d, h, p) if mode is not Draw.PRIOR else None
        # S draws at the top; below, z_above already carries them
        return draw(mode, p, q, temperature, n_samples if self.state is None else None), q, p, h

    def posterior(self, d: Tensor, h: Tensor, p: DiagonalGaussian) -> DiagonalGaussian:
        """q(z_t | z_{>t}, x) for t < T from d_t [B, f_t], h_t [*lead, B, w_t] and p_t: over [*lead, B, D_t]."""
        d = d.expand(*h.shape[:-1], d.shape[-1])
        if self.kind == "precision":
            return precision_merge(self.post(d), p)
        if self.kind == "independent":
            return self.post(torch.cat([d, h], -1))
        return residual_normal(p, *self.post(torch.cat([d, h], -1)).chunk(2, dim=-1))


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
        f += [lh[-1] if lh else f[-1]] * (T - 1)  # f_t: width of d_t
        self.up = nn.ModuleList(normed_mlp([f[t], *lh], activation, True, norm) for t in range(T - 1))
        # 2. Per level, one TopDownBlock: the state net h_t = f(z_{t+1} [, h_{t+1}]) [.., w_t], the prior head, the
        #    posterior net (the top's from d_T alone). Built as the four-list layout drew them (states, priors,
        #    top, posteriors), so that a seed gives the same initial weights.
        w = [0] * T  # w[t-1]: width of h_t; h_T does not exist
        for t in range(T - 1, 0, -1):
            w[t - 1] = lh[-1] if lh else d[t] + w[t]
        states = [normed_mlp([d[t] + w[t], *lh], activation, True, norm) for t in range(1, T)]
        priors = [GaussianHead(w[t], d[t], variance) for t in range(T - 1)]
        top = GaussianHead(f[-1], d[-1], variance)
        posts = [self._posterior_net(f[t], w[t], d[t], lh, activation, norm, variance) for t in range(T - 1)]
        self.blocks = nn.ModuleList([*(TopDownBlock(d[t], posts[t], states[t], priors[t], posterior)
                                       for t in range(T - 1)), TopDownBlock(d[-1], top)])

    def _posterior_net(self, f: int, w: int, dim: int, lh: list[int], act: str, norm: str, variance: str):
        """Level t < T's posterior net: [.., f_t] -> N(mu_hat, var_hat) (precision), [.., f_t + w_t] -> q (independent)
        or (dmu, dlv) [.., 2 D_t] (residual: a plain linear head, default init; zero would start it collapsed)."""
        if self.posterior_kind == "precision":
            return GaussianHead(f, dim, variance)
        if self.posterior_kind == "independent":
            return GaussianMLP(f + w, lh, dim, act, norm, variance)
        return nn.Sequential(normed_mlp([f + w, *lh], act, True, norm), nn.Linear(lh[-1] if lh else f + w, 2 * dim))

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

    def _descend(self, ds: list[Tensor | None], modes: list[Draw], temps: list[float], n_samples: int | None,
                 batch: int) -> list[tuple[Tensor, DiagonalGaussian | None, DiagonalGaussian]]:
        """The top-down pass t = T..1 (VDVAE's Decoder.forward); ds, modes, temps: one per level, level 1 first.
        -> [(z_t, q_t or None, p_t)], level 1 first."""
        z = h = None
        steps = []
        for block, d, mode, temp in zip(reversed(self.blocks), ds[::-1], modes[::-1], temps[::-1]):
            z, q, p, h = block(d=d, z_above=z, h_above=h, mode=mode, temperature=temp, n_samples=n_samples, batch=batch)
            steps.append((z, q, p))
        return steps[::-1]

    def infer(self, x: Tensor, n_samples: int = 1) -> Trace:
        """Bottom-up pass, then z_T ~ q(z_T|x), z_t ~ q(z_t | z_{>t}, x) top-down, each scored under
        p(z_t | z_{>t}) computed alongside (closed-form KL valid at every level). z_t: [S, B, D_t]."""
        T = self.n_levels
        steps = self._descend(self.bottom_up(x), [Draw.SAMPLE] * T, [1.0] * T, n_samples, len(x))
        levels = tuple(Level(z, q, p, analytic_kl=True) for z, q, p in steps)
        return SkipTrace(levels) if self.skip else Trace(levels)

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
        T = self.n_levels
        return self._decoder_input(self._descend(self.bottom_up(x), [Draw.MEAN] * T, [1.0] * T, None, len(x)))

    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean of p(x | posterior means): [B, *data]."""
        return self.decode(self.encode(x)).mean

    def sample(self, n: int, temperature: float | Sequence[float] = 1.0) -> Tensor:
        """z_T ~ N(0, t_T^2 I), z_t ~ p(z_t | z_{>t}) with std scaled by t_t (0: the mean); the mean of the
        likelihood: [n, *data]. `temperature`: one float, or T floats (level 1 first)."""
        temps, T = per_level(temperature, self.n_levels), self.n_levels
        return self.decode(self._decoder_input(self._descend([None] * T, [Draw.PRIOR] * T, temps, None, n))).mean

    def resample_lower(self, x: Tensor, keep: int, temperature: float | Sequence[float] = 1.0,
                       use_mean: bool = True) -> Tensor:
        """Encode x, keep the top `keep` levels from the top-down posterior (means, or samples if not
        use_mean), redraw the levels below from p(z_t | z_{>t}) with their temperatures; the mean of the
        likelihood: [B, *data]. keep = T is a reconstruction, keep = 0 a sample."""
        if not 0 <= keep <= self.n_levels:
            raise ValueError(f"keep must be in 0..{self.n_levels}; got {keep}")
        T, temps = self.n_levels, per_level(temperature, self.n_levels)
        modes = [Draw.PRIOR] * (T - keep) + [Draw.MEAN if use_mean else Draw.SAMPLE] * keep  # level 1 first
        ds = self.bottom_up(x) if keep > 0 else [None] * T
        return self.decode(self._decoder_input(self._descend(ds, modes, temps, None, len(x)))).mean

    def _legacy_prefixes(self) -> list[tuple[str, str]]:
        """(old, new) name prefixes of runs saved before the blocks, in the order that layout registered them."""
        lower, top = range(self.n_levels - 1), [("top.", f"blocks.{self.n_levels - 1}.post.")]
        return ([(f"down.{i}.", f"blocks.{i}.state.") for i in lower] + [(f"prior.{i}.", f"blocks.{i}.prior.")
                for i in lower] + top + [(f"post.{i}.", f"blocks.{i}.post.") for i in lower])

    def legacy_key(self, name: str) -> str:
        """A state-dict key of the four-list layout -> its name now (down.0.0.weight -> blocks.0.state.0.weight,
        top.linear.bias -> blocks.{T-1}.post.linear.bias, post.0.weight -> blocks.0.post.weight); others unchanged."""
        for old, new in self._legacy_prefixes():
            if name.startswith(old):
                return new + name[len(old):]
        return name

    def legacy_parameter_order(self) -> list[str]:
        """The names of named_parameters() in the order the four-list layout registered them (encoder, decoder,
        up, down, prior, top, post): the index order of an optimizer state it saved."""
        names = [name for name, _ in self.named_parameters()]
        groups = ["encoder.", "decoder.", "up."] + [new for _, new in self._legacy_prefixes()]
        return [name for group in groups for name in names if name.startswith(group)]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Why here: load_state_dict calls this on its own copy of the dict before it hands the children their keys,
        # so renaming the legacy keys first lets a run saved before the blocks load, strict or not.
        for key in [key for key in state_dict if key.startswith(prefix)]:
            new = prefix + self.legacy_key(key[len(prefix):])
            if new != key:
                state_dict[new] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@dataclass
class LadderConfig(HierarchyOptions, ModelOptions):
    """`model.name: ladder`: the top-down hierarchical VAE."""

    name: ClassVar[str] = "ladder"
    arch: str = option("mlp", choices=("mlp", "conv", "spatial"),
                       help="mlp | conv: the nets x -> d_1 and the decoder | spatial: feature-map latents (spatial.py)")
    conv_channels: list[int] = option([32, 64], each_ge=1, min_len=1,
                                      help="conv, spatial arch: channels per stride-2 stage (finest first)")
    posterior: str = option("residual", choices=POSTERIORS)
    skip: bool = option(False, help="the likelihood sees every level's z, not only z_1")
    groups: list[int] = option([], each_ge=0, help="spatial arch: stochastic groups per stage (finest first; >= 1 "
                               "at the coarsest); their sum is model.levels")
    cells: int = option(1, ge=0, help="spatial arch: residual cells per stage (bottom-up) and per group (top-down)")
    cell: str = option("residual", choices=CELLS, help="spatial arch: residual | bottleneck (VDVAE) | separable (NVAE)")
    se: bool = option(False, help="spatial arch: squeeze-excitation in every cell")
    vector_top: bool = option(False, help="spatial arch: the top level is a vector (its size the last latent dim) "
                              "above the groups (VDVAE's 1x1 top); model.levels = sum(groups) + 1")
    decoder_cells: int = option(0, ge=0, help="spatial arch: cells after each upsampling of the top-down state (also "
                                "at stages without groups)")

    def check(self) -> None:
        super().check()
        if self.arch != "spatial":
            if self.groups or self.vector_top or self.decoder_cells:
                raise ConfigError("model.groups, vector_top and decoder_cells are for arch spatial; set "
                                  "model.arch=spatial or drop them")
            return
        top = int(self.vector_top)
        if (not self.groups or sum(self.groups) + top != self.levels or len(self.conv_channels) != len(self.groups)
                or self.groups[-1] < 1 - top):
            raise ConfigError(f"arch spatial needs model.groups (groups per stage, finest first, >= 1 at the last unless "
                              f"vector_top) summing to model.levels ({self.levels}{' - 1 for vector_top' if top else ''})"
                              f" and one model.conv_channels width per stage; got groups {self.groups} and "
                              f"conv_channels {self.conv_channels}")
        if self.skip:
            raise ConfigError("arch spatial: every level reaches the likelihood through the top-down state already; "
                              "drop model.skip")

    def build(self, data_shape: Sequence[int]) -> nn.Module:
        if self.arch == "spatial":
            from .spatial import SpatialLadder  # spatial.py builds on this module

            return SpatialLadder(data_shape, self.groups, self.conv_channels, self.dims(), self.cells,
                                 self.cell, self.se, self.likelihood, self.activation, self.norm, self.posterior,
                                 self.variance, self.vector_top, self.decoder_cells)
        return LadderVAE(data_shape, self.dims(), posterior=self.posterior, skip=self.skip, arch=self.arch,
                         conv_channels=self.conv_channels, hidden=self.hidden, level_hidden=self.level_hidden,
                         likelihood=self.likelihood, activation=self.activation, variance=self.variance,
                         norm=self.norm)
