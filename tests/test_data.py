"""Loaders: IDX (gz and plain, the lookup order, corrupt files), .npz/.npy arrays, binarization, orders."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_images, write_idx

from hvae import data
from hvae.data import DataError, load_dataset, read_idx

REAL = Path("/usr/share/datasets")
STEMS = data.IDX_STEMS


@pytest.fixture(autouse=True)
def _no_ambient_data(monkeypatch, tmp_path):
    """No test sees the machine's $HVAE_DATA or /usr/share/datasets unless it asks for them."""
    monkeypatch.delenv("HVAE_DATA", raising=False)
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "no-system-datasets")


def make_idx_folder(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        x, y = tiny_images(n, s)
        write_idx(folder / f"{split}-images-idx3-ubyte", x, gz=gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte", y, gz=gz)
    return folder


# --- IDX ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trips_gz_and_plain(tmp_path, gz):
    x, _ = tiny_images(7, 3)
    path = write_idx(tmp_path / "images-idx3-ubyte", x, gz=gz)
    got = read_idx(path)
    assert got.dtype == np.uint8 and got.shape == (7, 28, 28)
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(read_idx(str(path)), x)  # a str path works too


def test_read_idx_other_dtypes_are_big_endian(tmp_path):
    a = np.arange(-6, 6, dtype=">i4").reshape(3, 4)
    path = tmp_path / "ints-idx2"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + (3).to_bytes(4, "big") + (4).to_bytes(4, "big") + a.tobytes())
    np.testing.assert_array_equal(read_idx(path), np.arange(-6, 6).reshape(3, 4))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dataset_shapes_labels_and_files(idx_dir, tmp_path, gz):
    folder = idx_dir if gz else make_idx_folder(tmp_path / "plain" / "fashion-mnist", 30, 12, gz=False)
    ds = load_dataset("fashion-mnist", folder.parent)
    n_train, n_test = (256, 64) if gz else (30, 12)
    assert ds.train_x.shape == (n_train, 1, 28, 28) and ds.test_x.shape == (n_test, 1, 28, 28)
    assert ds.train_x.dtype == ds.test_x.dtype == torch.uint8
    assert ds.train_y.dtype == torch.int64 and ds.train_y.shape == (n_train,) and ds.test_y.shape == (n_test,)
    assert ds.data_shape == (1, 28, 28)
    assert [p.name.split(".")[0] for p in ds.files] == list(STEMS)
    x, y = tiny_images(n_train, 0)
    np.testing.assert_array_equal(ds.train_x[:, 0].numpy(), x)
    np.testing.assert_array_equal(ds.train_y.numpy(), y)


def test_lookup_order_data_dir_then_env_then_system(tmp_path, monkeypatch):
    # Three copies that differ in size tell which one was read.
    make_idx_folder(tmp_path / "given" / "fashion-mnist", n_train=11)
    make_idx_folder(tmp_path / "env" / "fashion-mnist", n_train=12)
    make_idx_folder(tmp_path / "system" / "fashion-mnist", n_train=13)
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setenv("HVAE_DATA", str(tmp_path / "env"))
    assert len(load_dataset("fashion-mnist", tmp_path / "given").train_x) == 11
    assert len(load_dataset("fashion-mnist").train_x) == 12
    with pytest.raises(DataError, match="no such folder"):  # a mistyped --data-dir does not fall through to a copy
        load_dataset("fashion-mnist", tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="no such folder"):
        load_dataset("fashion-mnist", tmp_path / "file")
    monkeypatch.delenv("HVAE_DATA")
    assert len(load_dataset("fashion-mnist").train_x) == 13


def test_data_dir_may_hold_the_files_directly(tmp_path):
    flat = make_idx_folder(tmp_path / "flat", n_train=9)
    assert len(load_dataset("fashion-mnist", flat).train_x) == 9


def test_mnist_uses_the_same_loader_and_layout(tmp_path, monkeypatch):
    make_idx_folder(tmp_path / "datasets" / "mnist", n_train=14, n_test=6)
    make_idx_folder(tmp_path / "datasets" / "fashion-mnist", n_train=15, n_test=5)
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "datasets")
    mnist, fashion = load_dataset("mnist"), load_dataset("fashion-mnist")
    assert mnist.name == "mnist" and mnist.train_x.shape == (14, 1, 28, 28) and mnist.test_y.shape == (6,)
    assert fashion.train_x.shape == (15, 1, 28, 28)
    assert len(load_dataset("mnist", tmp_path / "datasets").test_x) == 6  # --data-dir holding <name>/ folders


