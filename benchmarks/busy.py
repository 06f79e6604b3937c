"""Training speed on a busy machine (issue 18): `hvae train` with its thread policy (runtime.threads=0) against
hvae pinned at 1 and 2 threads and the bare PyTorch loop (benchmarks/bare.py) at 1 and 2 threads, beside 0, 1 and
2 busy background processes.

    python benchmarks/busy.py [--epochs 2] [--repeats 3] [--busy 0 1 2] [--rows policy pinned1 pinned2 bare1 bare2]
                              [--data-dir DIR] [--json FILE]

The busy processes are single-threaded pure-CPU spinners (`while True: pass`) that this script starts before a busy
level and stops after it (always, in a finally). Every contender is its own process, started as a user starts it,
with OMP_NUM_THREADS removed from its environment (the policy would read it as a cap); within a repeat the
contenders alternate. Per run: the whole process's wall time (start-up, data loading, the policy's measurement and
checkpoints included) and the median of its per-epoch times (hvae: metrics.jsonl epoch_seconds; the bare loop: its
own clock around each epoch), the load average before and after. The table shows medians over --repeats.
"today's default" is hvae pinned at PyTorch's default count (one thread per core: the count before the policy).
With the defaults (the default VAE, 2 epochs, 3 repeats, 5 rows, 3 busy levels) it takes about 15-20 minutes on
a 2-core machine; --rows and --busy choose a subset.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
from hvae.rundir import cpu_name  # noqa: E402  (the CPU's model name, as lscpu's "Model name")
ROWS = {"policy": "hvae, thread policy (default)", "pinned1": "hvae, 1 thread", "pinned2": "hvae, 2 threads",
        "bare1": "bare loop, 1 thread", "bare2": "bare loop, 2 threads",
        "bare2-passive": "bare loop, 2 threads, OMP_WAIT_POLICY=PASSIVE"}


def load() -> float:
    return os.getloadavg()[0]


def start_spinners(spinners: list[subprocess.Popen], n: int, warm_up: float) -> None:
    """n single-threaded busy loops, appended to `spinners` one by one (so a finally can stop any started)."""
    for _ in range(n):
        spinners.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
    time.sleep(warm_up if n else 0)  # let the scheduler see them (and the load average begin to)


def stop_spinners(spinners: list[subprocess.Popen]) -> None:
    for p in spinners:
        p.kill()
    for p in spinners:
        p.wait()


def clean_env() -> dict:
    """This environment without the OpenMP settings a contender must not inherit (the policy reads
    OMP_NUM_THREADS as its cap; PyTorch's default count too)."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}


def command(row: str, run: Path, args) -> tuple[list[str], dict]:
    """The command line and environment of one contender."""
    env = clean_env()
    data = ["--data-dir", str(args.data_dir)] if args.data_dir else []
    if row.startswith("bare"):
        env.update({"OMP_WAIT_POLICY": "PASSIVE"} if row.endswith("passive") else {})
        threads = row[len("bare")]
        return [sys.executable, __file__, "--bare-worker", threads, "--epochs", str(args.epochs), "--batch-size",
                str(args.batch_size), *data], env
    pinned = [] if row == "policy" else ["--set", f"runtime.threads={row[len('pinned'):]}"]
    return [sys.executable, "-m", "hvae", "train", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--no-progress", "--out", str(run), *data, *pinned, *args.set], env


def run_once(row: str, busy: int, repeat: int, args) -> dict:
    """One contender's process: its wall time, per-epoch times, load before and after, the policy's choices."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd, env = command(row, Path(tmp) / "run", args)
        before, t0 = load(), time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds, after = time.perf_counter() - t0, load()
        if proc.returncode != 0:
            raise SystemExit(f"{row} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        if row.startswith("bare"):
            epochs, choices = json.loads(proc.stdout.strip().splitlines()[-1])["epoch_seconds"], []
        else:
            records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
            epochs = [r["epoch_seconds"] for r in records if "epoch_seconds" in r]
            choices = [r["threads"] for r in records if "threads" in r]
    result = {"row": row, "busy": busy, "repeat": repeat, "process_s": seconds, "epoch_s": epochs,
              "load_before": before, "load_after": after, "threads": choices}
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def bare_worker(args) -> None:
    """The bare loop as its own process: data, model, `--epochs` epochs at --bare-worker threads; prints its
    per-epoch seconds as JSON."""
    import torch

    sys.path.insert(0, str(HERE))
    from bare import BareVAE, bare_epoch

    from hvae.data import load_dataset

    torch.set_num_threads(args.bare_worker)
    torch.manual_seed(0)
    flat = load_dataset("fashion-mnist", args.data_dir).train_x.reshape(-1, 784)
    model = BareVAE()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    seconds = []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        bare_epoch(model, opt, flat, args.batch_size)
        seconds.append(time.perf_counter() - t0)
    print(json.dumps({"epoch_seconds": seconds}))


def summarize(runs: list[dict], rows: list[str], levels: list[int], default_threads: int) -> tuple[list[dict], str]:
    """Medians per (busy level, row), and the markdown tables."""
    medians = []
    for busy in levels:
        for row in rows:
            mine = [r for r in runs if r["row"] == row and r["busy"] == busy]
            chosen = sorted({c["chosen"] for r in mine for c in r["threads"]})
            medians.append({"busy": busy, "row": row, "process_s": statistics.median(r["process_s"] for r in mine),
                            "epoch_s": statistics.median(statistics.median(r["epoch_s"]) for r in mine),
                            "load_before": [r["load_before"] for r in mine],
                            "load_after": [r["load_after"] for r in mine],
                            "chosen": chosen})
    lines = ["| busy processes | contender | whole process, s | per epoch, s | load before -> after | threads chosen |",
             "|---|---|---|---|---|---|"]
    for m in medians:
        loads = ", ".join(f"{b:.2f} -> {a:.2f}" for b, a in zip(m["load_before"], m["load_after"]))
        lines.append(f"| {m['busy']} | {ROWS[m['row']]} | {m['process_s']:.2f} | {m['epoch_s']:.2f} | {loads} | "
                     f"{', '.join(map(str, m['chosen'])) or '-'} |")
    at = {(m["busy"], m["row"]): m["process_s"] for m in medians}
    pinned = [r for r in rows if r.startswith("pinned")]
    if "policy" in rows and pinned:
        today = f"pinned{default_threads}"
        lines += ["", f"| busy processes | policy / best pinned (whole process) | {ROWS.get(today, today)} (today's "
                  "default) / policy |", "|---|---|---|"]
        for busy in levels:
            best = min(at[(busy, r)] for r in pinned)
            speedup = f"{at[(busy, today)] / at[(busy, 'policy')]:.2f}x" if today in rows else "not run"
            lines.append(f"| {busy} | {at[(busy, 'policy')] / best:.2f} | {speedup} |")
    return medians, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="busy background processes, per level")
    ap.add_argument("--rows", nargs="+", default=["policy", "pinned1", "pinned2", "bare1", "bare2"], choices=list(ROWS))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--data-dir", type=Path, help="folder holding fashion-mnist/ (default: the usual places)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config for every hvae contender, e.g. model.hidden=[64] (passed as --set)")
    ap.add_argument("--spin-warm-up", type=float, default=2.0, help="seconds the spinners run before the first run")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--bare-worker", type=int, help=argparse.SUPPRESS)  # internal: run the bare loop, this many threads
    args = ap.parse_args()
    args.set = [item for kv in args.set for item in ("--set", kv)]
    if args.bare_worker:
        return bare_worker(args)
    default_threads = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                         env=clean_env(), capture_output=True, text=True, check=True).stdout)
    runs, spinner_pids = [], {}
    for busy in args.busy:
        spinners: list[subprocess.Popen] = []
        try:
            start_spinners(spinners, busy, args.spin_warm_up)
            spinner_pids[busy] = [p.pid for p in spinners]
            for repeat in range(args.repeats):
                for row in args.rows:
                    runs.append(run_once(row, busy, repeat, args))
        finally:
            stop_spinners(spinners)
    medians, table = summarize(runs, args.rows, args.busy, default_threads)
    result = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "torch_default_threads": default_threads,
              "epochs": args.epochs, "repeats": args.repeats, "batch_size": args.batch_size, "set": args.set,
              "spinner_pids": spinner_pids, "medians": medians, "runs": runs}
    print(f"{result['cpu']}, {result['cores']} cores; {args.epochs} epochs, medians of {args.repeats}\n\n{table}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
