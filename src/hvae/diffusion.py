"""The variational diffusion model's bound (Kingma et al. 2021), read as the Markovian HVAE of eq. 6-8.

The latents z_t, t in [0, 1], have the data's shape, and the encoder is fixed: q(z_t | x) = N(alpha_t c, sigma_t^2 I),
c the bin centres of x, alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t), gamma = -log SNR increasing in
t. Eq. 6-7 with z_0 as the level nearest x (the write-up's z_1) and z_1 as the top (its z_T); eq. 8 then splits
into three terms, per example, in nats:

1. reconstruction  log p(x | z_0), z_0 ~ q(z_0 | x): the exact discrete likelihood (likelihoods.BinnedGaussian);
   one draw of eps_0.
2. prior_kl        KL(q(z_1 | x) || N(0, I)) = 1/2 sum_i [alpha_1^2 c_i^2 + sigma_1^2 - log sigma_1^2 - 1], closed
   form; not zero, since SNR(1) > 0.
3. diffusion       sum_{i=1..T} E_q KL(q(z_s | z_t, x) || p(z_s | z_t)), s = t - 1/T, p(z_s | z_t) = q(z_s | z_t,
   x = x_hat(z_t)): the eq. 8 rates of the levels between, each a closed-form Gaussian KL
   1/2 (SNR(s) - SNR(t)) ||c - x_hat||^2. One draw of (t, eps) per example: for T steps
   L_T = 1/2 T expm1(gamma_t - gamma_s) ||eps - eps_hat||^2, t uniform on {1/T, ..., 1}; as T -> infinity
   L_inf = 1/2 gamma'(t) ||eps - eps_hat||^2, t ~ U[0, 1). Unbiased for the sum; stratified (antithetic) t.

kl = prior_kl + diffusion and elbo = reconstruction - kl, as for the other models. The schedule and the three terms are
computed in float32 (float64 kept) with autocast off; only the denoiser runs under the caller's autocast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .numerics import vp_alpha_sigma
from .protocol import BoundTerms, DiffusionModel, ElboTerms
from .schema import option


def _f32(t: Tensor) -> Tensor:
    """t in float32, or float64 if it is: the bound is never computed in 16 bits."""
    return t if t.dtype == torch.float64 else t.float()


def _normal_like(c: Tensor, generator: torch.Generator | None, given: Tensor | None) -> Tensor:
    """`given` in c's dtype and device, else a fresh N(0, I) draw shaped like c (on the generator's device, then
    moved: a CPU generator may serve data on an accelerator)."""
    if given is not None:
        return given.to(c)
    device = generator.device if generator is not None else c.device
    return torch.randn(c.shape, generator=generator, dtype=c.dtype, device=device).to(c.device)


def _per_example(v: Tensor, like: Tensor) -> Tensor:
    """[B] (or [1], []) -> [B, 1, ..., 1], broadcastable against like [B, *data]."""
    return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() else v


def antithetic_times(n: int, timesteps: int = 0, generator: torch.Generator | None = None, device=None,
                     offset: int = 0, total: int | None = None) -> Tensor:
    """t_i = (u0 + (offset + i) / total) mod 1, i = 0..n-1, one u0 ~ U[0, 1): stratified times. -> [n],
    default dtype.

    Each of the `total` strata of width 1/total holds one t; a DDP rank r of W with local batch n passes
    offset = r n, total = W n and the same generator state on every rank, and gets its share of the one global
    stratification exactly. Continuous time (timesteps = 0): t in [0, 1) as in the reference; t = 0 is kept (it has
    probability 2^-24 and the loss is finite there). T steps: t = ceil(t T) / T in {1/T, ..., 1}, the bin index
    clamped to [1, T] so that t is never 0 (s = t - 1/T would leave [0, 1]) nor above 1 after rounding.
    """
    total = n if total is None else total
    u0 = torch.rand((), generator=generator, device=generator.device if generator is not None else device)
    t = torch.remainder(u0.to(device) + (offset + torch.arange(n, device=device)) / total, 1.0)
    if timesteps > 0:
        t = torch.ceil(t * timesteps).clamp(1, timesteps) / timesteps
    return t


def gamma_and_slope(gamma_fn: Callable[[Tensor], Tensor], t: Tensor) -> tuple[Tensor, Tensor]:
    """(gamma(t), dgamma/dt) for t [B] -> ([B], [B]); the slope by autograd (gamma_fn must act elementwise in t).

    With gradients on, the slope keeps its graph (create_graph), so a learned schedule is trained through it. Under
    torch.no_grad() or torch.inference_mode() (evaluation) both come back detached, with the same values: the
    derivative is taken on a fresh, non-inference copy of t with inference mode off and gradients on.
    """
    keep_graph = torch.is_grad_enabled()  # False under no_grad and under inference_mode
    with torch.inference_mode(False), torch.enable_grad():
        t_leaf = t.detach().clone().requires_grad_(True)  # why clone: an inference tensor cannot join a graph
        gamma_t = gamma_fn(t_leaf)
        (slope,) = torch.autograd.grad(gamma_t.sum(), t_leaf, create_graph=keep_graph, allow_unused=True)
        slope = torch.zeros_like(gamma_t) if slope is None else slope  # a constant schedule
    if keep_graph:
        return gamma_t, slope
    return gamma_t.detach(), slope.detach()


def prior_kl(c: Tensor, gamma_1: Tensor) -> Tensor:
    """KL(N(alpha_1 c, sigma_1^2 I) || N(0, I)) = 1/2 sum_i [alpha_1^2 c_i^2 + sigma_1^2 - log sigma_1^2 - 1], closed
    form. c [B, *data] (bin centres), gamma_1 [] or [B] (or [1]) -> [B], nats."""
    a = _f32(torch.sigmoid(-gamma_1)).reshape(-1)  # alpha_1^2, [B] or [1]
    sq = _f32(c).square().flatten(1).sum(1)  # [B]
    # Why softplus: sigma_1^2 - 1 - log sigma_1^2 = softplus(-gamma_1) - alpha_1^2 exactly; no log of a rounded
    # sigmoid, which underflows to log 0 for a very negative gamma_1.
    per_dim = F.softplus(-_f32(gamma_1)).reshape(-1) - a
    return 0.5 * (a * sq + c[0].numel() * per_dim)


def noise_sq_err(c: Tensor, x_hat: Tensor, gamma_t: Tensor) -> Tensor:
    """||eps - eps_hat||^2 = SNR(t) ||c - x_hat||^2 = exp(-gamma_t) ||c - x_hat||^2 per example. c, x_hat [B, *data],
    gamma_t [B] -> [B].

    Exact for eps_hat = (z_t - alpha_t x_hat) / sigma_t, since eps - eps_hat = (alpha_t / sigma_t) (x_hat - c).
    """
    # Why not form eps_hat: at high SNR z_t - alpha_t x_hat cancels and 1/sigma_t magnifies the rounding.
    return torch.exp(-gamma_t) * (c - x_hat).square().flatten(1).sum(1)


def diffusion_loss_continuous(sq_err: Tensor, slope: Tensor) -> Tensor:
    """L_inf = 1/2 gamma'(t) ||eps - eps_hat||^2, the T -> infinity limit, one t per example. [B], [B] -> [B], nats."""
    return 0.5 * slope * sq_err


