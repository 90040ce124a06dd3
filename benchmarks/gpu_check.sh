#!/usr/bin/env bash
# The GPU checks of the engine in one go (run on a CUDA machine from the repository root; $OUT
# receives the logs): the engine and fused-step tests on compiled kernels, then the step benchmark.
# Usage: OUT=/tmp/out bash benchmarks/gpu_check.sh [tests|bench|all] [bench args...]
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
what="${1:-all}"; shift || true
mkdir -p "$OUT"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 300 python -m pytest -q -p no:cacheprovider -n 8 --tb=short -o log_cli=false -p no:logging \
    tests/test_engine.py tests/test_fused.py tests/test_gpu.py tests/test_elements.py -m "gpu or not gpu" > "$OUT/gpu_tests.txt" 2>&1
  grep -E "passed|failed|^FAILED|^ERROR|^E  " "$OUT/gpu_tests.txt" | tail -40
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 420 python benchmarks/bench_step.py "$@" 2>&1 | tail -80 | tee "$OUT/bench.txt"
fi
