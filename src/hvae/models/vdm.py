"""The variational diffusion model (VDM, Kingma et al. 2021) as a hierarchical VAE: the Markovian HVAE of the
write-up (eq. 6-8) whose latents z_t, t in [0, 1], have the data's shape and whose encoder is fixed,

    q(z_t | x) = N(alpha_t c, sigma_t^2 I),  alpha_t^2 = sigmoid(-gamma_t),  sigma_t^2 = sigmoid(gamma_t),
with c in [-1, 1] the centre of x's bin (likelihoods.bin_centres) and gamma(t) = -log SNR(t) an increasing
schedule. The generative steps are the forward posterior at the denoiser's guess, p(z_s|z_t) = q(z_s|z_t, x_hat(z_t)):

    q(z_s | z_t, x) = N(alpha_s/alpha_t (1 - k) z_t + alpha_s k x, sigma_s^2 k I),  k = 1 - SNR_t/SNR_s,
so KL(q || p) = 1/2 (SNR_s - SNR_t) ||c - x_hat(z_t)||^2, the per-step term of the discrete-time loss; the
likelihood p(x | z_0) is likelihoods.BinnedGaussian at gamma(0). The bound itself lives in diffusion.py.

The x-prediction. The reference predicts eps_hat = z_t + net(z_t) and sets x_hat = (z_t - sigma_t eps_hat)/alpha_t.
On discrete data this stalls: at high SNR the target eps = (z_t - alpha_t c)/sigma_t is the rounding residue of z_t
scaled by 1/sigma_t (about 770 at gamma = -13.3), an output an MLP cannot give. Measured in this project: 5,192
nats after 1 epoch and 2,998 after 10, against 472 and 246.8 with the parameterization here: x_hat is the
posterior mean over the V bins,

    x_hat = sum_k softmax_k(l) c_k,  l_k = -SNR_t/2 (z_t/alpha_t - c_k)^2 + a c_k - lambda/2 c_k^2,
where the first term equals base_k = (alpha_t z_t c_k - alpha_t^2 c_k^2 / 2)/sigma_t^2 up to a constant in k and
(a, b) are the network's two zero-initialized outputs per data value: a c_k - lambda/2 c_k^2 is a Gaussian prior
over the bins that the context supplies, multiplied into the likelihood of z_t. For V = 2 only a counts (c_k^2 is
the same for both bins); for V > 2, lambda = min(1, SNR_t) expm1(b), so the logits stay a Gaussian over the bins
with precision SNR_t + lambda > 0. At a = b = 0 it is the exact E[c | z_t] for independent, uniform values, right
at the high-SNR end from the first step; the net learns only the correction, whose pull on x_hat falls as
1/SNR_t there (why the prior's precision is added, not multiplied: docs/diffusion.md, "Why x, not eps").
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..distributions import DiagonalGaussian
from ..bins import grid_gaussian_mean
from ..errors import ConfigError
from ..likelihoods import BinnedGaussian, bin_centres, bin_index
from ..numerics import vp_alpha_sigma
from ..nets import ACTIVATIONS, UNet, fourier_features, mlp, sinusoidal_embedding
from ..protocol import Level, Trace
from ..schema import option

VOCAB = {"bernoulli": 2, "categorical": 256}  # likelihood -> V: binarized {0, 1}, or 8-bit k/255
SCHEDULES = ("fixed", "learned", "network")
DENOISERS = ("mlp", "unet")
SAMPLE_STEPS = 256  # sampling steps of a continuous-time model unless told
MAX_LEVELS_T = 16  # evaluate lists the T + 1 levels (IW bound, KL per level) only up to this T
N_FOURIER = 2  # fourier_features' default frequencies 2^6, 2^7
PRECISION_LOG_FLOOR = 5.0  # V > 2: the context may lower the bin posterior's precision to SNR e^-5, no lower


def float32(device: torch.device) -> torch.autocast:
    """A context that turns autocast off: the schedule, alpha/sigma and the bin softmax stay in float32."""
    return torch.autocast(device_type=device.type, enabled=False)


def step_posterior(z_t: Tensor, x: Tensor, gamma_s: Tensor, gamma_t: Tensor, event_ndim: int) -> DiagonalGaussian:
    """q(z_s | z_t, x), s < t (module docstring), over z_t's shape; x broadcasts to it, gamma_s, gamma_t are scalars.

    Why logs: alpha_s/alpha_t (1 - k) = exp(gamma_s - gamma_t + (softplus(gamma_t) - softplus(gamma_s))/2) and
    log sigma_s^2 k = -softplus(-gamma_s) + log(-expm1(gamma_s - gamma_t)) stay exact at SNRs far from 1."""
    k = -torch.expm1(gamma_s - gamma_t)
    coef_z = torch.exp(gamma_s - gamma_t + 0.5 * (F.softplus(gamma_t) - F.softplus(gamma_s)))
    mean = coef_z * z_t + torch.exp(-0.5 * F.softplus(gamma_s)) * k * x
    log_var = torch.log(k) - F.softplus(-gamma_s)
    return DiagonalGaussian(mean, log_var.expand_as(mean), event_ndim)


# Schedules gamma(t): t [B] in [0, 1] -> [B], increasing, float32; endpoints() -> (gamma(0), gamma(1)).


class FixedLinear(nn.Module):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t; no parameters."""

    def __init__(self, gamma_min: float, gamma_max: float):
        super().__init__()
        self.g0, self.g1 = gamma_min, gamma_max

    def forward(self, t: Tensor) -> Tensor:
        with float32(t.device):
            return self.g0 + (self.g1 - self.g0) * t.float()

    def endpoints(self) -> tuple[float, float]:
        return self.g0, self.g1


