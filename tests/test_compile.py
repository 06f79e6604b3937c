"""runtime.compile=true: the compiled objective computes the same numbers as the eager one, and a compiled run trains,
checkpoints and resumes like an eager one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from hvae.config import Config, apply
from hvae.models import build_model
from hvae.models import VAEConfig
from hvae.objectives import ElboObjective
from hvae.loop import Objective, fit

pytestmark = [
    pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                       reason="torch.compile on a CPU needs a C++ compiler"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch's own internals, while compiling
]

TINY = {"model.hidden": [64, 32], "model.latent_dim": 4, "train.batch_size": 32, "runtime.threads": 1}


def test_compiled_objective_matches_eager_value_and_gradients():
    torch.manual_seed(0)
    model = build_model(VAEConfig(hidden=[64, 32], latent_dim=4), (1, 28, 28))
    objective = Objective(model, ElboObjective(n_samples=2))
    x = (torch.rand(8, 1, 28, 28) < 0.3).float()
    beta = torch.tensor(0.5)

    def value_and_grads(fn):
        torch.manual_seed(1)  # the same reparameterization noise for both
        model.zero_grad(set_to_none=True)
        obj, terms = fn(x, beta)
        obj.mean().backward()
        return obj.detach(), terms.kl.clone(), [p.grad.clone() for p in model.parameters()]

    eager = value_and_grads(objective)
    with torch._inductor.config.patch(fallback_random=True):  # draw the noise as eager does
        compiled = value_and_grads(torch.compile(objective))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-4)
    for g_c, g_e in zip(compiled[2], eager[2]):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)


def test_compiled_run_trains_checkpoints_and_resumes(idx_dir, tmp_path):
    base = {**TINY, "data.data_dir": str(idx_dir.parent), "train.epochs": 2}
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    fit(apply(Config(), base), eager, progress=False)
    fit(apply(Config(), {**base, "runtime.compile": True}), compiled, progress=False)
    # The checkpoint holds the plain model's weights (no wrapper prefixes), so every command can load it.
    w_eager = load_file(eager / "checkpoints" / "last" / "model.safetensors")
    w_compiled = load_file(compiled / "checkpoints" / "last" / "model.safetensors")
    assert w_compiled.keys() == w_eager.keys()
    epochs = [json.loads(line) for line in (compiled / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if "train_elbo" in r]
    assert len(epochs) == 2 and all(torch.isfinite(torch.tensor(r["train_elbo"])) for r in epochs)
    assert epochs[1]["train_elbo"] > epochs[0]["train_elbo"]  # it learns
    fit(apply(Config(), {**base, "runtime.compile": True, "train.epochs": 3}), compiled, resume=True, progress=False)
    resumed = [json.loads(line) for line in (compiled / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in resumed if "train_elbo" in r] == [1, 2, 3]