@pytest.mark.parametrize("name, how", [("fashion-mnist", "apt install dataset-fashion-mnist"),
                                       ("mnist", "MNIST IDX files")])
def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch, name, how):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("HVAE_DATA", str(tmp_path / "empty"))
    with pytest.raises(DataError) as err:
        load_dataset(name)
    msg = str(err.value)
    assert f"{name} not found" in msg and how in msg and "--data-dir" in msg
    assert str(data.SYSTEM_DIR / name) in msg and str(tmp_path / "empty") in msg  # says where it looked


def test_partial_folder_is_an_error_not_a_silent_fallback(tmp_path, monkeypatch):
    make_idx_folder(tmp_path / "system" / "fashion-mnist")
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "system")
    given = make_idx_folder(tmp_path / "given" / "fashion-mnist")
    (given / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", tmp_path / "given")


def _corrupt(folder: Path, kind: str) -> Path:
    """Damage one file of an IDX folder (gzipped by default) and return the damaged file's path."""
    images, labels = folder / "train-images-idx3-ubyte.gz", folder / "train-labels-idx1-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    if kind == "truncated-gz":
        images.write_bytes(images.read_bytes()[:-40])
    elif kind == "not-gzip":
        images.write_bytes(b"this is not gzip data at all")
    elif kind == "bad-crc":
        blob = bytearray(images.read_bytes())
        blob[-6] ^= 0xFF  # inside the CRC32 trailer
        images.write_bytes(bytes(blob))
    elif kind == "bad-magic":
        images.write_bytes(gzip.compress(b"\x08\x03" + raw[2:]))
    elif kind == "unknown-dtype":
        images.write_bytes(gzip.compress(raw[:2] + b"\x07" + raw[3:]))
    elif kind == "truncated-data":
        images.write_bytes(gzip.compress(raw[:-100]))
    elif kind == "extra-data":
        images.write_bytes(gzip.compress(raw + b"\x00" * 10))
    elif kind == "header-dims":
        images.write_bytes(gzip.compress(raw[:4] + (999).to_bytes(4, "big") + raw[8:]))
    elif kind == "truncated-header":
        images.write_bytes(gzip.compress(raw[:9]))
    elif kind == "empty-file":
        images.write_bytes(b"")
    elif kind == "labels-count":
        y = gzip.decompress(labels.read_bytes())
        labels.write_bytes(gzip.compress(y[:4] + (len(y) - 9).to_bytes(4, "big") + y[8:-1]))
        return labels
    elif kind == "labels-swapped-for-images":
        images.write_bytes(labels.read_bytes())
    elif kind == "images-not-uint8":
        n = int.from_bytes(raw[4:8], "big")
        f32 = np.zeros((n, 28, 28), ">f4").tobytes()
        images.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + raw[4:16] + f32))
    elif kind == "labels-2d":
        header = bytes([0, 0, 8, 2]) + (256).to_bytes(4, "big") + (1).to_bytes(4, "big")
        labels.write_bytes(gzip.compress(header + bytes(256)))
        return labels
    elif kind == "zero-images":
        images.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + bytes(4) + (28).to_bytes(4, "big") * 2))
    return images


