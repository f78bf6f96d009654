#!/usr/bin/env bash
# The CUDA checks and the speed benchmarks on a GPU machine, in one go (about 5 minutes on one GPU).
# Writes everything it prints, the card's name first, to $OUT/gpu_check.txt (default perf/gpu-results/).
#   bash perf/gpu_check.sh            # from the repository root, with clbench installed (pip install -e '.[test]')
set -uo pipefail
out="${OUT:-perf/gpu-results}"
mkdir -p "$out"
py="${PYTHON:-python}"
{
  echo "# $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
  echo "# torch $($py -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'), commit $(git rev-parse --short HEAD 2>/dev/null)"
  echo "## CUDA tests"
  timeout 120 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_batched.py -k "cuda or members_at_different" 2>&1 | tail -5
  echo "## clbench vs Avalanche, end to end (permuted Fashion-MNIST, 3 tasks)"
  timeout 120 $py perf/bench_vs_avalanche.py --tasks 3 --device cuda 2>&1 | tail -4
  echo "## batched sweeps (permuted Fashion-MNIST, MLP 784-100-10)"
  timeout 150 $py perf/bench_batched.py --parts fmnist --device cuda --repeat 1 --no-avalanche 2>&1 | tail -12
} 2>&1 | tee "$out/gpu_check.txt"
