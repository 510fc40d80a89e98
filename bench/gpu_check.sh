#!/usr/bin/env bash
# Everything that needs a GPU, in one prepared run: the CUDA tests, then `make bench-gpu`.
#   bench/gpu_check.sh            (or: make gpu-check)
# Output: bench/out/gpu-check/{nvidia-smi.txt,cuda-tests.txt,bench-gpu.txt} and bench/out/gpu.json.
# torch must be a CUDA build the host's driver runs: for a driver older than CUDA 13.0, first
#   .venv/bin/pip install --index-url https://download.pytorch.org/whl/cu126 torch==2.13.0
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=bench/out/gpu-check
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$OUT/nvidia-smi.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" \
    | tee "$OUT/torch.txt" || exit 1
"$PY" -m pytest tests/test_cuda.py -q -rs 2>&1 | tee "$OUT/cuda-tests.txt"
tests=${PIPESTATUS[0]}
"$PY" -m bench.gpu "$@" 2>&1 | tee "$OUT/bench-gpu.txt"
bench=${PIPESTATUS[0]}
echo "cuda tests exit $tests, bench-gpu exit $bench"
exit $(( tests || bench ))
