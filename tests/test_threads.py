"""The thread policy (hvae/threads.py): a pinned count is honoured; the measured count is the one the clock says
is fastest, and it is recorded; measuring leaves training exactly as it was; a fixed-mode resume uses the recorded
count; adaptive mode switches on a drift; DDP ranks never oversubscribe the cores.

The clock is faked (no wall-clock assertion): it advances by a cost that depends on the thread count at each
reading, so a probe timed between two readings "took" the cost of its count. conftest.py caps the policy at one
thread (OMP_NUM_THREADS=1) for the rest of the suite; `two_cores` lifts that cap here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hvae import checkpoint as ckpt
from hvae import threads
from hvae.cli import main
from hvae.config import Config, apply
from hvae.data import load_dataset
from hvae.loop import choose_threads, fit, launch, setup, training_split
from hvae.models import build_model
from hvae.state import TrainState
from hvae.threads import ThreadPolicy, candidates, fastest, same_results, thread_cap

TINY = {"model.hidden": [64, 32], "model.latent_dim": 4, "train.batch_size": 32, "optim.ema": 0.9}


def tiny_cfg(idx_dir: Path, **extra) -> Config:
    return apply(Config(), {**TINY, "data.data_dir": str(idx_dir.parent), "train.epochs": 2, **extra})


class FakeClock:
    """Advances by cost(n) seconds at each reading, n the thread count at that moment (`count`)."""

    def __init__(self, cost, count=torch.get_num_threads):
        self.cost, self.count, self.t = cost, count, 0.0

    def __call__(self) -> float:
        self.t += self.cost(self.count())
        return self.t


class VirtualThreads:
    """Stands in for torch.set_num_threads: records the counts the policy sets, while torch keeps computing with
    one thread (so a run's results cannot depend on them, whatever this CPU's kernels do)."""

    def __init__(self):
        self.now, self.history = 1, []

    def __call__(self, n: int) -> None:
        self.now = n
        self.history.append(n)


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)


def fake_clock(monkeypatch, cost, count=torch.get_num_threads) -> FakeClock:
    clock = FakeClock(cost, count)
    monkeypatch.setattr(threads, "perf_counter", clock)
    return clock


def ms(fast: int):
    """Cost per reading: 1 ms at `fast` threads, 3 ms at any other count."""
    return lambda n: 1e-3 if n == fast else 3e-3


def thread_records(run: Path) -> list[dict]:
    return [r["threads"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "threads" in r]


def provenance(run: Path) -> dict:
    return json.loads((run / "provenance.json").read_text())


def same_weights(a: Path, b: Path) -> bool:
    """Model and EMA weights of two runs' last checkpoints, bit for bit."""
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / "checkpoints/last" / name), load_file(b / "checkpoints/last" / name)
        if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
            return False
    return True


# --- pure functions -------------------------------------------------------------------------------------------

def test_ranks_times_threads_never_oversubscribe_the_cores():
    for cores in range(1, 33):
        for ranks in range(1, 9):
            cap = thread_cap(cores, ranks)
            assert cap >= 1 and (cap * ranks <= cores or cap == 1), (cores, ranks, cap)
    assert [thread_cap(8, 2), thread_cap(2, 2), thread_cap(3, 2), thread_cap(2, 4), thread_cap(2, 1)] == [4, 1, 1, 1, 2]
    # OMP_NUM_THREADS bounds each process after the sharing (Fabric's launcher already sets cores // ranks there)
    assert [thread_cap(16, 1, 4), thread_cap(16, 2, 4), thread_cap(4, 2, 8)] == [4, 4, 2]
    assert [candidates(n) for n in (1, 2, 3, 6, 8)] == [[1], [1, 2], [1, 2, 3], [1, 2, 4, 6], [1, 2, 4, 8]]


def test_omp_num_threads_is_read_as_a_cap_only_when_it_is_a_positive_count(monkeypatch):
    for value, want in (("3", 3), (" 2 ", 2), ("0", None), ("many", None), ("", None)):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert threads.omp_limit() == want, value
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.omp_limit() is None


def test_the_fastest_count_wins_and_fewer_threads_win_a_tie_within_noise():
    assert fastest({1: 3.0, 2: 1.0}) == 2 and fastest({1: 1.0, 2: 3.0}) == 1
    assert fastest({1: 1.01, 2: 1.0, 4: 0.5}) == 4
    assert fastest({1: 1.01, 2: 1.0}) == 1  # 1% apart: noise; one thread leaves a core to the machine


