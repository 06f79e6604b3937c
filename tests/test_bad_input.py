"""The CLI contract for bad input: exit code 2, exactly one line on stderr, no traceback, and no file
that was already in the run directory changed (bytes and mtimes compared before and after)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_idx_dir, write_idx

from hvae import data
from hvae.cli import main

TINY = ["--set", "model.hidden=[32]", "--set", "model.latent_dim=2", "--batch-size", "32", "--epochs", "1",
        "--no-progress"]


def make_idx(folder: Path) -> Path:
    return make_idx_dir(folder, n_train=64, n_test=32)


@pytest.fixture(autouse=True)
def _no_ambient_data(monkeypatch, tmp_path):
    monkeypatch.delenv("HVAE_DATA", raising=False)
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "no-system-datasets")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """One tiny trained run (and its data root), shared; tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("trained")
    make_idx(root / "data" / "fashion-mnist")
    run = root / "run"
    assert main(["train", "--data-dir", str(root / "data"), "--out", str(run), *TINY]) == 0
    return run, root / "data"


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    return copy


@pytest.fixture
def data_root(tmp_path) -> Path:
    make_idx(tmp_path / "data" / "fashion-mnist")
    return tmp_path / "data"


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def expect_bad_input(capsys, argv: list[str], watched: Path, fragment: str) -> str:
    """Run argv; assert the bad-input contract and that `watched` is untouched; return the message."""
    capsys.readouterr()
    before = snapshot(watched)
    existed = watched.exists()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith(f"hvae {argv[0]}: error: "), err
    assert fragment in lines[0], lines[0]
    assert snapshot(watched) == before
    assert watched.exists() == existed
    return lines[0]


# --- hvae train ---------------------------------------------------------------------------------------

def test_missing_dataset(capsys, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "env").mkdir()
    monkeypatch.setenv("HVAE_DATA", str(tmp_path / "env"))
    msg = expect_bad_input(capsys, ["train", "--data-dir", tmp_path / "empty", "--out", tmp_path / "out", *TINY],
                           tmp_path / "out", "fashion-mnist not found")
    # a given --data-dir is the only place looked in: no other copy is used unannounced
    assert "apt install dataset-fashion-mnist" in msg and str(tmp_path / "env") not in msg
    msg = expect_bad_input(capsys, ["train", "--out", tmp_path / "out", *TINY], tmp_path / "out",
                           "fashion-mnist not found")
    assert str(tmp_path / "env") in msg


@pytest.mark.parametrize("kind, fragment", [("corrupt", "bad magic"), ("truncated-gz", "corrupt or truncated"),
                                            ("labels", "labels for")])
def test_damaged_idx(capsys, tmp_path, data_root, kind, fragment):
    folder = data_root / "fashion-mnist"
    if kind == "corrupt":
        (folder / "train-images-idx3-ubyte.gz").unlink()
        (folder / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x77\x03" + bytes(100))
    elif kind == "truncated-gz":
        path = folder / "t10k-images-idx3-ubyte.gz"
        path.write_bytes(path.read_bytes()[:200])
    else:
        write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(31, np.uint8))
    expect_bad_input(capsys, ["train", "--data-dir", data_root, "--out", tmp_path / "out", *TINY], tmp_path / "out",
                     fragment)


def test_unknown_set_key(capsys, tmp_path, data_root):
    expect_bad_input(capsys, ["train", "--data-dir", data_root, "--out", tmp_path / "out", *TINY,
                              "--set", "train.learning_rate=0.1"], tmp_path / "out", "did you mean")
    expect_bad_input(capsys, ["train", "--data-dir", data_root, "--out", tmp_path / "out", *TINY,
                              "--set", "model.latentdim=3"], tmp_path / "out", "'model.latent_dim'")


@pytest.mark.parametrize("item, fragment", [
    ("model.latent_dim=abc", "must be int"), ("model.hidden=[a,b]", "model.hidden"),
    ("runtime.compile=1", "must be bool"),
    ("optim.lr=.nan", "finite"), ("optim.lr", "key=value"), ("optim.lr=[1,", "cannot parse")])
def test_mistyped_set_value(capsys, tmp_path, data_root, item, fragment):
    expect_bad_input(capsys, ["train", "--data-dir", data_root, "--out", tmp_path / "out", *TINY, "--set", item],
                     tmp_path / "out", fragment)


