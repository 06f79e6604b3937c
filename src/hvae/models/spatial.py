"""The ladder's spatial form (`model.arch: spatial`): a convolutional top-down hierarchy in the style of NVAE
(Vahdat & Kautz 2020) and VDVAE (Child 2021), whose latents are feature maps at several resolutions.

The same model as ladder.py, p(x, z_1:T) = p(z_T) prod_{t<T} p(z_t | z_{>t}) p(x | z_1:T) and q(z_1:T | x) = q(z_T | x)
prod_{t<T} q(z_t | z_{>t}, x), with every state a feature map:

- Bottom-up, deterministic: per stage s = 1..n a stride-2 conv and `cells` residual cells:
  d_s [B, channels[s], H / 2^s, W / 2^s].
- Top-down: a learned state h [channels[n], H / 2^n, W / 2^n] (VDVAE's bias) -- with `vector_top`, plus
  linear(z_T) of a vector level z_T [S, B, D_T] with q(z_T | x) = N(linear(flatten(d_n))) and p(z_T) = N(0, I),
  VDVAE's 1x1 top: global properties at the price of D_T values, not of a whole map -- then stage by stage from the
  coarsest, groups[s] stochastic groups each (level T first, level 1 last):
      p(z_t | z_{>t}) = N(conv(h))  (N(0, I) at the top),  q(z_t | z_{>t}, x) from conv(d_s, h) as ladder.py's
      posterior kinds (residual: N(mu_p + dmu, var_p e^dlv), NVAE's residual normal),
      h <- cells(h + conv1x1(z_t));
  between stages h is upsampled (nearest x2 + conv3x3). z_t: [S, B, D_t, H / 2^s, W / 2^s], D_t channels.
- The likelihood p(x | z_1:T) reads the final state h [.., channels[1], H / 2, W / 2], which every level reaches
  through the residual stream (NVAE's skip paths): an activation and a stride-2 transposed conv to the likelihood's
  parameters at full resolution.
  So "what decode takes" (Trace.z1, encode's output) is that state, not z_1.

Because q(z_t | .) and p(z_t | .) condition on the same z_{>t}, sampled before z_t, the closed-form KL is valid at
every level, as in ladder.py (STYLE.md); objectives.py takes eq. 8 as log p(x | .) - sum_t KL_t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..cells import cell_stack
from ..distributions import DiagonalGaussian
from ..likelihoods import channels_per_pixel, make_likelihood
from ..nets import GaussianHead, OneChannelConvTranspose2d
from ..nets import activation as act_layer
from ..numerics import bounded_log_var
from ..protocol import Level, Trace
from .ladder import POSTERIORS, Draw, draw, precision_merge, residual_normal
from .levels import per_level


@dataclass(frozen=True)
class StateTrace(Trace):
    """A Trace whose likelihood reads the top-down state: z1 (what decode takes) is that state [S, B, C, H', W']."""

    state: Tensor | None = None

    @property
    def z1(self) -> Tensor:
        return self.state


class SpatialGroup(nn.Module):
    """One stochastic group (level t) at one resolution: h [N, C, r, r], d [N, C, r, r] -> (z_t, q_t or None, p_t, h').

    N = S B rows (sample-major); z_t, q_t, p_t over [N, D_t, r, r] (event_ndim 3)."""

    def __init__(self, channels: int, dim: int, top: bool, posterior: str, cells: int, cell: str, act: str,
                 norm: str, se: bool, variance: str):
        super().__init__()
        self.dim, self.kind, self.variance = dim, posterior, variance
        self.prior = None if top else nn.Conv2d(channels, 2 * dim, 3, padding=1)
        post_in = channels if posterior == "precision" else 2 * channels
        self.post = nn.Conv2d(post_in, 2 * dim, 3, padding=1)
        self.z_in = nn.Conv2d(dim, channels, 1)
        self.cells = cell_stack(cells, channels, cell, act, norm, se)

    def _gaussian(self, raw: Tensor) -> DiagonalGaussian:
        mean, lv = raw.chunk(2, dim=1)
        return DiagonalGaussian(mean, bounded_log_var(lv, self.variance), 3)

    def forward(self, h: Tensor, d: Tensor | None, mode: Draw, temperature: float = 1.0):
        if self.prior is None:
            p = DiagonalGaussian.standard(h.new_empty(len(h), self.dim, *h.shape[2:]), 3)
        else:
            p = self._gaussian(self.prior(h))
        q = None
        if mode is not Draw.PRIOR:
            if self.kind == "precision":
                q = precision_merge(self._gaussian(self.post(d)), p)
            elif self.kind == "independent" or self.prior is None:
                q = self._gaussian(self.post(torch.cat([d, h], 1)))
            else:
                q = residual_normal(p, *self.post(torch.cat([d, h], 1)).chunk(2, dim=1))
        z = draw(mode, p, q, temperature)
        return z, q, p, self.cells(h + self.z_in(z))


class VectorTop(nn.Module):
    """The vector top level z_T: q(z_T | x) = N(linear(flatten(d_n))), p(z_T) = N(0, I); h <- h + linear(z_T) as a
    map [N, C, r, r]. d [N, C, r, r] (None when sampling from the prior)."""

    def __init__(self, channels: int, side: tuple[int, int], dim: int, variance: str):
        super().__init__()
        self.dim, self.side = dim, side
        self.post = GaussianHead(channels * side[0] * side[1], dim, variance)
        self.z_in = nn.Linear(dim, channels * side[0] * side[1])

    def forward(self, h: Tensor, d: Tensor | None, mode: Draw, temperature: float = 1.0):
        p = DiagonalGaussian.standard(h.new_empty(len(h), self.dim), 1)
        q = self.post(d.flatten(1)) if mode is not Draw.PRIOR else None
        z = draw(mode, p, q, temperature)
        return z, q, p, h + self.z_in(z).view(len(h), -1, *self.side)


class SpatialLadder(nn.Module):
    """The spatial top-down hierarchy (module docstring) over data [C, H, W]. groups[s - 1]: stochastic groups at
    stage s = 1..n (resolution H / 2^s, finest first; 0 below the coarsest: a stage the state only passes through,
    e.g. groups (0, 1) is a conv flat VAE with the same cells); channels[s - 1]: its width; latent_dims: D_1..D_T, the
    channels of each level's z (level 1, nearest x, first: the last group of stage 1); vector_top: level T is a
    vector of D_T values above the groups (VectorTop), so T = sum(groups) + 1; decoder_cells: cells after each
    upsampling."""

    def __init__(self, data_shape: Sequence[int] = (1, 28, 28), groups: Sequence[int] = (2, 2),
                 channels: Sequence[int] = (32, 64), latent_dims: Sequence[int] | None = None, cells: int = 1,
                 cell: str = "residual", se: bool = False, likelihood: str = "bernoulli", activation: str = "silu",
                 norm: str = "none", posterior: str = "residual", variance: str = "clamp", vector_top: bool = False,
                 decoder_cells: int = 0):
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"arch spatial needs image data [C, H, W]; got shape {tuple(data_shape)}")
        if posterior not in POSTERIORS:
            raise ValueError(f"unknown posterior {posterior!r}; choose one of {', '.join(POSTERIORS)}")
        if not groups or len(channels) != len(groups) or min(groups) < 0 or groups[-1] < (0 if vector_top else 1):
            raise ValueError(f"arch spatial needs one width per stage and >= 1 group at the coarsest stage (the last; "
                             f"finer ones may have 0; with vector_top 0 too); got groups {list(groups)} and "
                             f"conv_channels {list(channels)}")
        c_in, h, w = data_shape
        n, T = len(groups), sum(groups) + int(vector_top)
        if h % 2**n or w % 2**n:
            raise ValueError(f"arch spatial with {n} stages needs H and W divisible by {2 ** n}; got {h}x{w}")
        dims = tuple(latent_dims) if latent_dims else (8,) * T
        if len(dims) != T:
            raise ValueError(f"got {len(dims)} latent sizes for {T} levels (sum of groups {list(groups)})")
        self.data_shape, self.groups, self.channels = tuple(data_shape), tuple(groups), tuple(channels)
        self.likelihood, self.dims = likelihood, dims
        act = activation
        # Bottom-up: per stage a stride-2 conv and the cells.
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_prev, c, 4, stride=2, padding=1), cell_stack(cells, c, cell, act, norm, se))
            for c_prev, c in zip((c_in, *channels[:-1]), channels))
        # Top-down: the learned initial state, then the groups (top first), upsampling between stages.
        self.h_top = nn.Parameter(torch.zeros(channels[-1], h >> n, w >> n))
        self.top = VectorTop(channels[-1], (h >> n, w >> n), dims[-1], variance) if vector_top else None
        stage_of = [s for s in reversed(range(n)) for _ in range(groups[s])]  # top-down order, 0-based stages
        self.blocks = nn.ModuleList(  # block i (top-down) is level len(stage_of) - i (level 1 = index 0 of dims)
            SpatialGroup(channels[s], dims[len(stage_of) - 1 - i], i == 0 and not vector_top, posterior, cells, cell,
                         act, norm, se, variance)
            for i, s in enumerate(stage_of))
        self.stage_of = stage_of
        # decoder_cells: cells after each upsampling (NVAE's post-processing cells; at a stage without groups the only
        # computation between the coarser state and the likelihood)
        self.up = nn.ModuleList(nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                              nn.Conv2d(channels[s + 1], channels[s], 3, padding=1),
                                              *([cell_stack(decoder_cells, channels[s], cell, act, norm, se)]
                                                if decoder_cells else []))
                                for s in range(n - 1))
        # Why a transposed conv, not cells at full resolution: a 3x3 cell at 28x28 would cost as much as all the
        # groups above it; the conv ladder's decoder ends the same way.
        k = channels_per_pixel(likelihood)
        deconv = OneChannelConvTranspose2d if k * c_in == 1 else nn.ConvTranspose2d
        self.out = nn.Sequential(act_layer(act), deconv(channels[0], k * c_in, 4, stride=2, padding=1))

    @property
    def n_levels(self) -> int:
        return len(self.dims)

    @property
    def latent_dims(self) -> tuple[int, ...]:
        """The number of values in each level's z (D_t r_t^2), level 1 first."""
        _, h, w = self.data_shape
        sizes = [self.dims[-1]] * self.n_levels  # the vector top's, where there is one
        for i, s in enumerate(self.stage_of):
            lvl = len(self.stage_of) - 1 - i
            sizes[lvl] = self.dims[lvl] * (h >> (s + 1)) * (w >> (s + 1))
        return tuple(sizes)

    def bottom_up(self, x: Tensor) -> list[Tensor]:
        """d_s [B, channels[s], H / 2^s, W / 2^s] for s = 1..n (a list, stage 1 first)."""
        ds, h = [], x
        for stage in self.down:
            h = stage(h)
            ds.append(h)
        return ds

    def _descend(self, ds: list[Tensor] | None, modes: list[Draw], temps: list[float], n_samples: int,
                 batch: int) -> tuple[list[tuple[Tensor, DiagonalGaussian | None, DiagonalGaussian]], Tensor]:
        """The top-down pass over N = n_samples * batch rows (sample-major). modes, temps: one per level, level 1
        first. -> ([(z_t, q_t or None, p_t)] level 1 first, each over [N, D_t, r, r]; the final state h [N, ...])."""
        rows = n_samples * batch
        if ds is not None:  # each x's features, repeated for its samples
            ds = [d.unsqueeze(0).expand(n_samples, *d.shape).reshape(rows, *d.shape[1:]) for d in ds]
        h = self.h_top.unsqueeze(0).expand(rows, *self.h_top.shape)
        steps, stage = [], len(self.groups) - 1
        if self.top is not None:
            T = self.n_levels - 1
            z, q, p, h = self.top(h, None if ds is None else ds[-1], Draw(modes[T]), temps[T])
            steps.append((z, q, p))
        for i, block in enumerate(self.blocks):
            s, lvl = self.stage_of[i], len(self.blocks) - 1 - i
            while stage > s:  # up to this block's stage (past stages without groups)
                stage -= 1
                h = self.up[stage](h)
            z, q, p, h = block(h, None if ds is None else ds[s], Draw(modes[lvl]), temps[lvl])
            steps.append((z, q, p))
        while stage > 0:  # the likelihood reads stage 1's state
            stage -= 1
            h = self.up[stage](h)
        return steps[::-1], h

    @staticmethod
    def _split(t: Tensor, n_samples: int) -> Tensor:
        """[S B, ...] -> [S, B, ...]."""
        return t.view(n_samples, -1, *t.shape[1:])

    def infer(self, x: Tensor, n_samples: int = 1) -> StateTrace:
        """Bottom-up pass, then z_T ~ q(z_T | x), z_t ~ q(z_t | z_{>t}, x) top-down, each scored under p(z_t | z_{>t})
        computed alongside (closed-form KL valid at every level). z_t: [S, B, D_t, r_t, r_t]; state [S, B, ...]."""
        T, S = self.n_levels, n_samples
        steps, h = self._descend(self.bottom_up(x), [Draw.SAMPLE] * T, [1.0] * T, S, len(x))
        levels = []
        for z, q, p in steps:
            e = q.event_ndim  # 3 for a map, 1 for the vector top
            q = DiagonalGaussian(self._split(q.mean, S), self._split(q.log_var, S), e)
            p = (DiagonalGaussian.standard(q.mean, e) if p.is_standard else
                 DiagonalGaussian(self._split(p.mean, S), self._split(p.log_var, S), e))
            levels.append(Level(self._split(z, S), q, p, analytic_kl=True))
        return StateTrace(tuple(levels), self._split(h, S))

    def decode(self, state: Tensor):
        """p(x | z_1:T) from the final top-down state [*lead, channels[1], H/2, W/2]: a likelihood with parameters
        [*lead, k C, H, W]."""
        lead = state.shape[:-3]
        params = self.out(state.reshape(-1, *state.shape[-3:]))
        return make_likelihood(self.likelihood, params.view(*lead, *params.shape[1:]), len(self.data_shape))

    def encode(self, x: Tensor) -> Tensor:
        """The final state with every level at its posterior mean given the means above: [B, channels[1], H/2, W/2]."""
        T = self.n_levels
        return self._descend(self.bottom_up(x), [Draw.MEAN] * T, [1.0] * T, 1, len(x))[1]

    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean of p(x | posterior means): [B, *data]."""
        return self.decode(self.encode(x)).mean

    def sample(self, n: int, temperature: float | Sequence[float] = 1.0) -> Tensor:
        """z_T ~ N(0, t_T^2 I), z_t ~ p(z_t | z_{>t}) with std scaled by t_t (0: the mean); the mean of the
        likelihood: [n, *data]. `temperature`: one float, or T floats (level 1 first)."""
        T = self.n_levels
        return self.decode(self._descend(None, [Draw.PRIOR] * T, per_level(temperature, T), 1, n)[1]).mean

    def resample_lower(self, x: Tensor, keep: int, temperature: float | Sequence[float] = 1.0,
                       use_mean: bool = True) -> Tensor:
        """Encode x, keep the top `keep` levels from the top-down posterior (means, or samples if not use_mean),
        redraw the levels below from p(z_t | z_{>t}); the mean of the likelihood: [B, *data]. keep = T is a
        reconstruction, keep = 0 a sample."""
        T = self.n_levels
        if not 0 <= keep <= T:
            raise ValueError(f"keep must be in 0..{T}; got {keep}")
        modes = [Draw.PRIOR] * (T - keep) + [Draw.MEAN if use_mean else Draw.SAMPLE] * keep  # level 1 first
        ds = self.bottom_up(x) if keep > 0 else None
        return self.decode(self._descend(ds, modes, per_level(temperature, T), 1, len(x))[1]).mean