def test_a_count_far_slower_after_the_first_round_is_not_timed_again():
    calls = []

    def probe(keep: bool) -> None:
        calls.append(torch.get_num_threads())

    seconds = threads.time_counts(probe, [1, 2], FakeClock(ms(1)))
    assert seconds == {1: pytest.approx(1e-3), 2: pytest.approx(3e-3)}
    assert calls.count(1) == threads.ROUNDS * (1 + threads.PASSES) and calls.count(2) == 1 + threads.PASSES
    calls.clear()  # 10x slower already on its first pass: not timed further (its first pass is its figure)
    assert threads.time_counts(probe, [1, 2], FakeClock(lambda n: 1e-3 if n == 1 else 10e-3))[2] == pytest.approx(1e-2)
    assert calls.count(2) == 1


def test_the_determinism_check_needs_bitwise_equal_outputs_at_every_count():
    assert same_results(lambda keep: [torch.tensor(0.1), torch.ones(3)], [1, 2])
    # an output that depends on the count (as a split reduction's last bits may), and a NaN: both "fixed"
    assert not same_results(lambda keep: [torch.tensor(0.1 * torch.get_num_threads())], [1, 2])
    assert not same_results(lambda keep: [torch.tensor(float("nan"))], [1, 2])


# --- training -------------------------------------------------------------------------------------------------

def test_a_pinned_count_is_honoured_and_nothing_is_measured(idx_dir, tmp_path, two_cores, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a pinned count was measured")

    monkeypatch.setattr(threads, "time_counts", refuse)
    monkeypatch.setattr(threads, "same_results", refuse)
    run = tmp_path / "run"
    fit(tiny_cfg(idx_dir, **{"train.epochs": 1, "runtime.threads": 2}), run, progress=False)
    assert torch.get_num_threads() == 2
    assert provenance(run)["torch_threads"] == 2 and provenance(run)["thread_policy"]["mode"] == "pinned"
    assert thread_records(run) == []  # nothing was chosen
    assert ckpt.load_state(ckpt.checkpoint_dir(run))["threads"] == {"count": 2, "mode": "pinned"}


@pytest.mark.parametrize("fast", [1, 2])
def test_the_policy_keeps_the_count_the_clock_says_is_fastest_and_records_why(idx_dir, tmp_path, two_cores,
                                                                              monkeypatch, fast):
    fake_clock(monkeypatch, ms(fast))
    run = tmp_path / "run"
    fit(tiny_cfg(idx_dir, **{"train.epochs": 1}), run, progress=False)
    (record,) = thread_records(run)
    assert record["chosen"] == fast and record["tried"] == [1, 2]
    assert record["ms_per_pass"] == {"1": 1.0 if fast == 1 else 3.0, "2": 1.0 if fast == 2 else 3.0}
    assert record["mode"] in ("fixed", "adaptive") and record["reason"].startswith("start")
    info = provenance(run)
    assert info["torch_threads"] == fast and info["thread_policy"]["count"] == fast
    assert info["thread_policy"]["ms_per_pass"] == record["ms_per_pass"] and info["thread_policy"]["cap"] == 2
    assert ckpt.load_state(ckpt.checkpoint_dir(run))["threads"]["count"] == fast


def test_measuring_leaves_weights_gradients_buffers_and_rng_streams_as_they_were(idx_dir, two_cores, monkeypatch):
    """The throwaway passes, run as fit runs them, on a model with batch-norm buffers and with gradients already
    present: nothing of the training state moves."""
    fake_clock(monkeypatch, ms(1))
    cfg = apply(Config(), {"model.name": "ladder", "model.levels": 2, "model.hidden": [32], "model.level_hidden": [16],
                           "model.latent_dim": 4, "model.norm": "batch", "train.batch_size": 32,
                           "data.data_dir": str(idx_dir.parent)})
    fabric = launch(cfg.runtime)
    data = load_dataset(cfg.data.dataset, cfg.data.data_dir)
    train_x, _, steps = training_split(cfg, data, fabric)
    model = build_model(cfg.model, data.data_shape)
    state = TrainState(torch.Generator().manual_seed(1), fabric.device)
    objective, guard, _ = setup(fabric, cfg, model, state, None, None)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params[::2]:
        p.grad = torch.randn_like(p)
    before = ({k: v.clone() for k, v in model.state_dict().items()}, [None if p.grad is None else p.grad.clone()
                                                                        for p in params],
              torch.get_rng_state(), state.data_gen.get_state(), guard.raw.state_dict())
    assert any("running_mean" in k for k in before[0])  # the buffers a forward in training mode would move
    policy, _ = choose_threads(cfg, fabric, objective, model, params, train_x, state, steps, resume=False)
    assert set(policy.info["ms_per_pass"]) == {"1", "2"}  # it did measure
    weights, grads, rng, data_rng, optimizer = before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, params))
    assert torch.equal(rng, torch.get_rng_state()) and torch.equal(data_rng, state.data_gen.get_state())
    assert guard.raw.state_dict() == optimizer


