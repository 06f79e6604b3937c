"""Shared fixtures: tiny synthetic datasets in the formats the loaders read."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

# One thread for what the tests train and evaluate, in this process and in the subprocesses they start: the tensors
# are tiny, 2 cores would only be oversubscribed, and a run whose thread count the policy measured (hvae/threads.py)
# could differ in the last bits from one measured otherwise. The policy reads OMP_NUM_THREADS as its cap, so it
# has nothing to choose; tests/test_threads.py lifts the cap where it tests the policy itself.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Write `array` (uint8) as an IDX file: magic 0x00 0x00 0x08 ndim, big-endian sizes, bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def tiny_images(n: int, seed: int, size: int = 28) -> np.ndarray:
    """Structured uint8 images (bright squares at label-dependent places) so a model has something to learn."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    x = rng.integers(0, 40, (n, size, size)).astype(np.uint8)
    for i, lab in enumerate(labels):
        r, c = divmod(int(lab), 2)
        x[i, 4 + 12 * r: 12 + 12 * r, 4 + 12 * c: 12 + 12 * c] = 230
    return x, labels.astype(np.uint8)


def make_idx_dir(folder: Path, n_train: int = 256, n_test: int = 64) -> Path:
    """Write the four gzipped IDX files of a tiny Fashion-MNIST look-alike into `folder` (created)."""
    folder.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        x, y = tiny_images(n, seed)
        write_idx(folder / f"{split}-images-idx3-ubyte", x)
        write_idx(folder / f"{split}-labels-idx1-ubyte", y)
    return folder


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    """A folder shaped like Debian's /usr/share/datasets/fashion-mnist, with 256 train / 64 test images."""
    return make_idx_dir(tmp_path / "fashion-mnist")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # One thread: the tests' tensors are tiny, and subprocess tests would oversubscribe 2 cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