@pytest.mark.parametrize("item, fragment", [
    ("train.log_every=0", "train.log_every must be >= 1"), ("optim.max_nonfinite=0", "optim.max_nonfinite must be >= 1"),
    ("optim.max_skips=-1", "optim.max_skips must be >= 0"),
    ("train.checkpoint_every=-5", "train.checkpoint_every must be >= 0"),
    ("train.checkpoint_minutes=-1", "train.checkpoint_minutes must be >= 0"),
    ("runtime.num_nodes=0", "runtime.num_nodes must be >= 1")])
def test_out_of_range_loop_settings(capsys, tmp_path, data_root, item, fragment):
    expect_bad_input(capsys, ["train", "--data-dir", data_root, "--out", tmp_path / "out", *TINY, "--set", item],
                     tmp_path / "out", fragment)


@pytest.mark.parametrize("text, fragment", [("train:\n  lr: [1,\n", "not valid YAML"), ("- 1\n", "mapping"),
                                            ("train:\n  lrr: 1\n", "'optim.lr'"), (b"\xff\xfe\x00", "UTF-8")])
def test_bad_yaml_file(capsys, tmp_path, data_root, text, fragment):
    preset = tmp_path / "preset.yaml"
    preset.write_bytes(text if isinstance(text, bytes) else text.encode())
    expect_bad_input(capsys, ["train", "--config", preset, "--data-dir", data_root, "--out", tmp_path / "out", *TINY],
                     tmp_path / "out", fragment)


def test_missing_yaml_file(capsys, tmp_path, data_root):
    expect_bad_input(capsys, ["train", "--config", tmp_path / "nope.yaml", "--data-dir", data_root, "--out",
                              tmp_path / "out", *TINY], tmp_path / "out", "cannot read config")


def test_existing_nonempty_out_is_refused(capsys, run, data_root):
    expect_bad_input(capsys, ["train", "--data-dir", data_root, "--out", run, *TINY], run, "--overwrite")


def test_out_that_is_a_file(capsys, tmp_path, data_root):
    (tmp_path / "file").write_text("mine")
    expect_bad_input(capsys, ["train", "--data-dir", data_root, "--out", tmp_path / "file", *TINY], tmp_path,
                     "is a file")


def test_resume_without_checkpoint(capsys, run, tmp_path):
    shutil.rmtree(run / "checkpoints")
    expect_bad_input(capsys, ["train", "--resume", run, "--no-progress"], run, "has no checkpoint")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "notes.txt").write_text("not a run")
    expect_bad_input(capsys, ["train", "--resume", tmp_path / "bare", "--no-progress"], tmp_path / "bare",
                     "config.json is missing")


def test_resume_refuses_config_changes(capsys, run):
    expect_bad_input(capsys, ["train", "--resume", run, "--set", "optim.lr=0.1"], run, "only --epochs and --device may change")
    expect_bad_input(capsys, ["train", "--resume", run, "--precision", "bf16-mixed"], run, "(got --precision)")
    expect_bad_input(capsys, ["train", "--resume", run, "--out", run.parent / "elsewhere"], run, "drop --out")