def test_a_measured_run_trains_exactly_as_a_run_pinned_to_the_count_it_chose(idx_dir, tmp_path, two_cores,
                                                                             monkeypatch):
    fake_clock(monkeypatch, ms(1))
    fit(tiny_cfg(idx_dir), tmp_path / "measured", progress=False)
    assert thread_records(tmp_path / "measured")[0]["chosen"] == 1
    fit(tiny_cfg(idx_dir, **{"runtime.threads": 1}), tmp_path / "pinned", progress=False)
    assert same_weights(tmp_path / "measured", tmp_path / "pinned")


def test_fixed_mode_resumes_with_the_recorded_count_and_equals_the_uninterrupted_run(idx_dir, tmp_path, two_cores,
                                                                                     monkeypatch):
    monkeypatch.setattr(threads, "same_results", lambda probe, counts: False)  # fixed, whatever this CPU does
    clock = fake_clock(monkeypatch, ms(2))
    full = tiny_cfg(idx_dir)
    fit(full, tmp_path / "straight", progress=False)
    fit(apply(full, {"train.epochs": 1}), tmp_path / "resumed", progress=False)
    clock.cost = ms(1)  # a new measurement would now choose one thread
    fit(full, tmp_path / "resumed", resume=True, progress=False)
    start, resumed = thread_records(tmp_path / "resumed")
    assert start["chosen"] == 2 and start["mode"] == "fixed"
    assert resumed["chosen"] == 2 and resumed["reason"].startswith("resumed") and resumed["ms_per_pass"] == {}
    assert torch.get_num_threads() == 2
    assert same_weights(tmp_path / "straight", tmp_path / "resumed")


def test_a_checkpoint_from_before_the_policy_resumes_with_the_count_it_was_trained_with(idx_dir, tmp_path,
                                                                                       monkeypatch):
    full = tiny_cfg(idx_dir)
    fit(full, tmp_path / "straight", progress=False)  # one thread: the cap conftest sets
    run = tmp_path / "old"
    fit(apply(full, {"train.epochs": 1}), run, progress=False)
    state_json = run / "checkpoints/last/state.json"
    meta = json.loads(state_json.read_text())
    del meta["state"]["__dict__"]["threads"]  # as hvae wrote it before the thread policy
    state_json.write_text(json.dumps(meta))
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "same_results", lambda probe, counts: False)
    fake_clock(monkeypatch, ms(2))  # a measurement would choose two threads
    fit(full, run, resume=True, progress=False)
    (record,) = thread_records(run)
    assert record["chosen"] == 1 and "older than the thread policy" in record["reason"]
    assert same_weights(tmp_path / "straight", run)


def test_adaptive_mode_switches_when_the_step_time_drifts_and_trains_as_a_pinned_run(idx_dir, tmp_path, two_cores,
                                                                                     monkeypatch):
    # Virtual counts: torch keeps one thread, so equal weights show that measuring and switching themselves leave
    # training unchanged (whether this CPU's results depend on the count is what the determinism check finds).
    virtual = VirtualThreads()
    monkeypatch.setattr(threads, "set_threads", virtual)
    monkeypatch.setattr(threads, "same_results", lambda probe, counts: True)
    monkeypatch.setattr(threads, "WINDOW", 4)
    monkeypatch.setattr(threads, "MIN_GAP", 8)
    busy = {"on": False}  # from step 16 on, another process takes a core: two threads get 10x slower
    fake_clock(monkeypatch, lambda n: (10e-3 if n == 2 else 2e-3) if busy["on"] else (1e-3 if n == 2 else 2e-3),
               lambda: virtual.now)
    tick = ThreadPolicy.tick

    def tick_and_load(self, step):
        busy["on"] = step >= 16
        return tick(self, step)

    monkeypatch.setattr(ThreadPolicy, "tick", tick_and_load)
    run = tmp_path / "adaptive"
    fit(tiny_cfg(idx_dir, **{"train.epochs": 4}), run, progress=False)
    start, switch = thread_records(run)
    assert start["chosen"] == 2 and start["mode"] == "adaptive"
    assert switch["chosen"] == 1 and switch["previous"] == 2 and switch["reason"].startswith("drift")
    assert switch["ms_per_pass"] == {"1": 2.0, "2": 10.0}
    assert virtual.now == 1 and ckpt.load_state(ckpt.checkpoint_dir(run))["threads"] == {"count": 1, "mode": "adaptive"}
    fit(tiny_cfg(idx_dir, **{"train.epochs": 4, "runtime.threads": 1}), tmp_path / "pinned", progress=False)
    assert same_weights(run, tmp_path / "pinned")