class LearnedLinear(nn.Module):
    """gamma(t) = b + |w| t, b = gamma_min and w = gamma_max - gamma_min at the start (the reference's default)."""

    def __init__(self, gamma_min: float, gamma_max: float):
        super().__init__()
        self.b = nn.Parameter(torch.tensor(float(gamma_min)))
        self.w = nn.Parameter(torch.tensor(float(gamma_max - gamma_min)))

    def forward(self, t: Tensor) -> Tensor:
        with float32(t.device):
            return self.b + self.w.abs() * t.float()

    def endpoints(self) -> tuple[Tensor, Tensor]:
        return self.b, self.b + self.w.abs()


class MonotoneNet(nn.Module):
    """gamma(t) = g0 + (g1 - g0) (f(t) - f(0)) / (f(1) - f(0)), g0 and g1 = g0 + softplus(d) learned, with the
    reference's monotone net f(t) = |w1| t + mean_j |w3_j| (2 sigmoid(|w2_j| (2t - 1) + b2_j) - 1), which starts
    close to linear (|w1| = gamma_max - gamma_min against a nonlinear part of order 1).

    Why normalized: the continuous-time bound depends on the schedule only through its endpoints (VDM: between them
    its shape sets only the estimator's variance). Unnormalized, every weight of f moves gamma(0) and gamma(1), so
    the updates that reshape the curve also move the endpoints, and they drift. Here the endpoints are two
    parameters of their own, exactly gamma(0) and gamma(1), which only the reconstruction, prior and discrete-time
    terms move."""

    def __init__(self, gamma_min: float, gamma_max: float, features: int = 1024):
        super().__init__()
        self.g0 = nn.Parameter(torch.tensor(float(gamma_min)))
        span = float(gamma_max - gamma_min)
        self.d = nn.Parameter(torch.tensor(span + math.log(-math.expm1(-span))))  # softplus(d) = span
        self.w1 = nn.Parameter(torch.tensor(span))
        self.w2, self.b2, self.w3 = (nn.Parameter(torch.randn(features)), nn.Parameter(torch.zeros(features)),
                                     nn.Parameter(torch.randn(features)))

    def f(self, t: Tensor) -> Tensor:
        """The unnormalized monotone net: t [N] -> [N]."""
        h = 2 * torch.sigmoid(self.w2.abs() * (2 * t[:, None] - 1) + self.b2) - 1  # [N, F], increasing in t
        return self.w1.abs() * t + (h * self.w3.abs()).mean(-1)

    def forward(self, t: Tensor) -> Tensor:
        with float32(t.device):
            t = t.float()
            f = self.f(torch.cat([t, t.new_tensor([0.0, 1.0])]))  # [B + 2]: f(t), f(0), f(1)
            # Why g0 + softplus(d) * ratio and not g0 + (g1 - g0) * ratio: at t = 0 and 1 the ratio is exactly 0 and
            # 1, so gamma(0) and gamma(1) are bit for bit the endpoints() (g1 - g0 would round).
            return self.g0 + F.softplus(self.d) * ((f[:-2] - f[-2]) / (f[-1] - f[-2]))

    def endpoints(self) -> tuple[Tensor, Tensor]:
        return self.g0, self.g0 + F.softplus(self.d)


