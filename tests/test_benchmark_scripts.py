"""The benchmark scripts' bookkeeping (no training): curve milestones and the points they read back."""

from __future__ import annotations

import importlib.util
import os
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hierarchy():
    spec = importlib.util.spec_from_file_location("hierarchy", ROOT / "benchmarks" / "hierarchy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_curve_job_trains_once_then_resumes_and_evaluates_at_every_milestone(hierarchy, tmp_path):
    cmds = [" ".join(c) for c in hierarchy.curve_job("flat-vae", tmp_path, 3, [1, 5, 20], {20}, 1000, 2000)]
    trains = [c for c in cmds if " train " in c]
    assert len(trains) == 3 and "--out" in trains[0] and "train.seed=3" in trains[0]
    assert all(f"--resume {tmp_path}" in c for c in trains[1:]) and trains[2].endswith("--epochs 20 --no-progress")
    evals = [c for c in cmds if " eval " in c]
    assert [c.rsplit("/", 1)[1] for c in evals] == ["eval-e1.json", "eval-e5.json", "eval-e20.json", "eval-e20-full.json"]
    assert all("--limit 2000" in c for c in evals[:3]) and "--limit" not in evals[3]


def test_curve_stages_end_nearest_the_training_budget():
    spec = importlib.util.spec_from_file_location("curve", ROOT / "benchmarks" / "curve.py")
    curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curve)
    inf = float("inf")
    assert curve.next_stage(0, 20, 0.0, 1800.0) == 20 and curve.next_stage(60, 20, 1303.0, inf) == 20
    assert curve.next_stage(60, 20, 1303.0, 1800.0) == 20  # 21.7 s an epoch: 20 more end at 1737 s, before it
    assert curve.next_stage(80, 20, 1750.0, 1800.0) == 2  # 21.9 s an epoch: 2 more end at 1794 s
    assert curve.next_stage(82, 20, 1795.0, 1800.0) == 0  # the nearest end is here
    assert curve.next_stage(10, 5, 2000.0, 1800.0) == 0  # already past it