def test_adaptive_remeasures_at_most_once_per_min_gap_and_after_recheck_steps(monkeypatch):
    virtual = VirtualThreads()
    monkeypatch.setattr(threads, "set_threads", virtual)
    monkeypatch.setattr(threads, "WINDOW", 2)
    monkeypatch.setattr(threads, "MIN_GAP", 10)
    monkeypatch.setattr(threads, "RECHECK", 30)
    cost = {"scale": 1.0}
    clock = FakeClock(lambda n: cost["scale"] * (1e-3 if n == 2 else 2e-3), lambda: virtual.now)
    policy = ThreadPolicy(0, 2, clock=clock)
    assert policy.start(lambda keep: [torch.zeros(1)])["threads"]["mode"] == "adaptive"
    ticks = {}
    for step in range(1, 61):
        cost["scale"] = 5.0 if step >= 5 else 1.0  # a drift from step 5 on (then steady)
        ticks[step] = policy.tick(step)
    measured = {step: r["threads"]["reason"].split(":")[0].split(" ")[0] for step, r in ticks.items() if r}
    # baseline at step 4; the drift is seen at 6 but waits for MIN_GAP (step 10); then the new baseline holds until
    # RECHECK steps after that measurement
    assert measured == {10: "drift", 40: "recheck"}


def test_ddp_ranks_decide_on_the_mean_of_their_timings():
    """Every rank acts on the same figures (agree: the all-reduced mean), so all ranks choose the same count even
    where their own clocks disagree."""
    seen = []

    def agree(t):
        seen.append(t.clone())
        return t if len(t) == 1 else torch.tensor([1e-3, 3e-3], dtype=torch.float64)  # the ranks' mean: 1 is faster

    policy = ThreadPolicy(0, 2, clock=FakeClock(ms(2)), agree=agree)  # this rank alone would choose 2
    record = policy.start(lambda keep: [torch.zeros(1)])
    # the determinism flag, then the timings after each round (the second round times count 1 only: 2 was pruned)
    assert record["threads"]["chosen"] == 1 and len(seen) == 1 + threads.ROUNDS


def test_ddp_ranks_measure_in_step_and_stay_in_step(idx_dir, tmp_path):
    """Two gloo ranks with a cap of 2 threads each (4 cores pretended; Fabric's OMP_NUM_THREADS ignored): the
    measurement's collectives (the determinism flag, the timings after each round) pair up, so the run neither hangs
    nor lets the ranks' weights part."""
    import os
    import subprocess
    import sys

    script = tmp_path / "four_cores.py"
    script.write_text("import sys\nfrom hvae import threads\nthreads.available_cores = lambda: 4\n"
                      "threads.omp_limit = lambda: None\nfrom hvae.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    run = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, str(script), "train", "--data-dir", str(idx_dir.parent), "--epochs", "2",
                           "--batch-size", "64", "--set", "model.hidden=[32]", "--set", "model.latent_dim=4",
                           "--no-progress", "--device", "cpu", "--devices", "2", "--strategy", "ddp",
                           "--out", str(run)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record,) = thread_records(run)
    assert record["tried"] == [1, 2] and provenance(run)["thread_policy"]["cap"] == 2
    epochs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_elbo" in r]
    assert [r["rank_weight_gap"] for r in epochs] == [0.0, 0.0]


# --- evaluation and bad input ---------------------------------------------------------------------------------

def test_eval_measures_once_unless_the_run_pins_its_threads(idx_dir, tmp_path, monkeypatch, capsys):
    data = ["--data-dir", str(idx_dir.parent), "--set", "model.hidden=[32]", "--set", "model.latent_dim=4",
            "--batch-size", "32", "--epochs", "1", "--no-progress"]
    assert main(["train", *data, "--out", str(tmp_path / "measured")]) == 0
    assert main(["train", *data, "--set", "runtime.threads=1", "--out", str(tmp_path / "pinned")]) == 0
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    fake_clock(monkeypatch, ms(2))
    capsys.readouterr()
    evaluate = ["--k", "4", "--limit", "16", "--json", "--no-progress"]
    assert main(["eval", str(tmp_path / "measured"), *evaluate]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["threads"] == 2 and "hvae eval: 2 thread(s)" in err and "1 -> 3.0 ms" in err

    def refuse(*args, **kwargs):
        raise AssertionError("a pinned run's evaluation was measured")

    monkeypatch.setattr(threads, "time_counts", refuse)
    assert main(["eval", str(tmp_path / "pinned"), *evaluate]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["threads"] == 1 and "thread(s)" not in err
    assert main(["eval", str(tmp_path / "measured"), *evaluate, "--threads", "3"]) == 0  # --threads pins it here
    out, err = capsys.readouterr()
    assert json.loads(out)["threads"] == 3 and "thread(s)" not in err


def test_a_negative_thread_count_is_one_line_of_bad_input(idx_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data-dir", str(idx_dir.parent), "--epochs", "1", "--no-progress", "--out", str(out),
                 "--set", "runtime.threads=-1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "runtime.threads" in err and "Traceback" not in err
    assert not out.exists()
