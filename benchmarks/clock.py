"""The timing clock shared by the benchmark scripts: wall time at --threads, or CPU time of the main thread
at one thread (robust on a loaded, shared machine: other processes do not inflate it)."""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch


def add_clock_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: one thread, CPU time of the main thread (robust on a loaded machine)")


def start_clock(args: argparse.Namespace) -> Callable[[], float]:
    """Sets the torch thread count (one for the CPU clock, which also sets args.threads) and returns the clock;
    on a GPU (args.device 'cuda') wall time read after the device has finished its queued work."""
    if args.clock == "cpu":
        args.threads = 1
    torch.set_num_threads(args.threads)
    if torch.device(getattr(args, "device", "cpu")).type == "cuda":
        if args.clock == "cpu":
            raise SystemExit("--clock cpu times the CPU; on a GPU use the default wall clock")

        def synced() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()

        return synced
    return time.thread_time if args.clock == "cpu" else time.perf_counter