def diffusion_loss_discrete(sq_err: Tensor, gamma_t: Tensor, gamma_s: Tensor, timesteps: int) -> Tensor:
    """L_T = 1/2 T expm1(gamma_t - gamma_s) ||eps - eps_hat||^2, s = t - 1/T, one t per example: T times
    the step's KL(q(z_s | z_t, x) || p(z_s | z_t)). [B] each -> [B], nats."""
    return 0.5 * timesteps * torch.expm1(gamma_t - gamma_s) * sq_err


@dataclass(frozen=True)
class VdmTerms:
    """One draw of the VDM bound, per example, nats, each [B]: elbo = reconstruction - kl, kl = prior_kl + diffusion."""

    reconstruction: Tensor
    prior_kl: Tensor
    diffusion: Tensor
    kl: Tensor
    elbo: Tensor


def vdm_terms(model: DiffusionModel, x: Tensor, t: Tensor | None = None, eps: Tensor | None = None,
              generator: torch.Generator | None = None, eps0: Tensor | None = None) -> VdmTerms:
    """ELBO(x) = log p(x|z_0) - KL(q(z_1|x) || N(0, I)) - L_T(x), the three terms of eq. 8 (module docstring).

    One draw per example: eps0 (reconstruction), t (antithetic unless given) and eps (diffusion), all [B] / [B, *data]
    and from `generator` where not given. x [B, *data] in the input space -> VdmTerms of [B], nats.
    """
    with torch.autocast(x.device.type, enabled=False):
        c = _f32(model.to_centres(x))  # [B, *data]
        # 1. reconstruction: log p(x | z_0), z_0 = alpha_0 c + sigma_0 eps0
        ends = _f32(model.gamma(torch.tensor([0.0, 1.0], dtype=c.dtype, device=c.device)))  # [2]: gamma_0, gamma_1
        alpha_0, sigma_0 = vp_alpha_sigma(ends[0])
        reconstruction = model.decode(alpha_0 * c + sigma_0 * _normal_like(c, generator, eps0)).log_prob(x)
        # 2. prior matching: KL(q(z_1 | x) || N(0, I))
        kl_1 = prior_kl(c, ends[1])
        # 3. denoising matching at one t per example
        n, steps = c.shape[0], model.timesteps
        t = antithetic_times(n, steps, generator, c.device).to(c.dtype) if t is None else t.to(c)
        if steps == 0:
            gamma_t, slope = gamma_and_slope(lambda u: _f32(model.gamma(u)), t)
        else:
            gamma_t, gamma_s = _f32(model.gamma(t)), _f32(model.gamma(t - 1.0 / steps))
        alpha_t, sigma_t = vp_alpha_sigma(_per_example(gamma_t, c))
        z_t = alpha_t * c + sigma_t * _normal_like(c, generator, eps)
    x_hat = model.predict_x(z_t, gamma_t)  # the denoiser: under the caller's autocast
    with torch.autocast(x.device.type, enabled=False):
        sq_err = noise_sq_err(c, _f32(x_hat), gamma_t)
        diffusion = (diffusion_loss_continuous(sq_err, slope) if steps == 0
                     else diffusion_loss_discrete(sq_err, gamma_t, gamma_s, steps))
        kl = kl_1 + diffusion
        return VdmTerms(reconstruction, kl_1, diffusion, kl, reconstruction - kl)


