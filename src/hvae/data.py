"""Datasets as uint8 tensors in memory, and the fast batch path.

- IDX files (Fashion-MNIST, MNIST; gzipped or not), looked up in --data-dir, then $HVAE_DATA, then
  /usr/share/datasets/<name> (Debian's dataset-fashion-mnist package).
- The user's own arrays: .npz with x_train / x_test (y_train / y_test optional), or one .npy of images.
- Binarization: training images afresh at every use; the test set once, with the fixed seed 0.
"""

from __future__ import annotations

import difflib
import gzip
import math
import os
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

SYSTEM_DIR = Path("/usr/share/datasets")
KNOWN = {"fashion-mnist": "Debian: sudo apt install dataset-fashion-mnist",
         "mnist": "download the four MNIST IDX files (train/t10k images/labels) into a folder"}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
NUMPY_READ_ERRORS = (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile)  # what np.load raises on bad files
TEST_SEED = 0
CLASS_NAMES = {"fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                 "Sneaker", "Bag", "Ankle boot")}  # label k's name, where the data set has names


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


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): magic 0x0000 | dtype | ndim, big-endian sizes, data.

    Every malformed file (bad gzip stream, bad magic, truncated header, size not matching the header)
    raises DataError naming the file; nothing is allocated from the header's sizes before they are checked.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
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
    expected = header + math.prod(dims) * dtype.itemsize  # Python ints: a forged header cannot overflow
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
    """Where to look: a given data folder alone (never another copy, unannounced), else $HVAE_DATA, then the
    system folder."""
    if data_dir:
        if not Path(data_dir).is_dir():
            raise DataError(f"data folder {data_dir} (--data-dir, or the run's data.data_dir): no such folder; pass "
                            f"--data-dir DIR holding {name}/ or its four IDX files")
        return [Path(data_dir) / name, Path(data_dir)]
    env = os.environ.get("HVAE_DATA")
    return ([Path(env) / name, Path(env)] if env else []) + [SYSTEM_DIR / name]


