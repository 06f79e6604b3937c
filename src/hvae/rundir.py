"""The run directory contract: refuse to clobber, start or resume (auto-resume), record provenance, keep metrics
append-only."""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from .checkpoint import checkpoint_dir, read_config, write_json, write_text_atomic
from .config import Config, flatten, to_dict
from .errors import CheckpointError, ConfigError, RunDirError


# What `hvae train` writes into a run directory besides config.json and provenance.json (rewritten at the start).
TRAINING_OUTPUTS = ("metrics.jsonl", "checkpoints", "tensorboard")


def prepare_new(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty DIR unless overwrite; create it otherwise. Nothing is deleted here: the old
    run's outputs go only when the new run starts writing (train -> clear_training_outputs)."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunDirError(f"run directory {out} exists and is not empty; pass --resume {out} to continue it, "
                          "--overwrite to replace it, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create run directory {out}: {e.strerror or e}; choose another --out") from None


# What may differ between a run and the command that resumes it (as with --resume).
MAY_CHANGE_ON_RESUME = ("train.epochs", "runtime.accelerator")


def start_or_resume(out: Path, cfg: Config) -> str:
    """auto_resume: "start" a run in `out` (new, empty, or not a run: then the usual checks refuse it), "resume"
    the run of this same config in it, or "restart" it (this config, but it never reached a checkpoint). A run of
    another config is refused, naming the first key that differs."""
    if not (out / "config.json").is_file():
        return "start"
    theirs, mine = flatten(to_dict(read_config(out))), flatten(to_dict(cfg))
    for key in [*mine, *(k for k in theirs if k not in mine)]:
        if key not in MAY_CHANGE_ON_RESUME and theirs.get(key) != mine.get(key):
            raise ConfigError(f"auto-resume: {out} holds a run of another config ({key} is {theirs.get(key)!r} there, "
                              f"{mine.get(key)!r} here); choose another output folder, or that run's settings")
    try:
        checkpoint_dir(out)
    except CheckpointError:
        return "restart"
    return "resume"


def clear_training_outputs(out: Path) -> None:
    """Remove an earlier run's metrics, checkpoints and TensorBoard events from DIR (a new run is about to write
    there: else one that stops before its first checkpoint would leave the old weights under the new config).
    Other files in DIR are left alone."""
    for stale in TRAINING_OUTPUTS:
        path = out / stale
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_commit() -> str | None:
    """The git commit of hvae's own source tree, or None: an installed copy inside another project's work tree
    (e.g. its .venv) would otherwise report that project's commit."""
    here = Path(__file__).resolve().parent
    try:
        top, commit = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True,
                                     timeout=5, cwd=here).stdout.split()
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return commit if Path(top).resolve() / "src" / "hvae" == here else None


def write_provenance(out: Path, data_files: Iterable[Path], argv: list[str] | None, resume: bool = False,
                     threads: dict | None = None) -> None:
    """DIR/provenance.json: versions, git commit, data hashes, CPU/GPU, the torch threads (and `threads`, the thread
    policy's choice and why: threads.ThreadPolicy.info), command line, start time. A resume keeps the run's original
    record and appends its own to the list under "resumes"."""
    import torch

    from . import __version__

    try:
        import lightning_fabric
        fabric_version = lightning_fabric.__version__
    except ImportError:  # pragma: no cover - a declared dependency
        fabric_version = None
    commit = source_commit()
    info: dict[str, Any] = {
        "hvae": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "lightning_fabric": fabric_version, "git_commit": commit, "cpu": cpu_name(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(), "thread_policy": threads,
        "command": argv if argv is not None else sys.argv,
        "data_files": {str(p): file_sha256(p) for p in data_files},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = out / "provenance.json"
    if resume and path.is_file():
        try:
            original = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            original = None
        if isinstance(original, dict):
            original.setdefault("resumes", []).append(info)
            info = original
    write_json(path, info)


class MetricsLog:
    """DIR/metrics.jsonl, one JSON object per line; on resume, lines past the checkpoint's step are dropped.

    With `tensorboard`, scalars also go to DIR/tensorboard (needs the optional `tensorboard` package).
    """

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard: bool = False):
        self.path = path
        if resume_step is not None and path.exists():
            self._keep_up_to(resume_step)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RunDirError("train.tensorboard needs the tensorboard package: pip install 'hvae[tensorboard]'") from None
            # purge_step: on resume, events past the checkpoint are dropped as in metrics.jsonl
            self.writer = SummaryWriter(str(path.parent / "tensorboard"),
                                        purge_step=None if resume_step is None else resume_step + 1)
        self.file = open(path, "a")

    def _keep_up_to(self, step: int) -> None:
        """Drop the lines past `step` (and any line a crash cut short), rewriting the file atomically."""
        kept, damaged = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                damaged += line.strip() != ""
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        if damaged:
            print(f"note: {self.path}: dropped {damaged} damaged line(s) (cut short by a crash?)", file=sys.stderr)
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
