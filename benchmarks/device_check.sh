#!/usr/bin/env bash
# The GPU checks of BENCHMARKS.md section 6, as one command for a GPU machine with PyTorch and no network.
#
#   bash benchmarks/device_check.sh prepare   # on a machine with the venv, once: Fashion-MNIST into .devdata/,
#                                             # the lightning-fabric wheel into .whl/ (git-ignored, about 31 MB)
#   bash benchmarks/device_check.sh run       # on the GPU machine, with .devdata/ and .whl/ copied along
#
# `run` uses that machine's own python3 and PyTorch (hvae from src/, not installed), writes its log, JSON and a
# sample grid to $OUT (a handful of files) and its run folders to /tmp. Part 1 runs the code paths that only a GPU takes
# (training on CUDA in fp32 / 16-mixed / bf16-mixed, resume with the optimizer state on the device, evaluation,
# sampling, the conv and ladder models); part 2 is the throughput table of section 2 on the GPU; part 3 times the
# training step with the update guard's verdict read on the host at every step against kept on the device.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    mkdir -p .devdata/fashion-mnist .whl
    cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .devdata/fashion-mnist/
    # lightning-fabric and lightning-utilities (pure Python; what a PyTorch image most often lacks). hvae's other
    # needs (numpy, safetensors, pyyaml, tqdm, Pillow) are compiled per Python version: `run` checks for them.
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
        "lightning-fabric==$(.venv/bin/python -c 'import lightning_fabric; print(lightning_fabric.__version__)')" \
        "lightning-utilities==$(.venv/bin/python -c 'import lightning_utilities; print(lightning_utilities.__version__)')"
    du -sh .devdata .whl
    exit 0
fi
[ "${1:-}" = run ] || { echo "usage: $0 prepare | run" >&2; exit 2; }

DEVICE=${DEVICE:-cuda}  # DEVICE=cpu runs the same script here, as a dry run of the script itself
OUT=${OUT:-/tmp/hvae-device-out}
RUNS=/tmp/hvae-device-runs
rm -rf "$RUNS"  # a rerun on the same machine starts clean (hvae train refuses a non-empty --out)
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 HVAE_DATA="$PWD/.devdata" PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
missing=""  # of the carried wheels, install only what this python lacks
python3 -c 'import lightning_utilities' 2>/dev/null || missing="$missing $(ls .whl/lightning_utilities-*.whl)"
python3 -c 'import lightning_fabric' 2>/dev/null || missing="$missing $(ls .whl/lightning_fabric-*.whl)"
if [ -n "$missing" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $missing
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c 'import numpy, safetensors, yaml, tqdm, PIL, lightning_fabric' || {
    echo "this python3 lacks a package hvae needs (above); carry its wheel in .whl/ (see prepare)" >&2; exit 2; }
hvae() { python3 -m hvae "$@"; }
# Each check runs even when an earlier one failed (GPU time is scarce); the script fails at the end if any did.
check() { echo "+ $*" >&2; "$@" || { echo "FAILED: $*" >&2; echo x >> "$RUNS/failed"; }; }

{
    if [ "$DEVICE" = cuda ]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
    fi

    echo "## 1. CUDA code paths"
    check hvae train --device $DEVICE --epochs 2 --set data.validation=1000 --out "$RUNS/fp32" --no-progress
    check hvae train --resume "$RUNS/fp32" --epochs 3 --no-progress
    check hvae eval "$RUNS/fp32" --device $DEVICE --k 1000 --limit 2000 --json --no-progress > "$OUT/eval-fp32.json"
    check hvae sample "$RUNS/fp32" --device $DEVICE --n 64 --out "$OUT/samples-fp32.png"
    check hvae train --device $DEVICE --precision 16-mixed --epochs 1 --out "$RUNS/fp16" --no-progress
    check hvae train --device $DEVICE --precision bf16-mixed --epochs 1 --out "$RUNS/bf16" --no-progress
    check hvae train --device $DEVICE --epochs 1 --set model.arch=conv --out "$RUNS/conv" --no-progress
    check hvae eval "$RUNS/conv" --device $DEVICE --k 100 --limit 500 --json --no-progress
    check hvae train --device $DEVICE --epochs 1 --config configs/best-ladder.yaml --out "$RUNS/ladder" --no-progress
    check hvae eval "$RUNS/ladder" --device $DEVICE --k 100 --limit 500 --json --no-progress
    for run in "$RUNS"/*/; do echo "$run: $(grep '"epoch_seconds"' "$run/metrics.jsonl" | tail -n 1)"; done

    echo "## 2. Throughput on the GPU"
    check python3 benchmarks/throughput.py --device $DEVICE --repeats 5 --steps 200 --eval-images 500 \
        --variant runtime.precision=bf16-mixed --variant model.arch=conv --variant model.name=ladder \
        --eval-chunk-mb 8 64 512 --json "$OUT/throughput-gpu.json"
    echo "## 3. The update guard with and without a host-device sync per step"
    check python3 benchmarks/guard_sync.py --device $DEVICE --repeats 3 --steps 200
    [ ! -e "$RUNS/failed" ] || { echo "$(wc -l < "$RUNS/failed") check(s) FAILED" >&2; exit 1; }
} 2>&1 | tee "$OUT/device-check.log"