def test_resume_may_move_the_run_to_another_device(run):
    """A run trained on one device resumes on another (here its saved accelerator, as if 'cuda', is overridden)."""
    config = json.loads((run / "config.json").read_text())
    config["runtime"]["accelerator"] = "cuda"
    (run / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(run), "--device", "cpu", "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["runtime"]["accelerator"] == "cpu"


def test_resume_of_a_checkpoint_from_a_newer_hvae(capsys, run):
    _claim_newer_format(run)
    expect_bad_input(capsys, ["train", "--resume", run, "--epochs", "2", "--no-progress"], run, "newer hvae")


def test_npz_with_wrong_dtype(capsys, tmp_path):
    np.savez(tmp_path / "ints.npz", x_train=np.zeros((64, 8, 8), np.int64), x_test=np.zeros((8, 8, 8), np.int64))
    expect_bad_input(capsys, ["train", "--dataset", tmp_path / "ints.npz", "--out", tmp_path / "out", *TINY],
                     tmp_path / "out", "unsupported dtype int64")


@pytest.mark.parametrize("kind, fragment", [("object", "Object arrays cannot be loaded"), ("range", "[0, 1]"),
                                            ("nan", "NaN"), ("empty", "non-empty"), ("shapes", "shapes differ")])
def test_other_bad_arrays(capsys, tmp_path, kind, fragment):
    ok = np.zeros((64, 8, 8), np.uint8)
    arrays = {"object": {"x_train": np.array([None, 1], dtype=object), "x_test": ok},
              "range": {"x_train": np.full((64, 8, 8), 255.0), "x_test": ok},
              "nan": {"x_train": np.full((64, 8, 8), np.nan), "x_test": ok},
              "empty": {"x_train": ok[:0], "x_test": ok},
              "shapes": {"x_train": ok, "x_test": np.zeros((8, 9, 9), np.uint8)}}[kind]
    np.savez(tmp_path / "bad.npz", **arrays)
    expect_bad_input(capsys, ["train", "--dataset", tmp_path / "bad.npz", "--out", tmp_path / "out", *TINY],
                     tmp_path / "out", fragment)


def test_unknown_dataset_name(capsys, tmp_path):
    expect_bad_input(capsys, ["train", "--dataset", "fashion_mnist", "--out", tmp_path / "out", *TINY],
                     tmp_path / "out", "did you mean 'fashion-mnist'")


def test_validation_larger_than_the_training_set(capsys, tmp_path, data_root):
    expect_bad_input(capsys, ["train", "--data-dir", data_root, "--out", tmp_path / "out", *TINY,
                              "--set", "data.validation=64"], tmp_path, "validation size 64")


# --- hvae eval / sample -------------------------------------------------------------------------------

def _claim_newer_format(run: Path) -> None:
    state = run / "checkpoints" / "last" / "state.json"
    meta = json.loads(state.read_text())
    state.write_text(json.dumps({**meta, "format": meta["format"] + 1}))


def test_eval_of_a_nonexistent_run(capsys, tmp_path):
    expect_bad_input(capsys, ["eval", tmp_path / "nope", "--k", "2", "--no-progress"], tmp_path, "does not exist")
    expect_bad_input(capsys, ["sample", tmp_path / "nope", "--n", "2"], tmp_path, "does not exist")


def test_eval_of_a_run_from_another_model_config(capsys, run):
    config = json.loads((run / "config.json").read_text())
    config["model"]["latent_dim"] += 1
    (run / "config.json").write_text(json.dumps(config))
    expect_bad_input(capsys, ["eval", run, "--k", "2", "--no-progress"], run, "does not fit this model")


def test_eval_of_a_checkpoint_from_a_newer_hvae(capsys, run):
    _claim_newer_format(run)
    expect_bad_input(capsys, ["eval", run, "--k", "2", "--no-progress"], run, "newer hvae")


@pytest.mark.parametrize("content, fragment", [("{not json", "not valid JSON"), ("[1, 2]", "mapping"),
                                               ('{"model": {"latent_dim": "2"}}', "must be int"),
                                               ('{"train": {"new_key": 1}}', "unknown config key")])
def test_eval_with_a_damaged_config_json(capsys, run, content, fragment):
    (run / "config.json").write_text(content)
    expect_bad_input(capsys, ["eval", run, "--k", "2", "--no-progress"], run, fragment)


def test_eval_with_damaged_weights(capsys, run):
    weights = run / "checkpoints" / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    expect_bad_input(capsys, ["eval", run, "--k", "2", "--no-progress"], run, "not a readable safetensors file")


@pytest.mark.parametrize("flag, fragment", [
    (["--k", "0"], "--k must be >= 1"), (["--limit", "0"], "--limit must be >= 1"),
    (["--k", "-3"], "--k must be >= 1"), (["--limit", "-1"], "--limit must be >= 1"),
    (["--fid", "--samples", "3"], "--samples must be >= 10"),
    (["--fid", "--temperature", "-1"], "--temperature must be >= 0")])
def test_eval_bad_numbers(capsys, run, trained, flag, fragment):
    expect_bad_input(capsys, ["eval", run, "--data-dir", trained[1], "--no-progress", *flag], run, fragment)


def test_eval_when_the_data_is_gone(capsys, run, tmp_path):
    (tmp_path / "empty").mkdir()
    expect_bad_input(capsys, ["eval", run, "--k", "2", "--data-dir", tmp_path / "empty", "--no-progress"], run,
                     "fashion-mnist not found")


def test_eval_with_corrupt_test_images(capsys, run, trained, tmp_path):
    shutil.copytree(trained[1], tmp_path / "data")
    path = tmp_path / "data" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-1]))
    expect_bad_input(capsys, ["eval", run, "--k", "2", "--data-dir", tmp_path / "data", "--no-progress"], run,
                     "size mismatch")


# --- contract gaps found by these tests, fixed in cli.py / train.py / checkpoint.py ---------------

def test_batch_larger_than_the_training_set(capsys, tmp_path, data_root):
    expect_bad_input(capsys, ["train", "--data-dir", data_root, "--out", tmp_path / "out", *TINY,
                              "--batch-size", "4096"], tmp_path / "out", "batch")


