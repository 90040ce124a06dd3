#!/usr/bin/env bash
# The GPU checks of the per-step checks in one go (run on a CUDA machine from the repository root;
# $OUT receives the logs and JSON): the CUDA tests of the optimizer's checks and of the engine, then
# the default gx.Optimizer step on GPT-2 beside torch's fused AdamW, and the first step's peak memory,
# for this tree and, when BASE names another checkout's package folder, for that one in the same run.
# Then the CPU tests of the optimizer and the engine under that torch, CUDA hidden (the C kernels).
# Usage: OUT=/tmp/out [BASE=/path/to/old/tree] bash benchmarks/gpu_captured_check.sh
# (a baseline tree: git worktree add /tmp/base <commit> && mkdir -p .base && cp -r /tmp/base/grokxform .base/,
#  with /.base/ in .git/info/exclude, carried to the device and given as BASE=$PWD/.base)
set -uo pipefail
here="$PWD"
mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
PYTHONPATH="$here" timeout 240 python3 -m pytest -q -p no:cacheprovider -n 8 --tb=short -m "gpu or not gpu" \
  tests/test_captured.py tests/test_gpu.py tests/test_kernel_cache.py tests/test_engine.py tests/test_fused.py \
  > "$OUT/gpu_tests.txt" 2>&1
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests.txt" | tail -20
for tree in ${BASE:+base} new; do
  root="$here"; [ "$tree" = base ] && root="$BASE"
  PYTHONPATH="$root" timeout 100 python3 benchmarks/bench_step.py --sets gpt2 --recompile-steps 0 --steps 150 \
    --warmup 10 --rows 'torch-fused,gx-adamw-optim,gx-grokadamw-optim,gx-grokfast_ema-optim,gx-grokfast_ma-optim' \
    --out "$OUT/bench_$tree.json" > "$OUT/bench_$tree.txt" 2>&1
  echo "== $tree"; tail -8 "$OUT/bench_$tree.txt"
  PYTHONPATH="$root:$here/benchmarks" timeout 45 python3 benchmarks/first_step_peak.py --window 50 \
    --out "$OUT/peak_$tree.json" 2>&1 | tail -2
done
# The CPU engine (C kernels) under this machine's torch, CUDA hidden.
CUDA_VISIBLE_DEVICES= PYTHONPATH="$here" timeout 300 python3 -m pytest -q -p no:cacheprovider -n 16 --tb=short \
  tests/test_engine.py tests/test_optim.py tests/test_captured.py tests/test_optim_properties.py tests/test_dropin.py \
  tests/test_optim_fused.py > "$OUT/cpu_tests.txt" 2>&1
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/cpu_tests.txt" | tail -12
