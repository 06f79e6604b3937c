"""Run directories written by hvae before the refactor of its config layout, training loop and CLI still load,
evaluate and resume, with the numbers the old code gave.

The fixtures (tests/fixtures/legacy-runs/{vae,ladder,mhvae}: 1 epoch each on Fashion-MNIST) and their expected
figures (expected.json) were made once by make_fixtures.sh with the code of commit expected.json["commit"]; they
must never be regenerated with newer code (test_fixtures_are_the_recorded_ones checks they were not).

Tolerances. On the machine that made the fixtures (and on any CPU whose kernels round alike) every figure comes
out bit for bit, and HVAE_BITWISE=1 asserts exactly that. Without it the floats are compared with a relative
tolerance: another CPU (another SIMD width, another BLAS code path) may round matmuls and reductions differently
in the last bits, so bitwise equality is not a property of the code alone. Integers and integer lists are exact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import hvae

FIXTURES = Path(__file__).parent / "fixtures" / "legacy-runs"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
RUNS = sorted(EXPECTED["runs"])  # ladder, mhvae, vae
DATA = Path("/usr/share/datasets/fashion-mnist")
BITWISE = os.environ.get("HVAE_BITWISE") == "1"
EVAL_RTOL = 1e-5  # the fixture's own weights: only the evaluation's arithmetic can differ across CPUs
RESUMED_RTOL = 1e-4  # after a resumed epoch (468 Adam steps) last-bit differences have grown through training
TIMING_KEYS = {"seconds"}  # wall-clock time, not a result


def tensor_digests(path: Path) -> dict:
    """name -> dtype, shape, SHA-256 of the tensor's bytes (C order); exactly as make_fixtures.sh computed them."""
    from safetensors.torch import load_file

    return {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                   "sha256": hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()}
            for name, t in sorted(load_file(path).items())}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def need_data() -> None:
    """Skip (locally) or fail (CI=true: CI installs the data) when Fashion-MNIST is not where the runs read it."""
    if not DATA.is_dir():
        reason = (f"{DATA} is absent (Debian/Ubuntu: apt install dataset-fashion-mnist); the legacy runs were "
                  "trained and are evaluated on it")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)


@pytest.fixture
def legacy_run(request, tmp_path, monkeypatch) -> Path:
    """A copy of the fixture run `request.param` in tmp_path (the fixture itself is never written to)."""
    need_data()
    # The runs leave data.data_dir unset, so $HVAE_DATA would win over /usr/share/datasets: make sure it cannot.
    monkeypatch.delenv("HVAE_DATA", raising=False)
    name = request.param
    copy = tmp_path / name
    shutil.copytree(FIXTURES / name, copy)
    return copy


def assert_same_result(got: dict, want: dict, rtol: float, what: str) -> None:
    """`hvae eval --json` output against the recorded one: every recorded key (new keys may be added), floats
    (alone or in lists) within rtol (exact when HVAE_BITWISE=1), integers exact; the timing is not compared."""
    missing = sorted(set(want) - set(got))
    assert not missing, f"{what}: keys missing from hvae eval --json: {missing}"
    problems = []
    for key, expected in want.items():
        if key in TIMING_KEYS:
            continue
        actual = got[key]
        pairs = list(zip(actual, expected)) if isinstance(expected, list) else [(actual, expected)]
        if isinstance(expected, list) and (not isinstance(actual, list) or len(actual) != len(expected)):
            problems.append(f"{key}: {actual!r} != {expected!r}")
            continue
        for a, e in pairs:
            if isinstance(e, float):
                ok = isinstance(a, (int, float)) and not isinstance(a, bool) and (
                    a == e if BITWISE else math.isclose(a, e, rel_tol=rtol))
            else:  # int (counts, k, n_images, levels): exact, and still an int
                ok = type(a) is type(e) and a == e
            if not ok:
                problems.append(f"{key}: {actual!r} != {expected!r}")
                break
    tolerance = "bitwise (HVAE_BITWISE=1)" if BITWISE else f"rel tol {rtol:g}"
    assert not problems, f"{what} differs from the old code's ({tolerance}):\n  " + "\n  ".join(problems)