def test_unsupported_precision(capsys, tmp_path, data_root):
    expect_bad_input(capsys, ["train", "--data-dir", data_root, "--out", tmp_path / "out", *TINY,
                              "--precision", "bf16-true"], tmp_path / "out", "runtime.precision must be one of")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_train_on_a_gpu_this_machine_lacks(capsys, tmp_path, data_root):
    expect_bad_input(capsys, ["train", "--data-dir", data_root, "--out", tmp_path / "out", *TINY, "--device", "cuda"],
                     tmp_path / "out", "sees no CUDA GPU")


@pytest.mark.parametrize("device, fragment", [("cuda", "sees no CUDA GPU"), ("warp9", "is not a device")])
def test_eval_on_a_device_that_is_not_there(capsys, run, device, fragment):
    if device == "cuda" and __import__("torch").cuda.is_available():
        pytest.skip("needs a machine without a CUDA GPU")
    expect_bad_input(capsys, ["eval", run, "--k", "2", "--device", device, "--no-progress"], run, fragment)


@pytest.mark.parametrize("argv, fragment", [
    (["sample", "{run}", "--n", "4", "--temperature", "-1"], "--temperature must be >= 0"),
    (["interpolate", "{run}", "--steps", "1"], "--steps must be >= 2; got 1"),
])
def test_generation_bad_numbers_name_the_flag_at_fault(capsys, run, trained, argv, fragment):
    argv = [str(run) if a == "{run}" else a for a in argv]
    expect_bad_input(capsys, [*argv, "--data-dir", trained[1]], run, fragment)


def test_seed_out_of_range(capsys, tmp_path, data_root):
    expect_bad_input(capsys, ["train", "--data-dir", data_root, "--out", tmp_path / "out", *TINY,
                              "--seed", str(2 ** 63)], tmp_path / "out", "seed")


def test_argparse_errors_are_one_line(capsys, tmp_path):
    expect_bad_input(capsys, ["eval", tmp_path, "--k", "many"], tmp_path, "--k")



def test_validation_error_leaves_no_new_run_directory(capsys, tmp_path, data_root):
    expect_bad_input(capsys, ["train", "--data-dir", data_root, "--out", tmp_path / "out", *TINY,
                              "--set", "data.validation=64"], tmp_path / "out", "validation size 64")


@pytest.mark.parametrize("meta", [{"format": "2", "state": {}}, {"format": 1}])
def test_malformed_state_json(capsys, run, meta):
    (run / "checkpoints" / "last" / "state.json").write_text(json.dumps(meta))
    expect_bad_input(capsys, ["eval", run, "--k", "2", "--no-progress"], run, "state.json")


def test_eval_batch_size_zero(capsys, run):
    expect_bad_input(capsys, ["eval", run, "--k", "2", "--batch-size", "0", "--no-progress"], run, "--batch-size")


def test_zero_devices(capsys, tmp_path, data_root):
    expect_bad_input(capsys, ["train", "--data-dir", data_root, "--out", tmp_path / "out", *TINY, "--devices", "0"],
                     tmp_path / "out", "devices")


# --- cases found by a review of the CLI -----------------------------------------------------------------

@pytest.mark.parametrize("item, fragment", [
    ("runtime.strategy=foo", "runtime.strategy"), ("model.variance=foo", "model.variance must be one of"),
    ("model.hidden=[32,0]", "model.hidden sizes must be >= 1"), ("model.latent_dims=[-4]", "model.latent_dims"),
    ("model.activation=tanhh", "model.activation must be one of")])
def test_overwrite_with_a_config_that_cannot_run_keeps_the_old_run(capsys, run, data_root, item, fragment):
    expect_bad_input(capsys, ["train", "--data-dir", data_root, "--out", run, "--overwrite", *TINY, "--set", item],
                     run, fragment)