def make_schedule(kind: str, gamma_min: float, gamma_max: float) -> nn.Module:
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    return {"fixed": FixedLinear, "learned": LearnedLinear, "network": MonotoneNet}[kind](gamma_min, gamma_max)


# Denoisers: (z_t [B, *data], g [B], the normalized gamma) -> [B, 2 C, *rest], the (a, b) of each data value.


class MLPDenoiser(nn.Module):
    """Flattened z_t (+ its Fourier features) and the sinusoidal embedding of g -> `hidden` layers -> a zero-
    initialized linear layer with 2 outputs per data value. data_shape [C, H, W] or [D]."""

    def __init__(self, data_shape: Sequence[int], hidden: Sequence[int], embedding: int, fourier: bool, act: str):
        super().__init__()
        self.data_shape, self.embedding, self.fourier = tuple(data_shape), embedding, fourier
        n = math.prod(data_shape)
        n_in = n * (1 + 2 * N_FOURIER * fourier) + embedding
        self.trunk = mlp([n_in, *hidden], act, final_act=True)
        self.out = nn.Linear(hidden[-1] if hidden else n_in, 2 * n)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: Tensor, g: Tensor) -> Tensor:
        h = z.flatten(1)  # [B, D]
        h = torch.cat([h, fourier_features(h)], 1) if self.fourier else h
        h = torch.cat([h, sinusoidal_embedding(g, self.embedding).to(h.dtype)], 1)
        return self.out(self.trunk(h)).view(len(z), 2 * self.data_shape[0], *self.data_shape[1:])


class UNetDenoiser(nn.Module):
    """z_t (+ its Fourier features as channels) -> nets.UNet conditioned on the sinusoidal embedding of g ->
    2 channels per data channel (zero at the start). data_shape [C, H, W]."""

    def __init__(self, data_shape: Sequence[int], channels: Sequence[int], embedding: int, fourier: bool, act: str):
        super().__init__()
        if len(data_shape) != 3:
            raise ConfigError(f"model.denoiser unet needs images [C, H, W]; got data shape {list(data_shape)}")
        c, h, w = data_shape
        down = 2 ** (len(channels) - 1)
        if h % down or w % down:
            raise ConfigError(f"model.denoiser unet needs H and W divisible by {down} (2^(len(model.channels) - 1)); "
                              f"got {h}x{w}: use fewer model.channels")
        self.embedding, self.fourier = embedding, fourier
        self.unet = UNet(c * (1 + 2 * N_FOURIER * fourier), 2 * c, channels, embedding, act)

    def forward(self, z: Tensor, g: Tensor) -> Tensor:
        h = torch.cat([z, fourier_features(z)], 1) if self.fourier else z
        return self.unet(h, sinusoidal_embedding(g, self.embedding).to(h.dtype))


def bin_posterior_mean(z_t: Tensor, gamma_t: Tensor, a: Tensor, b: Tensor, centres: Tensor) -> Tensor:
    """x_hat = sum_k softmax_k(l) c_k (module docstring): z_t, a, b [B, *data], gamma_t broadcasting to them,
    centres [V] -> [B, *data]; float32 (call under float32()).

    V = 2: l_k = -SNR/2 (z_t/alpha_t - c_k)^2 + a c_k, a softmax over the two bins. V > 2: l_k = -P/2 (c_k - m)^2
    with P = SNR + lambda, lambda = min(1, SNR) expm1(b) (> -SNR, so P > 0) and m = (SNR z_t/alpha_t + a) / P,
    the likelihood of z_t times the Gaussian prior exp(a c - lambda/2 c^2); its mean by bins.grid_gaussian_mean,
    which touches only the bins that matter ([B, *data, V] tensors made a V = 256 step 9.1 times slower:
    BENCHMARKS.md 9d). At high SNR a and b move m by ~(a - lambda z_t/alpha_t)/SNR, a small fraction of a bin:
    the earlier P = SNR e^b moved it by ~b z_t/alpha_t, a bin for |b| ~ 0.01, which cost thousands of nats per
    image at gamma(0) and diverged training on 8-bit data (BENCHMARKS.md 9b)."""
    u = z_t * torch.exp(0.5 * F.softplus(gamma_t))  # z_t / alpha_t: [B, *data]
    snr = torch.exp(-gamma_t)
    if len(centres) == 2:
        logits = -0.5 * snr.unsqueeze(-1) * (u.unsqueeze(-1) - centres) ** 2 + a.unsqueeze(-1) * centres
        return torch.softmax(logits, dim=-1) @ centres  # [B, *data, 2] @ [2]
    # Why clamp b: expm1(b) stays finite in float32, and P >= SNR e^-5 (and >= e^-5 at SNR = 1, where SNR - 1
    # cancels): an 8-bit run drove b to -30 near t = 1 within 20 steps, P to 1e-15 and m to 1e16, where the mean's
    # closed form is a difference of equal numbers (|m| / std ~ 1e8 against a gap 2 / std) and returned NaN.
    lam = snr.clamp(max=1) * torch.expm1(b.clamp(-PRECISION_LOG_FLOOR, 30))
    precision = torch.maximum(snr + lam, snr * math.exp(-PRECISION_LOG_FLOOR))
    return grid_gaussian_mean((snr * u + a) / precision, precision, len(centres))