def run_eval(run: Path, capsys) -> dict:
    from hvae.cli import main

    capsys.readouterr()
    # --device cpu: the figures are CPU figures (without it a GPU machine would evaluate on the GPU).
    assert main(["eval", str(run), *EXPECTED["eval_args"], "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", RUNS)
def test_fixtures_are_the_recorded_ones(name):
    """The fixture files are those make_fixtures.sh wrote with the old code (not regenerated, not edited)."""
    run = FIXTURES / name
    found = {str(p.relative_to(run)): file_sha256(p) for p in sorted(run.rglob("*")) if p.is_file()}
    assert found == EXPECTED["runs"][name]["files"], (
        f"{run} is not what make_fixtures.sh wrote with commit {EXPECTED['commit']}; restore it from git "
        "(these fixtures must come from the old code, never be regenerated)")


@pytest.mark.parametrize("legacy_run", RUNS, indirect=True)
def test_legacy_data_is_the_recorded_data(legacy_run):
    """The Fashion-MNIST files here are those the runs were made from (else every figure below would differ)."""
    recorded = json.loads((legacy_run / "provenance.json").read_text())["data_files"]
    for path, sha in recorded.items():
        local = DATA / Path(path).name
        assert local.is_file() and file_sha256(local) == sha, (
            f"{local} is missing or differs from the file the legacy runs were trained on ({path}, sha256 {sha}); "
            "the expected figures hold for that file only")


@pytest.mark.parametrize("legacy_run", RUNS, indirect=True)
def test_legacy_run_evaluates_as_before(legacy_run, capsys):
    result = run_eval(legacy_run, capsys)
    assert_same_result(result, EXPECTED["runs"][legacy_run.name]["eval"], EVAL_RTOL, f"hvae eval {legacy_run.name}")


@pytest.mark.parametrize("legacy_run", RUNS, indirect=True)
def test_legacy_run_loads_and_samples(legacy_run):
    model = hvae.load(legacy_run)
    with torch.no_grad():
        images = model.sample(4)
    assert tuple(images.shape) == (4, 1, 28, 28)  # Fashion-MNIST: [n, C, H, W]
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1  # Bernoulli means


@pytest.mark.parametrize("legacy_run", RUNS, indirect=True)
def test_legacy_run_resumes_as_before(legacy_run, capsys):
    """Resume the copy for its 2nd epoch: the weights (and EMA weights) equal the old code's resumed ones bit for bit
    where kernels round alike (required with HVAE_BITWISE=1); else the resumed model evaluates alike within
    RESUMED_RTOL."""
    from hvae.cli import main

    name, want = legacy_run.name, EXPECTED["runs"][legacy_run.name]["resumed"]
    assert main(["train", "--resume", str(legacy_run), *EXPECTED["resume_args"], "--device", "cpu"]) == 0
    last = legacy_run / "checkpoints" / "last"
    for file in want["tensors"]:
        assert (last / file).is_file(), f"resumed {name}: no checkpoints/last/{file}"
    # Today's names of the old code's tensors (the ladder's modules were regrouped into one block per level; the
    # model maps each old name to its new one, and loads either).
    rename = getattr(hvae.load(legacy_run), "legacy_key", lambda key: key)
    want_tensors = {f: {rename(k): v for k, v in ts.items()} for f, ts in want["tensors"].items()}
    got = {file: tensor_digests(last / file) for file in want["tensors"]}
    layout = {f: {k: (v["dtype"], v["shape"]) for k, v in ts.items()} for f, ts in got.items()}
    want_layout = {f: {k: (v["dtype"], v["shape"]) for k, v in ts.items()} for f, ts in want_tensors.items()}
    assert layout == want_layout, (f"resumed {name}: the checkpoint's tensor names, dtypes or shapes changed; "
                                   "old runs' weights would no longer match this code's modules")
    differing = [f"{f}:{k}" for f, ts in got.items() for k, v in ts.items() if v["sha256"] != want_tensors[f][k]["sha256"]]
    if BITWISE:
        assert not differing, f"resumed {name}: tensors differ from the old code's resumed run: {differing}"
    # Bitwise weights: the evaluation must also agree as closely as the fixture's own; else (another CPU), the
    # resumed weights may differ in the last bits, and the evaluation is held to the looser tolerance.
    rtol = RESUMED_RTOL if differing else EVAL_RTOL
    assert_same_result(run_eval(legacy_run, capsys), want["eval"], rtol, f"hvae eval of resumed {name}")