CORRUPTIONS = ["truncated-gz", "not-gzip", "bad-crc", "bad-magic", "unknown-dtype", "truncated-data", "extra-data",
               "header-dims", "truncated-header", "empty-file", "labels-count", "labels-swapped-for-images",
               "images-not-uint8", "labels-2d", "zero-images"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_idx_names_the_file_and_the_fix(idx_dir, kind):
    damaged = _corrupt(idx_dir, kind)
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", idx_dir.parent)
    msg = str(err.value)
    assert str(damaged) in msg and "replace" in msg, msg
    assert "\n" not in msg


@pytest.mark.skipif(not (REAL / "fashion-mnist").is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DIR", REAL)
    ds = load_dataset("fashion-mnist")
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.shape == (60000,) and ds.test_y.shape == (10000,)
    assert set(ds.train_y.unique().tolist()) == set(range(10))
    assert all(p.parent == REAL / "fashion-mnist" for p in ds.files)
    assert data.fixed_binarized_test(ds.test_x).shape == (10000, 1, 28, 28)


@pytest.mark.skipif(not (REAL / "mnist").is_dir(), reason="no MNIST under /usr/share/datasets")
def test_real_mnist(monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DIR", REAL)
    ds = load_dataset("mnist")
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)


# --- .npz / .npy --------------------------------------------------------------------------------------

def test_npz_uint8_with_labels(tmp_path):
    x, y = tiny_images(12, 0)
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=x, x_test=x[:4], y_train=y.astype(np.int32), y_test=y[:4])
    ds = load_dataset(str(path))
    assert ds.name == "mine" and ds.train_x.shape == (12, 1, 28, 28) and ds.test_x.shape == (4, 1, 28, 28)
    assert ds.train_y.dtype == torch.int64 and ds.train_y.tolist() == y.tolist()
    np.testing.assert_array_equal(ds.train_x[:, 0].numpy(), x)
    assert ds.files == (path,)


def test_npz_float_in_unit_range_and_channels_first(tmp_path):
    x = np.linspace(0, 1, 5 * 3 * 4 * 4, dtype=np.float32).reshape(5, 3, 4, 4)
    path = tmp_path / "f.npz"
    np.savez(path, x_train=x, x_test=x[:2])
    ds = load_dataset(str(path))
    assert ds.train_y is None and ds.data_shape == (3, 4, 4) and ds.train_x.dtype == torch.uint8
    np.testing.assert_array_equal(ds.train_x.numpy(), np.round(x * 255).astype(np.uint8))


def test_npy_is_split_90_10_seeded_and_disjoint(tmp_path):
    x = np.arange(40, dtype=np.uint8)[:, None, None].repeat(4, 1).repeat(4, 2)  # image i is constant i
    path = tmp_path / "all.npy"
    np.save(path, x)
    a, b = load_dataset(str(path)), load_dataset(str(path))
    assert len(a.train_x) == 36 and len(a.test_x) == 4

    def ids(t):
        return set(t[:, 0, 0, 0].tolist())

    assert ids(a.train_x).isdisjoint(ids(a.test_x)) and ids(a.train_x) | ids(a.test_x) == set(range(40))
    assert torch.equal(a.test_x, b.test_x)


def _bad_arrays() -> dict[str, dict]:
    ok = np.zeros((4, 6, 6), np.uint8)
    return {
        "int64": {"x_train": ok.astype(np.int64), "x_test": ok},
        "bool": {"x_train": ok.astype(bool), "x_test": ok},
        "complex": {"x_train": ok.astype(np.complex64), "x_test": ok},
        "strings": {"x_train": np.array([["a"]]), "x_test": ok},
        "above-one": {"x_train": np.full((4, 6, 6), 1.5, np.float32), "x_test": ok},
        "negative": {"x_train": np.full((4, 6, 6), -0.1, np.float64), "x_test": ok},
        "nan": {"x_train": np.full((4, 6, 6), np.nan, np.float32), "x_test": ok},
        "some-inf": {"x_train": np.where(np.eye(6, dtype=bool), np.inf, 0.5)[None].repeat(4, 0), "x_test": ok},
        "empty-n": {"x_train": ok[:0], "x_test": ok},
        "empty-pixels": {"x_train": np.zeros((4, 0, 6), np.uint8), "x_test": ok},
        "2-d": {"x_train": ok[0], "x_test": ok},
        "5-d": {"x_train": ok[:, None, None], "x_test": ok},
        "channels-last": {"x_train": np.zeros((4, 6, 6, 3), np.uint8), "x_test": np.zeros((4, 6, 6, 3), np.uint8)},
        "shape-mismatch": {"x_train": ok, "x_test": np.zeros((4, 7, 7), np.uint8)},
        "missing-x_test": {"x_train": ok},
        "labels-length": {"x_train": ok, "x_test": ok, "y_train": np.zeros(3, np.int64)},
        "labels-float": {"x_train": ok, "x_test": ok, "y_test": np.zeros(4, np.float32)},
        "labels-2d": {"x_train": ok, "x_test": ok, "y_train": np.zeros((4, 1), np.int64)},
    }


@pytest.mark.parametrize("kind", list(_bad_arrays()))
def test_bad_npz_is_refused(tmp_path, kind):
    path = tmp_path / f"{kind}.npz"
    np.savez(path, **_bad_arrays()[kind])
    with pytest.raises(DataError) as err:
        load_dataset(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_object_arrays_are_refused_without_unpickling(tmp_path, monkeypatch):
    x = np.empty(3, dtype=object)
    x[:] = [np.zeros((2, 2)), "a", None]
    np.savez(tmp_path / "obj.npz", x_train=x, x_test=x)  # savez pickles object arrays
    np.save(tmp_path / "obj.npy", x, allow_pickle=True)
    (tmp_path / "pickled.npy").write_bytes(pickle.dumps(np.zeros((3, 4, 4), np.uint8)))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the loader unpickled a file")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    for name in ("obj.npz", "obj.npy", "pickled.npy"):
        with pytest.raises(DataError, match="obj.npz: cannot read x_train|cannot read as a NumPy"):
            load_dataset(str(tmp_path / name))


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not really a zip", b"\x93NUMPY\x01\x00garbage"])
def test_damaged_array_files_are_refused(tmp_path, content):
    for suffix in (".npz", ".npy"):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(content)
        with pytest.raises(DataError, match="cannot read"):
            load_dataset(str(path))


def test_truncated_npy_and_npz(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros((10, 8, 8), np.uint8))
    x = np.zeros((10, 8, 8), np.uint8)
    np.savez_compressed(tmp_path / "t.npz", x_train=x, x_test=x[:2])
    for name in ("t.npy", "t.npz"):
        path = tmp_path / name
        path.write_bytes(path.read_bytes()[:-60])
        with pytest.raises(DataError, match="cannot read"):
            load_dataset(str(path))


def test_one_image_npy_cannot_be_split(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(DataError, match="at least 2 images"):
        load_dataset(str(tmp_path / "one.npy"))


def test_unknown_names_and_missing_paths(tmp_path):
    with pytest.raises(DataError, match="did you mean 'fashion-mnist'"):
        load_dataset("fashion_mnist")
    with pytest.raises(DataError, match="no such file"):
        load_dataset(str(tmp_path / "nope.npz"))
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset(str(tmp_path / "images.png"))


# --- binarization and orders --------------------------------------------------------------------------

def test_fixed_test_binarization_is_the_protocol_over_all_images_then_sliced():
    x = torch.from_numpy(tiny_images(300, 5)[0])[:, None]
    reference = torch.bernoulli(x.float() / 255, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)  # the global RNG must not matter
    got = data.test_input(x, "bernoulli")
    assert torch.equal(got, reference) and torch.equal(data.fixed_binarized_test(x), reference)
    assert got.dtype == torch.float32 and set(got.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(data.test_input(x, "bernoulli")[:50], reference[:50])
    # Binarizing only the slice gives other images: the protocol is "all, then slice".
    assert not torch.equal(data.fixed_binarized_test(x[100:150]), reference[100:150])


def test_training_binarization_is_fresh_at_every_draw():
    x = torch.full((64, 1, 8, 8), 128, dtype=torch.uint8)
    a, b = data.to_model_input(x, "bernoulli"), data.to_model_input(x, "bernoulli")
    assert not torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(data.binarize(x, g1), data.binarize(x, g2))
    assert data.binarize(torch.zeros(3, 2, dtype=torch.uint8)).sum() == 0
    assert data.binarize(torch.full((3, 2), 255, dtype=torch.uint8)).min() == 1


def test_other_likelihoods_scale_deterministically():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8)
    assert torch.allclose(data.to_model_input(x, "logistic"), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]), atol=1e-6)
    assert torch.equal(data.test_input(x, "gaussian"), x.float() / 255)
    assert x.tolist() == [0, 255, 128]  # inputs are not modified in place


def test_epoch_order_is_a_function_of_seed_and_epoch():
    torch.manual_seed(1)
    a = data.epoch_order(100, seed=3, epoch=2)
    torch.manual_seed(2)
    assert torch.equal(a, data.epoch_order(100, seed=3, epoch=2))
    assert sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, data.epoch_order(100, seed=3, epoch=3))
    assert not torch.equal(a, data.epoch_order(100, seed=4, epoch=2))