def test_curve_points_pair_each_evaluation_with_its_epoch_and_seconds(hierarchy, tmp_path):
    run = tmp_path / "flat-vae"
    run.mkdir()
    lines = [{"step": 10, "epoch": 0.5, "loss": 1.0}] + [{"epoch": e, "epoch_seconds": 2.0} for e in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (run / "eval-e1.json").write_text(json.dumps({"iw_nll": 250.0}) + "\n")
    (run / "eval-e3.json").write_text(json.dumps({"iw_nll": 240.0}) + "\n")
    (run / "eval-e2.json").write_text("")  # still being written: skipped
    assert hierarchy.curve_points(run) == [(1, 2.0, 250.0), (3, 6.0, 240.0)]
    assert hierarchy.curve_points(run, sec_per_epoch=5.0) == [(1, 5.0, 250.0), (3, 15.0, 240.0)]
    assert hierarchy.plot_curves([run], {"flat-vae": 5.0}).exists()


def test_throughput_script_runs_end_to_end_and_reports_paired_ratios(idx_dir, tmp_path):
    """benchmarks/throughput.py on a tiny IDX folder: every row present, paired ratios, no FLOP figure for a variant
    of another model (timings themselves are not checked: benchmarks are scripts, not tests)."""
    import subprocess
    import sys

    out = tmp_path / "t.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--data-dir", str(idx_dir.parent), "--repeats", "2",
           "--steps", "2", "--batch", "16", "--eval-images", "2", "--k", "4", "--threads", "1", "--lean",
           "--variant", "model.arch=conv", "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    rows = {r["what"]: r for r in result["rows"]}
    assert set(rows) == {"train bare loop", "train lean loop (bare + fused Adam + integer binarization)",
                         "train hvae (default)", "train hvae model.arch=conv", "eval hvae", "eval bare"}
    assert rows["train bare loop"]["paired_ratio_median"] == 1.0
    assert rows["train hvae model.arch=conv"]["gflops"] is None and rows["train hvae (default)"]["gflops"] > 0
    assert all(len(result["raw"][name[len("train "):]]) == 2 for name in rows if name.startswith("train "))
    assert result["device"] == "cpu"


def test_guard_sync_script_runs_both_guards_and_they_train_alike(idx_dir):
    """benchmarks/guard_sync.py on a tiny IDX folder: both ways of guarding the update are timed, and on a CPU the two
    runs end with the same weights bit for bit."""
    import subprocess
    import sys

    cmd = [sys.executable, str(ROOT / "benchmarks" / "guard_sync.py"), "--data-dir", str(idx_dir.parent), "--repeats",
           "1", "--steps", "2", "--batch", "16", "--threads", "1"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
    assert "host-side guard (a sync per step)" in out and "device-side guard (no sync)" in out
    assert "the host-side guard" in out  # the default on a CPU
    assert out.strip().endswith("largest gap between the two runs' final weights: 0")


def test_curve_script_trains_in_stages_and_records_the_vdm_bound_per_stage(idx_dir, tmp_path):
    import subprocess
    import sys

    run = tmp_path / "vdm"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "curve.py"), "--out", str(run), "--every", "1", "--epochs", "2",
           "--limit", "16", "--passes", "2", "--draws", "2", "--", "--model", "vdm", "--data-dir", str(idx_dir.parent),
           "--batch-size", "64", "--set", "model.hidden=[32]", "--set", "runtime.threads=1"]
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=300).returncode == 0
    lines = [json.loads(line) for line in (run / "curve.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and lines[1]["train_seconds"] > lines[0]["train_seconds"] > 0
    assert all("elbo_se" in r and "iw_nll" not in r and r["n_images"] == 16 for r in lines)  # a VLB, named as such
    variance = [sys.executable, str(ROOT / "benchmarks" / "vdm_variance.py"), str(run), "--images", "4", "--draws", "3"]
    table = subprocess.run(variance, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr[-2000:]
    assert table.stdout.count("\n| ") == 6  # header row + five estimators
    # Sample quality of the same diffusion model (its sampler, reconstructions and the reference rows), in a
    # throwaway feature-network cache.
    quality = [sys.executable, str(ROOT / "benchmarks" / "sample_quality.py"), str(run), "--samples", "40",
               "--temperatures", "0.8,1", "--threads", "1", "--time-features", "--json", str(tmp_path / "q.json")]
    env = {**os.environ, "HVAE_CACHE": str(tmp_path / "cache")}
    table = subprocess.run(quality, capture_output=True, text=True, timeout=300, env=env)
    assert table.returncode == 0, table.stderr[-2000:]
    assert table.stdout.count("\n| vdm |") == 4  # two temperatures, training images, reconstructions
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["runs"]["vdm"]["fid_samples"] == 40 and report["features"]["seconds"] > 0
    assert len((run / "sample-quality.jsonl").read_text().splitlines()) == 4
    # The tail of the per-draw losses, as trained and bounded.
    tails = [sys.executable, str(ROOT / "benchmarks" / "vdm_tails.py"), str(run), "--images", "8", "--draws", "2",
             "--bounds", "0,10"]
    table = subprocess.run(tails, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr[-2000:]
    assert table.stdout.count("\n| ") == 3 and "of 16 |" in table.stdout  # header + two bounds; 8 x 2 draws
    # Evaluation time of the VLB beside a VAE's IW-NLL, in one process.
    vae = tmp_path / "vae"
    train = [sys.executable, "-m", "hvae", "train", "--epochs", "1", "--data-dir", str(idx_dir.parent), "--out", str(vae),
             "--batch-size", "64", "--no-progress", "--set", "runtime.threads=1"]
    assert subprocess.run(train, capture_output=True, text=True, timeout=300).returncode == 0
    timing = [sys.executable, str(ROOT / "benchmarks" / "eval_time.py"), "--vae", str(vae), "--vdm", str(run), "--k", "4",
              "--passes", "2", "--draws", "2", "--repeats", "2", "--threads", "1", "--limit", "20", "--json",
              str(tmp_path / "t.jsonl")]
    out = subprocess.run(timing, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["vae_seconds"] > 0 and r["vdm_seconds"] > 0 and r["vdm_vlb_se"] > 0 for r in rows)
    assert rows[0]["vae_iw_nll"] == rows[1]["vae_iw_nll"] and rows[0]["vdm_vlb"] == rows[1]["vdm_vlb"]  # seeded


def test_busy_script_times_the_contenders_beside_a_spinner_and_stops_it(idx_dir, tmp_path):
    """benchmarks/busy.py on a tiny IDX folder, one busy level, hvae with its policy and the bare loop: a row per
    contender with its times, the loads and the policy's choice; the spinner it started is gone afterwards (timings
    are not checked)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "busy.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "busy.py"), "--data-dir", str(idx_dir.parent), "--epochs", "1",
           "--repeats", "1", "--busy", "1", "--rows", "policy", "bare2-passive", "--batch-size", "64",
           "--set", "model.hidden=[32]", "--spin-warm-up", "0", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    medians = {m["row"]: m for m in result["medians"]}
    assert set(medians) == {"policy", "bare2-passive"} and all(m["busy"] == 1 for m in medians.values())
    assert all(m["process_s"] > m["epoch_s"] > 0 and len(m["load_before"]) == len(m["load_after"]) == 1
               for m in medians.values())
    if len(os.sched_getaffinity(0)) > 1:  # with one core the policy has nothing to choose
        assert medians["policy"]["chosen"] and medians["bare2-passive"]["chosen"] == []
    assert "| busy processes | contender |" in proc.stdout and result["cpu"]
    for pid in result["spinner_pids"]["1"]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_busy_summary_compares_the_policy_with_the_best_pinned_count_and_todays_default():
    spec = importlib.util.spec_from_file_location("busy", ROOT / "benchmarks" / "busy.py")
    busy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(busy)
    seconds = {(0, "policy"): [10, 12, 11], (0, "pinned1"): [14, 14, 15], (0, "pinned2"): [10, 10, 9],
               (1, "policy"): [15, 14, 16], (1, "pinned1"): [14, 13, 14], (1, "pinned2"): [30, 28, 35]}
    runs = [{"row": row, "busy": b, "process_s": s, "epoch_s": [s / 4, s / 5], "load_before": 1.0, "load_after": 2.0,
             "threads": [{"chosen": 1 if b else 2}] if row == "policy" else []}
            for (b, row), values in seconds.items() for s in values]
    medians, table = busy.summarize(runs, ["policy", "pinned1", "pinned2"], [0, 1], default_threads=2)
    assert [(m["busy"], m["row"], m["process_s"], m["chosen"]) for m in medians][:3] == \
        [(0, "policy", 11, [2]), (0, "pinned1", 14, []), (0, "pinned2", 10, [])]
    summary = table.split("\n\n")[1].splitlines()
    assert summary[2] == "| 0 | 1.10 | 0.91x |" and summary[3] == "| 1 | 1.07 | 2.00x |"  # 11/10, 10/11; 15/14, 30/15


def test_curve_script_run_again_continues_the_run_and_its_curve(idx_dir, tmp_path):
    """A second call on the same --out resumes from the run's last epoch (here after a stop mid-stage: the run at
    epoch 3 with the curve at 2), evaluates that epoch, then ends stages on multiples of --every."""
    import subprocess
    import sys

    run = tmp_path / "vae"
    curve = [sys.executable, str(ROOT / "benchmarks" / "curve.py"), "--out", str(run), "--every", "2", "--limit", "8",
             "--k", "2"]
    train = ["--data-dir", str(idx_dir.parent), "--batch-size", "64", "--set", "model.hidden=[32]", "--set",
             "model.latent_dim=2", "--set", "runtime.threads=1"]
    assert subprocess.run([*curve, "--epochs", "2", "--", *train], capture_output=True, timeout=300).returncode == 0
    more = [sys.executable, "-m", "hvae", "train", "--resume", str(run), "--epochs", "3", "--no-progress"]
    assert subprocess.run(more, capture_output=True, timeout=300).returncode == 0  # as if stopped during a stage
    out = subprocess.run([*curve, "--epochs", "6"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in (run / "curve.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [2, 3, 4, 6]
    assert all(b["train_seconds"] > a["train_seconds"] for a, b in zip(lines, lines[1:]))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "epoch_seconds" in r] == [1, 2, 3, 4, 5, 6]


def test_conv_script_configurations_are_valid_and_build_at_the_resolutions_they_claim():
    """Every benchmarks/conv.py configuration is a config hvae accepts; the spatial ones build the ladder's spatial
    form with latents at 14x14 and 7x7 (the conv flat VAE at 7x7 only), the baseline the vector conv ladder."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("conv_bench", ROOT / "benchmarks" / "conv.py")
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    from hvae.config import Config, apply, load_yaml, parse_set
    from hvae.models import build_model

    for name, args in conv.SPECS.items():
        updates = {}
        for flag, value in zip(args[::2], args[1::2]):
            updates.update(load_yaml(ROOT / value) if flag == "--config" else parse_set([value]))
        model = build_model(apply(Config(), updates).model, (1, 28, 28))
        if name == "conv-ladder":
            assert type(model).__name__ == "LadderVAE" and model.latent_dims == (32, 16)
            continue
        assert type(model).__name__ == "SpatialLadder", name
        sizes = set(model.latent_dims) - {32}  # 8 channels at 14x14 (level 1) and at 7x7; a vector top of 32
        variant = name.startswith("bc-")  # best-conv's variants: its groups at 7x7 and its vector top
        at_7 = variant or name in ("conv-flat-map", "sp-res-03", "sp-03-vtop-dec", "best-conv")
        assert sizes == (set() if name == "conv-flat" else {8 * 49} if at_7 else {8 * 196, 8 * 49}), name
        assert (32 in model.latent_dims) == (variant or name in ("sp-res-vtop", "sp-03-vtop-dec", "best-conv",
                                                                 "conv-flat"))
        if name == "bc-02":  # the third 7x7 group dropped
            assert model.latent_dims == (8 * 49, 8 * 49, 32)
    assert conv.SPECS["conv-flat"] and build_model(apply(Config(), load_yaml(ROOT / "configs/conv-flat.yaml")).model,
                                                    (1, 28, 28)).latent_dims == (32,)  # one vector level


def test_conv_plot_reads_the_budget_curves(tmp_path):
    """conv.py plot: the points of curve.py's curve.jsonl (epoch, training seconds, IW-NLL), and the figure."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("conv_bench", ROOT / "benchmarks" / "conv.py")
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    for name, base in (("a", 230.0), ("b", 228.0)):
        (tmp_path / name).mkdir()
        lines = [{"epoch": e, "train_seconds": 50.0 * e, "wall_minutes": e, "iw_nll": base - e / 10, "k": 100,
                  "n_images": 1000} for e in (10, 20)]
        (tmp_path / name / "curve.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert conv.budget_points(tmp_path / "b") == [(10, 500.0, 227.0), (20, 1000.0, 226.0)]
    conv.plot_budget([tmp_path / "a", tmp_path / "b"], tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 10_000


def test_iw_parts_evaluates_missing_parts_only_and_combines_them_as_one_evaluation(idx_dir, tmp_path):
    """benchmarks/iw_parts.py: each part is evaluate() on its slice with its index as seed; a part deleted (a stop)
    is the only one evaluated again, to the same figure; the combination is the size-weighted mean, with active units
    from the k = 1 pass over all images."""
    import subprocess
    import sys

    import hvae
    from hvae.data import test_set
    from hvae.evaluate import evaluate

    run = tmp_path / "vae"
    train = [sys.executable, "-m", "hvae", "train", "--data-dir", str(idx_dir.parent), "--epochs", "1", "--batch-size",
             "64", "--set", "model.hidden=[32]", "--set", "model.latent_dim=2", "--set", "runtime.threads=1",
             "--out", str(run), "--no-progress"]
    assert subprocess.run(train, capture_output=True, timeout=300).returncode == 0
    parts = [sys.executable, str(ROOT / "benchmarks" / "iw_parts.py"), str(run), "--k", "4", "--part-size", "24"]
    first = subprocess.run(parts, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    folder = run / "iw-k4"
    written = {p.name: p.stat().st_mtime_ns for p in folder.glob("part-*.json")}
    assert sorted(written) == ["part-0.json", "part-1.json", "part-2.json"]  # 64 test images: 24 + 24 + 16
    (folder / "part-1.json").unlink()
    again = subprocess.run(parts, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stderr.count("part ") == 1, again.stderr[-2000:]
    assert (folder / "part-0.json").stat().st_mtime_ns == written["part-0.json"]
    combined = json.loads(again.stdout.splitlines()[-1])
    before = json.loads(first.stdout.splitlines()[-1])
    assert {k: v for k, v in combined.items() if k != "seconds"} == {k: v for k, v in before.items() if k != "seconds"}

    model = hvae.load(run)
    x, _ = test_set("fashion-mnist", idx_dir.parent, "bernoulli")
    direct = [evaluate(model, x[lo:lo + 24], k=4, seed=i, progress=False) for i, lo in enumerate(range(0, 64, 24))]
    assert [d["n_images"] for d in direct] == [24, 24, 16]
    assert combined["iw_nll"] == pytest.approx(sum(d["iw_nll"] * d["n_images"] for d in direct) / 64, rel=1e-12)
    assert combined["kl_per_level"][0] == pytest.approx(sum(d["kl"] * d["n_images"] for d in direct) / 64, rel=1e-9)
    assert combined["complete"] and combined["n_images"] == 64 and combined["parts"] == 3 and combined["iw_nll_se"] > 0
    assert combined["active_units"] == evaluate(model, x, k=1, progress=False)["active_units"]
