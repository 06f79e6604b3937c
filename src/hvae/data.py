"""Datasets as uint8 tensors in memory, and the fast batch path.

- IDX files (Fashion-MNIST, MNIST; gzipped or not), looked up in --data-dir, then $HVAE_DATA, then
  /usr/share/datasets/<name> (Debian's dataset-fashion-mnist package).
- The user's own arrays: .npz with x_train / x_test (y_train / y_test optional), or one .npy of images.
- Binarization: training images afresh at every use; the test set once, with the fixed seed 0.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SYSTEM_DIR = Path("/usr/share/datasets")
KNOWN = {"fashion-mnist": "Debian: sudo apt install dataset-fashion-mnist",
         "mnist": "download the four MNIST IDX files (train/t10k images/labels) into a folder"}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
TEST_SEED = 0


class DataError(ValueError):
    """Bad or missing data; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Dataset:
    """Images as uint8 [N, C, H, W]; labels int64 [N] or None."""

    name: str
    train_x: Tensor
    train_y: Tensor | None
    test_x: Tensor
    test_y: Tensor | None
    files: tuple[Path, ...] = ()

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): magic 0x0000 | dtype | ndim, big-endian sizes, data."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is corrupt or truncated, replace it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path}: not an IDX file (bad magic number); replace it with the original file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; replace the file")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: IDX size mismatch ({len(raw)} bytes, header says {expected}); "
                        "the file is truncated or corrupt, replace it")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _candidate_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    dirs = []
    for base in (data_dir, os.environ.get("HVAE_DATA")):
        if base:
            dirs += [Path(base) / name, Path(base)]
    return dirs + [SYSTEM_DIR / name]


def load_idx_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST or MNIST from the first folder holding all four IDX files."""
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    tried = _candidate_dirs(name, data_dir)
    for folder in tried:
        paths = [_find_idx(folder, s) for s in stems]
        if all(paths):
            arrays = [read_idx(p) for p in paths]
            train_x, train_y, test_x, test_y = (torch.from_numpy(a.copy()) for a in arrays)
            for images, labels, p in ((train_x, train_y, paths[0]), (test_x, test_y, paths[2])):
                if images.ndim != 3 or images.dtype != torch.uint8 or labels.shape != images.shape[:1]:
                    raise DataError(f"{p}: expected uint8 images [N, H, W] with N matching the labels file; "
                                    f"got {tuple(images.shape)} {images.dtype} and {tuple(labels.shape)} labels")
            return Dataset(name, train_x[:, None], train_y.long(), test_x[:, None], test_y.long(), tuple(paths))
    where = ", ".join(str(d) for d in tried)
    raise DataError(f"{name} not found (looked in {where}); {KNOWN.get(name, '')}, or pass --data-dir DIR "
                    "holding train-images-idx3-ubyte[.gz] and the other three IDX files")


def as_images(a: np.ndarray, what: str) -> Tensor:
    """User arrays -> uint8 [N, C, H, W]. Accepts uint8 in 0..255 or floats in [0, 1]; [N, H, W] or [N, C, H, W]."""
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[0] == 0:
        raise DataError(f"{what}: expected images of shape [N, H, W] or [N, C, H, W] with N > 0; got {a.shape}")
    if a.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(a))
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise DataError(f"{what}: float images must be finite and in [0, 1]; got range "
                            f"[{np.nanmin(a):.3g}, {np.nanmax(a):.3g}] (scale them, or store uint8 0..255)")
        return torch.from_numpy(np.round(a * 255).astype(np.uint8))
    raise DataError(f"{what}: unsupported dtype {a.dtype}; store uint8 (0..255) or float (0..1) images")


def load_array_dataset(path: Path) -> Dataset:
    """.npz with x_train and x_test (labels y_train / y_test optional), or a .npy of images split 90/10
    (seeded) into train and test."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read as a NumPy array file ({e}); save it with numpy.save/savez") from None
    if isinstance(loaded, np.ndarray):
        images = as_images(loaded, str(path))
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        n_test = max(1, len(images) // 10)
        if len(images) < 2:
            raise DataError(f"{path}: need at least 2 images to split into train and test")
        return Dataset(path.stem, images[order[n_test:]], None, images[order[:n_test]], None, (path,))
    with loaded:
        missing = {"x_train", "x_test"} - set(loaded.files)
        if missing:
            raise DataError(f"{path}: missing array(s) {sorted(missing)}; an .npz needs x_train and x_test "
                            f"(found {sorted(loaded.files)})")
        train_x, test_x = as_images(loaded["x_train"], f"{path}:x_train"), as_images(loaded["x_test"], f"{path}:x_test")
        if train_x.shape[1:] != test_x.shape[1:]:
            raise DataError(f"{path}: x_train and x_test image shapes differ ({tuple(train_x.shape[1:])} vs "
                            f"{tuple(test_x.shape[1:])})")
        labels = [_labels(loaded, key, n, path) for key, n in (("y_train", len(train_x)), ("y_test", len(test_x)))]
    return Dataset(path.stem, train_x, labels[0], test_x, labels[1], (path,))


def _labels(loaded, key: str, n: int, path: Path) -> Tensor | None:
    if key not in loaded.files:
        return None
    y = loaded[key]
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key} must be integers of shape ({n},); got {y.dtype} {y.shape}")
    return torch.from_numpy(y.astype(np.int64))


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """A known IDX dataset by name ('fashion-mnist', 'mnist') or a path to .npz / .npy arrays."""
    if name in KNOWN:
        return load_idx_dataset(name, data_dir)
    path = Path(name)
    if path.suffix in (".npz", ".npy"):
        if not path.is_file():
            raise DataError(f"{path}: no such file; pass an existing .npz/.npy path or one of {', '.join(KNOWN)}")
        return load_array_dataset(path)
    raise DataError(f"unknown dataset {name!r}; use one of {', '.join(KNOWN)} or a path to a .npz/.npy file")


def binarize(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """x ~ Bernoulli(pixel / 255): uint8 [B, ...] -> float32 {0, 1}."""
    return torch.bernoulli(images.float().div_(255), generator=generator)


def fixed_binarized_test(test_x: Tensor) -> Tensor:
    """The evaluation protocol: all test images binarized once with seed 0, in file order."""
    return torch.bernoulli(test_x.float() / 255, generator=torch.Generator().manual_seed(TEST_SEED))


def to_model_input(images: Tensor, likelihood: str, generator: torch.Generator | None = None) -> Tensor:
    """uint8 images -> what the likelihood scores: {0,1} (bernoulli), [-1, 1] grid (logistic), [0, 1] else."""
    if likelihood == "bernoulli":
        return binarize(images, generator)
    if likelihood == "logistic":
        return images.float().div_(127.5).sub_(1.0)
    return images.float().div_(255)


def test_input(images: Tensor, likelihood: str) -> Tensor:
    """The fixed evaluation inputs: the seed-0 binarization for Bernoulli, deterministic scaling otherwise."""
    return fixed_binarized_test(images) if likelihood == "bernoulli" else to_model_input(images, likelihood)


def split_validation(x: Tensor, y: Tensor | None, n_val: int, seed: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """A seeded hold-out of n_val training images for model selection: (train_x, train_y, val_x, val_y)."""
    if n_val <= 0:
        return x, y, x[:0], None if y is None else y[:0]
    if n_val >= len(x):
        raise DataError(f"validation size {n_val} must be smaller than the training set ({len(x)} images)")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, va = order[n_val:], order[:n_val]
    return x[tr], None if y is None else y[tr], x[va], None if y is None else y[va]


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The example order of one epoch, a function of (seed, epoch) only, so a resumed run replays it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
