#!/usr/bin/env bash
# Device checks in one go, on a GPU machine whose python3 already has torch: the whole test suite
# (CUDA-marked tests included) and the benchmark suite on CUDA. Results land in $OUT (or ./out).
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
timeout 200 python3 -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning tests 2>&1 | tail -25 | tee "$OUT/pytest-cuda.txt"
timeout 220 python3 benchmarks/run.py --device cuda --out "$OUT/results-cuda.json" 2>&1 | tee "$OUT/bench-cuda.txt"