@dataclass
class VdmObjective:
    """`objective.name: vdm`: the VDM bound reconstruction - (prior_kl + diffusion), `draws` (eps0, t, eps) per
    example, their times stratified per example (vdm_bound).

    The bound carries no KL weight (a weighted diffusion term would no longer be the ELBO): kl_weight is 1."""

    name: ClassVar[str] = "vdm"
    models: ClassVar[tuple[str, ...]] = ("vdm",)  # the models it trains (config.validate)
    draws: int = option(1, ge=1, help="draws of the bound per image per step, times stratified per image (a lower-"
                        "variance gradient at draws x the cost)")

    def kl_weight(self, step: int, steps_per_epoch: int) -> float:
        return 1.0

    def __call__(self, model: DiffusionModel, x: Tensor, kl_weight: Tensor | float = 1.0) -> tuple[Tensor, ElboTerms]:
        """(elbo [B], ElboTerms with kl_per_level = [prior_kl, diffusion] [2, B]); kl_weight is not used."""
        bound = vdm_bound(model, x, draws=self.draws)
        levels = torch.stack([bound.extra["prior_kl"], bound.extra["diffusion"]])
        return bound.elbo, ElboTerms(bound.reconstruction, bound.kl, bound.elbo, levels)


def vdm_bound(model: DiffusionModel, x: Tensor, generator: torch.Generator | None = None, draws: int = 1) -> BoundTerms:
    """An unbiased estimate of the VDM bound as BoundTerms (reconstruction, kl, elbo, extra prior_kl and diffusion),
    [B] each, nats: what an evaluation pass calls; works under torch.inference_mode().

    draws = m > 1 averages m draws per example whose times are stratified per example (t_ij, j = 1..m, one in each
    stratum of width 1/m: the batch is repeated m times and antithetic_times stratifies the n m rows in blocks of n),
    a variance reduction beyond m independent draws: the diffusion term's variance comes mostly from t."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1; got {draws}")
    n = x.shape[0]
    terms = vdm_terms(model, x.repeat(draws, *([1] * (x.dim() - 1))), generator=generator)
    mean = {name: getattr(terms, name).reshape(draws, n).mean(0)
            for name in ("reconstruction", "prior_kl", "diffusion", "kl", "elbo")}
    return BoundTerms(mean["reconstruction"], mean["kl"], mean["elbo"],
                      {"prior_kl": mean["prior_kl"], "diffusion": mean["diffusion"]})
