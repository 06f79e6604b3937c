"""optim.make_optimizer: the optimizer a config names, with decoupled weight decay where asked."""

from __future__ import annotations

import torch

from hvae.config import OptimConfig
from hvae.optim import make_optimizer


def test_weight_decay_is_decoupled_for_adam_and_off_by_default():
    w = torch.nn.Parameter(torch.tensor([2.0, -4.0]))
    opt = make_optimizer(OptimConfig(lr=0.1, weight_decay=0.5), [w])
    assert isinstance(opt, torch.optim.AdamW)
    w.grad = torch.zeros(2)  # no gradient: the Adam step is 0, only the decay acts
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([2.0, -4.0]) * (1 - 0.1 * 0.5))
    plain = make_optimizer(OptimConfig(), [torch.nn.Parameter(torch.zeros(1))])
    assert type(plain) is torch.optim.Adam and plain.defaults["weight_decay"] == 0


def test_adamax_takes_weight_decay_as_an_l2_term():
    w = torch.nn.Parameter(torch.tensor([2.0]))
    opt = make_optimizer(OptimConfig(optimizer="adamax", lr=0.1, weight_decay=0.5), [w])
    w.grad = torch.zeros(1)  # the gradient becomes 0 + 0.5 w = 1: Adamax's first step is -lr sign(g)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([1.9]))