class VDM(nn.Module):
    """A VDM over data of shape [C, H, W] (or [D]) with V = 2 or 256 values per datum; a protocol.DiffusionModel,
    and with T > 0 timesteps also a protocol.LatentVariableModel with T + 1 explicit levels (`infer`)."""

    def __init__(self, data_shape: Sequence[int] = (1, 28, 28), likelihood: str = "bernoulli",
                 schedule: str = "learned", gamma_min: float = -13.3, gamma_max: float = 5.0, timesteps: int = 0,
                 denoiser: str = "mlp", hidden: Sequence[int] = (1024, 1024, 1024), channels: Sequence[int] = (32, 64),
                 embedding: int = 128, fourier: bool = False, activation: str = "silu",
                 correction_bound: float = 0.0):
        super().__init__()
        self.correction_bound = float(correction_bound)
        if likelihood not in VOCAB:
            raise ValueError(f"unknown likelihood {likelihood!r} for a VDM; choose one of {', '.join(VOCAB)}")
        if denoiser not in DENOISERS:
            raise ValueError(f"unknown denoiser {denoiser!r}; choose one of {', '.join(DENOISERS)}")
        self.data_shape, self.likelihood, self.timesteps = tuple(data_shape), likelihood, int(timesteps)
        self.vocab_size = VOCAB[likelihood]
        self.schedule = make_schedule(schedule, gamma_min, gamma_max)
        self.denoiser = (MLPDenoiser(data_shape, hidden, embedding, fourier, activation) if denoiser == "mlp" else
                         UNetDenoiser(data_shape, channels, embedding, fourier, activation))

    @property
    def eval_capabilities(self) -> frozenset[str]:
        """What evaluate measures (its STOCHASTIC_BOUND, EXPLICIT_LEVELS): the stochastic bound always; the explicit
        levels (IW bound, KL per level) for 0 < T <= MAX_LEVELS_T only, where T + 1 levels stay affordable."""
        levels = {"explicit_levels"} if 0 < self.timesteps <= MAX_LEVELS_T else set()
        return frozenset({"stochastic_bound", *levels})

    @property
    def _device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def gamma(self, t: Tensor) -> Tensor:
        """gamma(t) = -log SNR(t): t [B] in [0, 1] -> [B], float32, increasing."""
        return self.schedule(t)

    def _gamma_at(self, t: float) -> Tensor:
        return self.gamma(torch.full((1,), float(t), device=self._device))[0]  # [] float32

    def to_centres(self, x: Tensor) -> Tensor:
        """x in the input space [B, *data] -> its bins' centres c [B, *data] in [-1, 1], float32."""
        return bin_centres(self.vocab_size, dtype=torch.float32, device=x.device)[bin_index(x, self.vocab_size)]

    def predict_x(self, z_t: Tensor, gamma_t: Tensor) -> Tensor:
        """x_hat = E[c | z_t] under the corrected bin posterior (module docstring): z_t [B, *data], gamma_t [B] ->
        [B, *data] in [-1, 1] (bin-centre units), float32. The net sees gamma_t normalized by the schedule's current
        endpoints, g = (gamma_t - gamma(0)) / (gamma(1) - gamma(0))."""
        g0, g1 = self.schedule.endpoints()
        ab = self.denoiser(z_t, (gamma_t - g0) / (g1 - g0))  # [B, 2 C, *rest]
        with float32(z_t.device):
            a, b = ab.float().chunk(2, dim=1)  # [B, *data] each
            if self.correction_bound > 0:  # a in (-A, A): it can never outweigh a sure base (VDMConfig)
                a = self.correction_bound * torch.tanh(a / self.correction_bound)
            gamma = gamma_t.float().view(-1, *[1] * len(self.data_shape))
            centres = bin_centres(self.vocab_size, dtype=torch.float32, device=z_t.device)
            return bin_posterior_mean(z_t.float(), gamma, a, b, centres)

    def decode(self, z0: Tensor) -> BinnedGaussian:
        """p(x | z_0) = likelihoods.BinnedGaussian at gamma(0): z0 [*lead, *data] -> log_prob(x) [*lead]."""
        return BinnedGaussian(z0, self._gamma_at(0.0), self.vocab_size, len(self.data_shape))

    def encode(self, x: Tensor, t: float = 0.5) -> Tensor:
        """A draw z_t ~ q(z_t | x) = N(alpha_t c, sigma_t^2 I): x [B, *data] -> [B, *data], float32."""
        with float32(x.device):
            alpha, sigma = vp_alpha_sigma(self._gamma_at(t))
            c = self.to_centres(x)
            return alpha * c + sigma * torch.randn_like(c)

    def infer(self, x: Tensor, n_samples: int = 1) -> Trace:
        """The T + 1 levels of the discrete-time model, level 1 = z_0 (t = 0) ... level T + 1 = z_1 (t = 1), each
        z [S, B, *data]: z_1 ~ q(z_1 | x) scored under N(0, I); then for t_i = i/T, i = T..1, z_{t_{i-1}} ~
        q(. | z_{t_i}, x) scored under p(. | z_{t_i}) = q(. | z_{t_i}, x_hat(z_{t_i})). Both condition on the z_{t_i}
        drawn before, so the closed-form KL is valid at every level; objectives.elbo is then the discrete-T VLB."""
        if self.timesteps == 0:
            raise ValueError("VDM.infer lists explicit levels, which need a discrete T: set model.timesteps > 0 "
                             "(or use the stochastic bound, diffusion.vdm_bound, in continuous time)")
        T, nd = self.timesteps, len(self.data_shape)
        gammas = self.gamma(torch.arange(T + 1, device=x.device) / T)  # [T + 1]
        c = self.to_centres(x)  # [B, *data]
        with float32(x.device):
            q = DiagonalGaussian(vp_alpha_sigma(gammas[-1])[0] * c, (-F.softplus(-gammas[-1])).expand_as(c), nd)
            z = q.rsample(n_samples)  # [S, B, *data]
        levels = [Level(z, q, DiagonalGaussian.standard(q.mean, nd))]
        for i in range(T, 0, -1):
            x_hat = self.predict_x(z.flatten(0, 1), gammas[i].expand(z.shape[0] * z.shape[1])).view_as(z)
            with float32(x.device):
                q, p = (step_posterior(z, target, gammas[i - 1], gammas[i], nd) for target in (c, x_hat))
                z = q.rsample()
            levels.append(Level(z, q, p))
        return Trace(tuple(reversed(levels)))

    def _denoise(self, z: Tensor, t: float, steps: int, temperature: float = 1.0, progress: bool = False,
                 keep: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        """Ancestral sampling from z_t [B, *data] down to z_0 in `steps` equal steps, z_s ~ p(z_s | z_t) with its
        std scaled by `temperature`. -> (z_0, the x_hat of the steps listed in keep, each [B, *data])."""
        times = torch.arange(steps, -1, -1, device=z.device) / max(steps, 1) * t  # t .. 0: [steps + 1]
        gammas, kept = self.gamma(times), []
        for i in tqdm(range(steps), desc="sampling", file=sys.stderr, disable=not progress, leave=False):
            x_hat = self.predict_x(z, gammas[i].expand(len(z)))
            kept += [x_hat] * list(keep).count(i)
            with float32(z.device):
                z = step_posterior(z, x_hat, gammas[i + 1], gammas[i], len(self.data_shape)).rsample(
                    temperature=temperature)
        return z, kept

    def _steps(self, steps: int | None, t: float = 1.0) -> int:
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1; got {steps}")
        return steps or max(1, round(t * (self.timesteps or SAMPLE_STEPS)))

    def _to_input(self, c: Tensor) -> Tensor:
        """Bin-centre units -> the input space: c_k -> k / (V - 1), linear (so means map to means)."""
        return ((c + 1) * self.vocab_size - 1) / (2 * (self.vocab_size - 1))

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, steps: int | None = None, progress: bool = False) -> Tensor:
        """z_1 ~ N(0, temperature^2 I), `steps` ancestral steps (default T, or SAMPLE_STEPS in continuous time) with
        their std scaled by temperature (0: deterministic), then the mean of p(x | z_0): [n, *data] in the input
        space."""
        z = temperature * torch.randn(n, *self.data_shape, device=self._device)
        return self.decode(self._denoise(z, 1.0, self._steps(steps), temperature, progress)[0]).mean

    @torch.no_grad()
    def denoising_chain(self, n: int, steps: int | None = None, frames: int = 8, temperature: float = 1.0) -> Tensor:
        """One sampling chain's x_hat (input space) at `frames` evenly spaced steps, first to last (a step repeats
        when frames > steps): [n, frames, *data]."""
        if frames < 1:
            raise ValueError(f"frames must be >= 1; got {frames}")
        steps = self._steps(steps)
        keep = [round(i * (steps - 1) / max(frames - 1, 1)) for i in range(frames)]
        z = temperature * torch.randn(n, *self.data_shape, device=self._device)
        return self._to_input(torch.stack(self._denoise(z, 1.0, steps, temperature, keep=keep)[1], dim=1))

    @torch.no_grad()
    def reconstruct(self, x: Tensor, t: float = 0.5, steps: int | None = None) -> Tensor:
        """z_t ~ q(z_t | x), then ancestral sampling from t to 0 (default steps: t T, or t SAMPLE_STEPS, at least
        1); the mean of p(x | z_0): [B, *data] in the input space. t = 0 decodes z_0 ~ q(z_0 | x)."""
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must be in [0, 1]; got {t}")
        z = self.encode(x, t)
        if t > 0:
            z = self._denoise(z, t, self._steps(steps, t))[0]
        return self.decode(z).mean