def test_split_validation_is_seeded_disjoint_and_keeps_labels():
    x = torch.arange(50)[:, None]
    y = torch.arange(50) * 10
    tx, ty, vx, vy = data.split_validation(x, y, 8, seed=1)
    assert len(vx) == 8 and len(tx) == 42
    assert set(tx[:, 0].tolist()).isdisjoint(vx[:, 0].tolist())
    assert set(tx[:, 0].tolist()) | set(vx[:, 0].tolist()) == set(range(50))
    assert torch.equal(ty, tx[:, 0] * 10) and torch.equal(vy, vx[:, 0] * 10)
    assert torch.equal(vx, data.split_validation(x, y, 8, seed=1)[2])
    assert not torch.equal(vx, data.split_validation(x, y, 8, seed=2)[2])
    tx0, _, vx0, vy0 = data.split_validation(x, None, 0, seed=1)
    assert torch.equal(tx0, x) and len(vx0) == 0 and vy0 is None
    with pytest.raises(DataError, match="smaller than the training set"):
        data.split_validation(x, y, 50, seed=1)


def test_dynamic_binarization_is_bernoulli_of_pixel_over_255():
    # Every uint8 level, many draws: the frequency of ones must be pixel / 255 within 5 standard errors.
    levels = torch.arange(256, dtype=torch.uint8).repeat(4000, 1)  # [4000, 256]
    freq = data.binarize(levels, torch.Generator().manual_seed(3)).mean(0).double()
    p = torch.arange(256, dtype=torch.float64) / 255
    se = (p * (1 - p) / 4000).sqrt().clamp_min(1e-12)
    assert freq[0] == 0 and freq[255] == 1
    assert ((freq - p).abs() <= 5 * se).all()


