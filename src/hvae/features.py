"""The feature network of the sample-quality metrics: a small LeNet-style classifier trained on a data set itself.

Why not Inception: its weights come from the internet (this project downloads nothing), and at 28 x 28 grey
images its ImageNet features are the wrong space. The practice at this scale is a Fréchet distance on the features
of a classifier of the data set, named as such: the figures are comparable between models scored with the same
network, never with Inception FID.

The network is trained once per (data files, image representation, seed, recipe version) and cached outside the
run directories: `HVAE_CACHE`, else `$XDG_CACHE_HOME/hvae`, else `~/.cache/hvae`, under
`features/<key>/lenet.safetensors` + `lenet.json` (its test accuracy, the weights' SHA-256). A damaged or
missing cache entry is rebuilt with a note on stderr. The same data and seed give the same network.

Images enter in [0, 1], shape [B, 1, 28, 28] (or any H, W >= 12: the network pools to a fixed 4 x 4 grid).
The features come out scaled by one constant of the network, so that their root-mean-square over the training images
is 1. Why: KID's kernel (a.b / D + 1)^3 expects features of Inception's scale (a.b / D well below 1); the raw
ReLU features here have a.b / D of 1.5 on average and up to 17, which gives the kernel heavy tails and KID a
standard error that cannot be trusted. The Fréchet distance scales with the square of that constant.
Two representations: "binary" (trained on training images binarized afresh each epoch, as the Bernoulli models
see them) and "grey" (pixel / 255).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn
from tqdm import tqdm

from .checkpoint import atomic_file, write_json
from .data import Dataset, binarize
from .errors import DataError
from .rundir import file_sha256
from .threads import fixed_threads

RECIPE_VERSION = 2  # bump when the network, its training or its feature scale changes: the cache key changes with it
FEATURE_DIM = 128
TRAIN_THREADS = 2  # the network is trained, and its feature scale taken, at this many torch threads


class LeNet(nn.Module):
    """conv 5x5 (32) - pool - conv 5x5 (64) - pool to 4x4 - fc 128 (the features) - fc classes."""

    def __init__(self, channels: int = 1, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5), nn.ReLU(), nn.AdaptiveMaxPool2d(4), nn.Flatten(),  # [B, 64 * 16]
            nn.Linear(64 * 16, FEATURE_DIM), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURE_DIM, classes))
        self.num_features = FEATURE_DIM  # read by torchmetrics' metrics to size their state

    def forward(self, x: Tensor) -> Tensor:
        """The penultimate features: [B, C, H, W] in [0, 1] -> [B, 128]."""
        return self.body(x)

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@dataclass(frozen=True)
class FeatureNetwork:
    """A trained LeNet (eval mode, frozen), what it was trained on, and its test accuracy."""

    net: LeNet
    key: str
    representation: str
    accuracy: float
    path: Path
    scale: float = 1.0  # features x scale have RMS 1 over the training images

    @property
    def name(self) -> str:
        return f"LeNet-{FEATURE_DIM} ({self.representation} images, cache key {self.key[:12]}), " \
               f"test accuracy {100 * self.accuracy:.2f}%"

    @torch.no_grad()
    def __call__(self, images: Tensor, batch_size: int = 1000) -> Tensor:
        """Features of images in [0, 1]: [N, *data] -> [N, 128], float64 (the metrics' precision)."""
        device = next(self.net.parameters()).device
        x = images if images.dim() == 4 else images.unsqueeze(1)  # [N, H, W] -> [N, 1, H, W]
        return self.scale * torch.cat([self.net(x[lo:lo + batch_size].to(device).float()).double().cpu()
                                       for lo in range(0, len(x), batch_size)])


def cache_root() -> Path:
    """Where feature networks are cached: HVAE_CACHE, else $XDG_CACHE_HOME/hvae, else ~/.cache/hvae."""
    if os.environ.get("HVAE_CACHE"):
        return Path(os.environ["HVAE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hvae"


def cache_key(data: Dataset, representation: str, seed: int) -> str:
    """SHA-256 over the data set's training and test tensors, the representation, seed and recipe version."""
    h = hashlib.sha256(f"lenet-v{RECIPE_VERSION}|{representation}|seed {seed}|".encode())
    for t in (data.train_x, data.train_y, data.test_x, data.test_y):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def to_unit(images: Tensor, representation: str, generator: torch.Generator | None = None) -> Tensor:
    """uint8 data-set images [N, C, H, W] -> the network's input in [0, 1]: binarized by `generator` (data.binarize)
    for "binary", pixel / 255 for "grey"."""
    return binarize(images, generator) if representation == "binary" else images.float() / 255


def feature_network(data: Dataset, representation: str, seed: int = 0, epochs: int = 3,
                    progress: bool = True) -> FeatureNetwork:
    """The cached network for this data set, representation and seed; trained (and cached) when missing or
    damaged."""
    if representation not in ("binary", "grey"):
        raise ValueError(f"representation must be 'binary' or 'grey'; got {representation!r}")
    if data.train_y is None or data.test_y is None:
        raise DataError("sample-quality metrics need a labelled data set: their feature network is a classifier "
                        "trained on its labels (give an .npz with train_y and test_y)")
    key = cache_key(data, representation, seed)
    folder = cache_root() / "features" / key
    try:
        return _load(folder, key, representation)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"note: the cached feature network in {folder} is damaged ({e}); rebuilding it", file=sys.stderr)
    # Why a fixed thread count: on some CPUs a conv's results differ in the last bits between thread counts, and
    # three epochs carry that into the weights (84.00% test accuracy at 1 thread against 83.86% at 2 on an Intel
    # Xeon); fixed, the same data and seed give the same network and scale whatever the caller's threads.
    with fixed_threads(TRAIN_THREADS):
        net, accuracy = train_lenet(data, representation, seed, epochs, progress)
        raw = FeatureNetwork(net, key, representation, accuracy, folder)(to_unit(data.train_x, representation,
                                                                                torch.Generator().manual_seed(seed)))
    _save(folder, net, {"key": key, "representation": representation, "seed": seed, "epochs": epochs,
                        "recipe_version": RECIPE_VERSION, "test_accuracy": accuracy,
                        "feature_scale": float(raw.square().mean().rsqrt())})
    return _load(folder, key, representation)


def train_lenet(data: Dataset, representation: str, seed: int, epochs: int,
                progress: bool = True) -> tuple[LeNet, float]:
    """Adam 1e-3, batch 128, `epochs` passes in a seeded order (binary images redrawn each epoch); -> the network
    in eval mode and its accuracy on the test split (binary: binarized once by to_unit with a seed-0 generator, a
    draw of its own, not the evaluation protocol's data.fixed_binarized_test)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights and dropout draws
        classes = int(max(data.train_y.max(), data.test_y.max())) + 1
        net = LeNet(1, classes)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        n = len(data.train_x)
        bar = tqdm(total=epochs * ((n + 127) // 128), desc="feature network (once per data set)",
                   disable=not progress, file=sys.stderr)
        net.train()
        for _ in range(epochs):
            x_all = to_unit(data.train_x, representation, gen)
            for idx in torch.randperm(n, generator=gen).split(128):
                loss = nn.functional.cross_entropy(net.logits(x_all[idx]), data.train_y[idx].long())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update()
        bar.close()
    net.eval()
    test = to_unit(data.test_x, representation, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = torch.cat([net.logits(test[lo:lo + 1000]).argmax(1) for lo in range(0, len(test), 1000)])
    return net, float((pred == data.test_y.long()).float().mean())


def _save(folder: Path, net: LeNet, meta: dict) -> None:
    """Weights then their record (with the weights' SHA-256), each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "lenet.safetensors"
    with atomic_file(weights) as f:
        f.write(save({k: v.contiguous() for k, v in net.state_dict().items()}))
    write_json(folder / "lenet.json", {**meta, "classes": net.head[1].out_features, "weights_sha256": file_sha256(weights)})


def _load(folder: Path, key: str, representation: str) -> FeatureNetwork:
    """The cached network; FileNotFoundError when absent, ValueError when its record or weights do not check."""
    meta_path, weights = folder / "lenet.json", folder / "lenet.safetensors"
    if not meta_path.exists() and not weights.exists():
        raise FileNotFoundError(folder)
    meta = json.loads(meta_path.read_text())
    if meta.get("key") != key or meta.get("recipe_version") != RECIPE_VERSION:
        raise ValueError("its record names another data set, seed or recipe")
    if file_sha256(weights) != meta["weights_sha256"]:
        raise ValueError("the weights' SHA-256 differs from the one recorded")
    net = LeNet(1, meta["classes"])
    net.load_state_dict(load_file(str(weights)))
    net.eval().requires_grad_(False)
    return FeatureNetwork(net, key, representation, float(meta["test_accuracy"]), folder, float(meta["feature_scale"]))