@dataclass
class VDMConfig:
    """`model.name: vdm`: the variational diffusion model.

    correction_bound: at low t the base posterior is sure (log-odds ~SNR/2, up to 3e5 for V = 2), the loss is flat
    in a there, and a is free to drift; once |a| passes the base, a pixel flips and one draw costs up to
    1/2 gamma' SNR per pixel (draws of 2e6 nats were seen, BENCHMARKS.md 9a). The context's own log-odds of a
    stochastically binarized pixel are within +-ln 255 = 5.5 (or infinite for pixels always 0), so a bound of
    a few tens costs nothing where a is right and rules the flips out for SNR above ~2A."""

    name: ClassVar[str] = "vdm"
    default_objective: ClassVar[str] = "vdm"  # chosen with the model unless objective.name is given
    likelihood: str = option("bernoulli", choices=tuple(VOCAB),
                             help="bernoulli: binarized data (V = 2) | categorical: 8-bit data (V = 256)")
    schedule: str = option("learned", choices=SCHEDULES, help="gamma(t): fixed linear | learned endpoints | network")
    gamma_min: float = option(-13.3, ge=-30.0, le=30.0, help="gamma(0) (at the start, for learned schedules)")
    gamma_max: float = option(5.0, ge=-30.0, le=30.0, help="gamma(1) (at the start, for learned schedules)")
    timesteps: int = option(0, ge=0, help="T of a discrete-time model; 0: continuous time")
    denoiser: str = option("mlp", choices=DENOISERS)
    hidden: list[int] = option([1024, 1024, 1024], each_ge=1, help="mlp denoiser: hidden widths")
    channels: list[int] = option([32, 64], each_ge=1, min_len=1, help="unet denoiser: channels per resolution")
    embedding: int = option(128, ge=2, help="size of the sinusoidal embedding of the normalized gamma")
    fourier: bool = option(False, help="Fourier features of z_t (for 8-bit data)")
    activation: str = option("silu", choices=tuple(ACTIVATIONS))
    correction_bound: float = option(0.0, ge=0, help="bound the net's correction a of the bin posterior to (-A, A), "
                                     "A tanh(a/A) (0: unbounded)")

    def check(self) -> None:
        if not self.gamma_min < self.gamma_max:
            raise ConfigError(f"model.gamma_min must be < model.gamma_max; got {self.gamma_min} and {self.gamma_max}")

    def check_objective(self, objective: str) -> None:
        """The ELBO and IWAE objectives run over explicit levels: only a discrete-time model has them."""
        if objective != "vdm" and self.timesteps == 0:
            raise ConfigError(f"objective {objective!r} needs explicit levels: set model.timesteps to a (small) T, "
                              "or use objective vdm")

    def build(self, data_shape: Sequence[int]) -> VDM:
        return VDM(data_shape, self.likelihood, self.schedule, self.gamma_min, self.gamma_max, self.timesteps,
                   self.denoiser, self.hidden, self.channels, self.embedding, self.fourier, self.activation,
                   self.correction_bound)