@pytest.mark.parametrize("item, fragment", [
    ("objective.beta=-1", "objective.beta must be >= 0"), ("objective.free_bits=-1", "objective.free_bits must be >= 0"),
    ("objective.warmup_epochs=-1", "objective.warmup_epochs"), ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim.skip_threshold=-1", "optim.skip_threshold"), ("runtime.threads=100000", "runtime.threads")])
def test_out_of_range_training_values(capsys, tmp_path, data_root, item, fragment):
    expect_bad_input(capsys, ["train", "--data-dir", data_root, "--out", tmp_path / "out", *TINY, "--set", item],
                     tmp_path / "out", fragment)


def test_data_dir_that_does_not_exist_is_refused_not_replaced_by_another_copy(capsys, run, tmp_path):
    expect_bad_input(capsys, ["eval", run, "--k", "2", "--data-dir", tmp_path / "nowhere"], run, "no such folder")
    expect_bad_input(capsys, ["train", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "out", *TINY],
                     tmp_path / "out", "no such folder")


def test_train_out_or_resume_that_cannot_be_a_folder(capsys, tmp_path, data_root):
    (tmp_path / "a-file").write_text("mine")
    expect_bad_input(capsys, ["train", "--data-dir", data_root, "--out", tmp_path / "a-file" / "run", *TINY],
                     tmp_path / "a-file", "cannot create run directory")
    expect_bad_input(capsys, ["train", "--resume", tmp_path / "a-file", "--no-progress"], tmp_path / "a-file",
                     "no such run directory")


@pytest.mark.parametrize("key, value, fragment", [
    ("latent_dim", -3, "config.json"), ("name", "vea", "unknown model"), ("likelihood", "poisson", "config.json"),
    ("hidden", [-2], "config.json")])
def test_commands_on_a_run_whose_config_json_was_edited_wrong(capsys, run, key, value, fragment):
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"][key] = value
    (run / "config.json").write_text(json.dumps(cfg))
    for command in (["eval", run, "--k", "2"], ["sample", run, "--n", "2", "--out", run.parent / "s.png"]):
        expect_bad_input(capsys, command, run, fragment)


@pytest.mark.parametrize("argv, fragment", [
    (["interpolate", "{run}", "--n", "40"], "test images"),
    (["sample", "{run}", "--seed", "99999999999999999999"], "--seed must be in"),
    (["sample", "{run}", "--seed", "-1"], "--seed must be in"),
    (["sample", "{run}", "--temperature", "nan"], "finite"),
    (["sample", "{run}", "--temperature", "inf"], "finite"),
    (["report", "{run}", "--temperature", "-1", "--no-progress"], "--temperature must be >= 0"),
    (["report", "{run}", "--seed", "-5", "--no-progress"], "--seed must be in"),
    (["edit", "arithmetic", "{run}", "--from", "0", "--to", "1", "--limit", "-1"], "--limit must be >= 1"),
    (["edit", "arithmetic", "{run}", "--from", "0", "--to", "1", "--scales", "nan"], "finite"),
    (["edit", "traverse", "{run}", "--span", "inf"], "finite"),
    (["edit", "traverse", "{run}", "--span", "0"], "--span must be > 0"),
    (["edit", "traverse", "{run}", "--dims", ","], "--dims is empty"),
    (["sample", "{run}", "--device", "meta"], "not a device hvae runs on"),
    (["encode", "{run}", "--device", "xla"], "not a device hvae runs on")])
def test_generation_and_editing_options_out_of_range(capsys, run, trained, argv, fragment):
    argv = [a.replace("{run}", str(run)) for a in argv] + ["--data-dir", str(trained[1])]
    expect_bad_input(capsys, argv, run, fragment)


@pytest.mark.parametrize("command, extra", [(["sample"], []), (["edit", "traverse"], []),
                                            (["report"], ["--no-progress"]), (["encode"], [])])
def test_outputs_that_cannot_be_written(capsys, run, trained, tmp_path, command, extra):
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "a-folder").mkdir()
    suffix = ".npz" if command == ["encode"] else ".png"
    for out, fragment in ((tmp_path / "a-folder", "is a folder"), (tmp_path / "a-file" / f"x{suffix}", "cannot write")):
        expect_bad_input(capsys, [*command, run, *extra, "--out", out, "--data-dir", trained[1]], tmp_path / "a-file",
                         fragment)


def test_several_configs_merge_in_order_and_relative_paths_are_stored_absolute(tmp_path, data_root, monkeypatch):
    (tmp_path / "base.yaml").write_text("model:\n  hidden: [16]\n  latent_dim: 3\ntrain:\n  epochs: 1\n  lr: 0.01\n")
    (tmp_path / "more.yaml").write_text("train:\n  lr: 0.002\n")
    monkeypatch.chdir(data_root.parent)
    out = tmp_path / "run"
    assert main(["train", "--config", tmp_path / "base.yaml", "--config", tmp_path / "more.yaml", "--data-dir", "data",
                 "--out", out, "--batch-size", "32", "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["hidden"] == [16] and cfg["optim"]["lr"] == 0.002 and cfg["train"]["epochs"] == 1
    assert cfg["data"]["data_dir"] == str(data_root)


def test_encode_names_the_file_it_wrote(capsys, run, trained, tmp_path):
    assert main(["encode", str(run), "--out", str(tmp_path / "lat"), "--data-dir", str(trained[1])]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "lat.npz") and (tmp_path / "lat.npz").is_file()