def load_idx_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST or MNIST from the first folder holding all four IDX files.

    A folder holding some but not all four is an error, not skipped: falling back to another copy
    would silently train on data the user did not point at.
    """
    tried = _candidate_dirs(name, data_dir)
    for folder in tried:
        paths = [_find_idx(folder, s) for s in IDX_STEMS]
        if any(paths) and not all(paths):
            missing = [s for s, p in zip(IDX_STEMS, paths) if p is None]
            raise DataError(f"{folder} holds only part of {name}: missing {', '.join(missing)} (or .gz); "
                            "add the missing files or remove the partial copy")
        if all(paths):
            arrays = [read_idx(p) for p in paths]
            for i in (0, 2):  # (train images, train labels), (test images, test labels)
                _check_idx_pair(arrays[i], arrays[i + 1], paths[i], paths[i + 1])
            if arrays[0].shape[1:] != arrays[2].shape[1:]:
                raise DataError(f"{paths[0]} holds {arrays[0].shape[1]}x{arrays[0].shape[2]} images but {paths[2]} "
                                f"{arrays[2].shape[1]}x{arrays[2].shape[2]}; train and test images must be the same size")
            arrays[1], arrays[3] = arrays[1].astype(np.int64), arrays[3].astype(np.int64)  # any IDX integer type
            train_x, train_y, test_x, test_y = (torch.from_numpy(np.array(a)) for a in arrays)  # writable copies
            return Dataset(name, train_x[:, None], train_y.long(), test_x[:, None], test_y.long(), tuple(paths))
    where = ", ".join(str(d) for d in tried)
    raise DataError(f"{name} not found (looked in {where}); {KNOWN.get(name, '')}, or pass --data-dir DIR "
                    "holding train-images-idx3-ubyte[.gz] and the other three IDX files")


def _check_idx_pair(images: np.ndarray, labels: np.ndarray, images_path: Path, labels_path: Path) -> None:
    if images.ndim != 3 or images.dtype != np.uint8 or 0 in images.shape:
        raise DataError(f"{images_path}: expected non-empty uint8 images [N, H, W]; got {images.shape} "
                        f"{images.dtype}; replace it with the original file")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{labels_path}: expected integer labels [N]; got {labels.shape} {labels.dtype}; "
                        "replace it with the original file")
    if len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}; "
                        "the two files do not belong together, replace them with a matching pair")


def as_images(a: np.ndarray, what: str) -> Tensor:
    """User arrays -> uint8 [N, C, H, W]. Accepts uint8 in 0..255 or floats in [0, 1]; [N, H, W] or
    [N, C, H, W] (channels first, C <= 4). Anything else (ints, bools, objects, NaN) is refused."""
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or 0 in a.shape:
        raise DataError(f"{what}: expected non-empty images of shape [N, H, W] or [N, C, H, W]; got {a.shape}")
    if a.shape[1] > 4:
        raise DataError(f"{what}: {a.shape[1]} channels in {a.shape}; store images channels first [N, C, H, W] "
                        "(e.g. numpy.moveaxis(x, -1, 1))")
    if a.dtype == np.uint8:
        if int(a.max()) == 1:  # 0/1 images stored as uint8
            print(f"note: {what}: uint8 images hold only 0 and 1, read as 0..255 (nearly black); for 0/1 images "
                  "store them as float, or multiply by 255", file=sys.stderr)
        return torch.from_numpy(np.ascontiguousarray(a))
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise DataError(f"{what}: float images contain NaN or infinity; clean them, or store uint8 0..255")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 1:
            raise DataError(f"{what}: float images must be in [0, 1]; got range [{lo:.3g}, {hi:.3g}] "
                            "(scale them, or store uint8 0..255)")
        scaled = a * 255  # one float copy; rounded in place
        return torch.from_numpy(np.round(scaled, out=scaled).astype(np.uint8))
    raise DataError(f"{what}: unsupported dtype {a.dtype}; store uint8 (0..255) or float (0..1) images")


def load_array_dataset(path: Path) -> Dataset:
    """.npz with x_train and x_test (labels y_train / y_test optional), or a .npy of images split 90/10
    (seeded) into train and test. Pickled (object) arrays are refused, never unpickled."""
    # np.load is given our own handle: on a damaged zip it would leak the one it opens itself.
    try:
        with open(path, "rb") as f:
            try:
                loaded = np.load(f, allow_pickle=False)
            except NUMPY_READ_ERRORS as e:
                raise DataError(f"{path}: cannot read as a NumPy array file ({e}); "
                                "save it with numpy.save/savez") from None
            if isinstance(loaded, np.ndarray):
                return _split_images(as_images(loaded, str(path)), path)
            with loaded:
                return _npz_dataset(loaded, path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e}); check the path") from None


def _split_images(images: Tensor, path: Path) -> Dataset:
    if len(images) < 2:
        raise DataError(f"{path}: need at least 2 images to split into train and test")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    n_test = max(1, len(images) // 10)
    return Dataset(path.stem, images[order[n_test:]], None, images[order[:n_test]], None, (path,))


def _npz_dataset(loaded, path: Path) -> Dataset:
    missing = {"x_train", "x_test"} - set(loaded.files)
    if missing:
        raise DataError(f"{path}: missing array(s) {sorted(missing)}; an .npz needs x_train and x_test "
                        f"(found {sorted(loaded.files)})")
    train_x = as_images(_member(loaded, "x_train", path), f"{path}:x_train")
    test_x = as_images(_member(loaded, "x_test", path), f"{path}:x_test")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"{path}: x_train and x_test image shapes differ ({tuple(train_x.shape[1:])} vs "
                        f"{tuple(test_x.shape[1:])})")
    labels = [_labels(loaded, key, n, path) for key, n in (("y_train", len(train_x)), ("y_test", len(test_x)))]
    return Dataset(path.stem, train_x, labels[0], test_x, labels[1], (path,))


def _member(loaded, key: str, path: Path) -> np.ndarray:
    """One array of an .npz; members are read lazily, so damage and object arrays surface here."""
    try:
        return loaded[key]
    except NUMPY_READ_ERRORS as e:
        raise DataError(f"{path}: cannot read {key} ({e}); store plain numeric arrays with numpy.savez") from None


def _labels(loaded, key: str, n: int, path: Path) -> Tensor | None:
    if key not in loaded.files:
        return None
    y = _member(loaded, key, path)
    if y.shape != (n,) or y.dtype.kind not in "iu":
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
    close = difflib.get_close_matches(name.lower(), list(KNOWN), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise DataError(f"unknown dataset {name!r}; {hint}use one of {', '.join(KNOWN)} or a path to a .npz/.npy file")


def binarize(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """x ~ Bernoulli(pixel / 255): uint8 [B, ...] -> float32 {0, 1}.

    Drawn as [u < pixel] with u uniform on the integers 0..254, so P(x = 1) = pixel / 255 exactly; this is
    several times cheaper on a CPU than torch.bernoulli on floats (the training hot path).
    """
    u = torch.randint(0, 255, images.shape, dtype=torch.uint8, generator=generator, device=images.device)
    return (u < images).float()


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


def test_set(dataset: str, data_dir: str | os.PathLike | None, likelihood: str) -> tuple[Tensor, Tensor | None]:
    """The evaluation protocol's test inputs of a data set for a likelihood (test_input: all images, in file order)
    and their labels (None when the data set has none)."""
    data = load_dataset(dataset, data_dir)
    return test_input(data.test_x, likelihood), data.test_y


def split_validation(x: Tensor, y: Tensor | None, n_val: int,
                     seed: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
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