def test_train_and_test_images_of_different_sizes_are_refused(tmp_path):
    folder = make_idx_folder(tmp_path / "fashion-mnist")
    x, _ = tiny_images(10, 1, size=14)
    write_idx(folder / "t10k-images-idx3-ubyte", x)
    with pytest.raises(DataError, match="same size"):
        load_dataset("fashion-mnist", tmp_path)


def test_idx_labels_of_a_wider_big_endian_integer_type_load(tmp_path):
    """IDX allows int32 labels (type 0x0C, big-endian): they load as the same labels as uint8 ones."""
    folder = make_idx_folder(tmp_path / "fashion-mnist")
    _, y = tiny_images(20, 0)
    header = bytes([0, 0, 0x0C, 1]) + len(y).to_bytes(4, "big")
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    (folder / "train-labels-idx1-ubyte").write_bytes(header + y.astype(">i4").tobytes())
    loaded = load_dataset("fashion-mnist", tmp_path)
    assert loaded.train_y.tolist() == y.tolist() and loaded.train_y.dtype == torch.int64


def test_uint8_images_holding_only_0_and_1_get_a_note(tmp_path, capsys):
    """A common 'binarized MNIST' layout: uint8 0/1 would be read as nearly black 0..255 images; say so."""
    x = (np.arange(20 * 8 * 8).reshape(20, 8, 8) % 2).astype(np.uint8)
    np.savez(tmp_path / "binary.npz", x_train=x, x_test=x[:4])
    load_dataset(str(tmp_path / "binary.npz"))
    assert "hold only 0 and 1" in capsys.readouterr().err
