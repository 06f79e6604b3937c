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
    """Sets the torch thread count (one for the CPU clock, which also sets args.threads) and returns the clock."""
    if args.clock == "cpu":
        args.threads = 1
    torch.set_num_threads(args.threads)
    return time.thread_time if args.clock == "cpu" else time.perf_counter
