"""`hvae eval RUN --fid`: how good a model's samples look, on the features of a classifier of the data set.

Every image set is compared with all the test images of the evaluation protocol (binarized once with seed 0 for
a Bernoulli model): the model's samples at each temperature, and two reference rows that give the numbers a
scale: training images (the floor: real images of the same distribution) and the model's reconstructions of the
test images. Images are compared as the model generates them: a Bernoulli model's samples and reconstructions are
draws x ~ p(x|z) (binary, like the test images it is compared with); other likelihoods give the mean of p(x|z).

Each measurement is appended to RUN/sample-quality.jsonl (one JSON object a line, never rewritten), which
`hvae report` reads for its table and its curve against temperature.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from . import quality
from .data import Dataset, test_input
from .editing import model_device
from .features import FeatureNetwork, feature_network, to_unit
from .visualize import to_unit_range

RECORDS = "sample-quality.jsonl"
SEED = 0  # the draws of the samples, the training-image subset and its binarization


def representation(likelihood: str) -> str:
    """The feature network's image representation for a likelihood: binary images for Bernoulli, grey else."""
    return "binary" if likelihood == "bernoulli" else "grey"


def as_generated(images: Tensor, likelihood: str) -> Tensor:
    """Likelihood means in the input space -> images in [0, 1] as the model generates them (a Bernoulli draw for
    a Bernoulli model, the mean else): [N, *data] -> [N, *data]."""
    unit = to_unit_range(images, likelihood)
    return torch.bernoulli(unit) if likelihood == "bernoulli" else unit


@torch.no_grad()
def in_batches(make: Callable[[int, int], Tensor], n: int, batch: int, desc: str, progress: bool) -> Tensor:
    """Concatenate make(first row, rows) over batches of at most `batch` rows until n, with a progress bar:
    -> [n, ...] (CPU)."""
    out = []
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        for lo in range(0, n, batch):
            out.append(make(lo, min(batch, n - lo)).cpu())
            bar.update(len(out[-1]))
    return torch.cat(out)


def draw_samples(model, n: int, temperature: float, likelihood: str, batch: int = 500,
                 progress: bool = True) -> Tensor:
    """n samples at a temperature (the prior's std scale; a diffusion model's z_1 and step noise), in [0, 1]."""
    make = lambda _, b: as_generated(model.sample(b, temperature), likelihood)  # noqa: E731
    return in_batches(make, n, batch, f"samples, temperature {temperature:g}", progress)


def reconstructions(model, x: Tensor, likelihood: str, batch: int = 500, progress: bool = True) -> Tensor:
    """Reconstructions of test images (model.reconstruct: from the posterior means; a diffusion model from
    z_0.5) in [0, 1]: [N, *data] -> [N, *data]."""
    device = model_device(model)
    make = lambda lo, b: as_generated(model.reconstruct(x[lo:lo + b].to(device)), likelihood)  # noqa: E731
    return in_batches(make, len(x), batch, "reconstructions", progress)


def training_images(data: Dataset, likelihood: str, n: int) -> Tensor:
    """n training images drawn without replacement (seeded), in the test images' representation, in [0, 1]."""
    gen = torch.Generator().manual_seed(SEED)
    pick = torch.randperm(len(data.train_x), generator=gen)[:n]
    return to_unit(data.train_x[pick], representation(likelihood), gen)


def measure(features: FeatureNetwork, test_f: Tensor, images: Tensor, **fields) -> dict:
    """The four distances of `images` to the test features, with the row's fields and its seconds."""
    start = time.perf_counter()
    row = quality.scores(test_f, features(images))
    return {**fields, **row, "n": len(images), "seconds": round(time.perf_counter() - start, 2)}


def sample_quality(model, data: Dataset, likelihood: str, n_samples: int = 10_000,
                   temperatures: Sequence[float] = (1.0,), references: bool = True, progress: bool = True,
                   run_dir: Path | None = None) -> dict:
    """Fréchet distance, KID, precision and recall of n_samples samples at each temperature against the test
    images, and the reference rows. -> the eval JSON's keys: those of the best temperature (lowest Fréchet
    distance) at the top level, `fid_curve` (one row per temperature), `fid_reference` (train, reconstructions).
    Appends every row to run_dir/sample-quality.jsonl when run_dir is given."""
    net = feature_network(data, representation(likelihood), progress=progress)
    test = to_unit_range(test_input(data.test_x, likelihood), likelihood)
    test_f = net(test)
    curve, reference = [], {}
    with torch.random.fork_rng(devices=[model_device(model)] if model_device(model).type == "cuda" else []):
        torch.manual_seed(SEED)
        for t in temperatures:
            start = time.perf_counter()
            images = draw_samples(model, n_samples, t, likelihood, progress=progress)
            curve.append(measure(net, test_f, images, row="samples", temperature=t,
                                 sampling_seconds=round(time.perf_counter() - start, 2)))
        if references:
            train = training_images(data, likelihood, min(n_samples, len(data.train_x)))
            reference["train"] = measure(net, test_f, train, row="train")
            start = time.perf_counter()
            recon = reconstructions(model, test, likelihood, progress=progress)
            reference["reconstructions"] = measure(net, test_f, recon, row="reconstructions",
                                                   sampling_seconds=round(time.perf_counter() - start, 2))
    if run_dir is not None:
        append_records(run_dir, [*curve, *reference.values()], net)
    best = min(curve, key=lambda r: r["fid"])
    result = {key: best[key] for key in ("fid", "kid", "kid_se", "precision", "recall")}
    result |= {"fid_samples": n_samples, "fid_temperature": best["temperature"], "fid_features": net.name,
               "fid_feature_accuracy": net.accuracy, "fid_curve": curve}
    return result | ({"fid_reference": reference} if reference else {})


def append_records(run_dir: Path, rows: list[dict], net: FeatureNetwork) -> None:
    """One line per row, with when and with which feature network (appended: earlier records stay)."""
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = "".join(json.dumps({**row, "features": net.name, "feature_key": net.key, "time": stamp}) + "\n"
                    for row in rows)
    try:
        with open(run_dir / RECORDS, "a") as f:  # one write: a crash leaves at most one torn last line
            f.write(lines)
    except OSError as e:  # a read-only run directory: the figures are still printed
        print(f"note: could not append to {run_dir / RECORDS} ({e.strerror or e}); the report will not show "
              "these figures", file=sys.stderr)


def latest_by_temperature(rows: list[dict]) -> tuple[list[dict], dict[str, dict]]:
    """(the latest sample row per temperature, by temperature; the latest reference row of each kind)."""
    samples = {r["temperature"]: r for r in rows if r.get("row") == "samples"}
    refs = {r["row"]: r for r in rows if r.get("row") in ("train", "reconstructions")}
    return [samples[t] for t in sorted(samples)], refs

