#!/usr/bin/env bash
# The engine's GPU checks in one go (run on a CUDA machine from the repository root; $OUT receives
# the logs and JSON): the CUDA tests of the engine, the fused step and the optimizer; the default
# gx.Optimizer step of every pipeline on GPT-2 beside torch's fused and foreach AdamW with the
# 1000-step recompile check; the first step of a user chain from empty kernel caches.
# Usage: OUT=/tmp/out bash benchmarks/gpu_engine_check.sh
set -uo pipefail
mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
# The C kernels and the chain in parts under this machine's torch, CUDA hidden, beside the CUDA tests.
CUDA_VISIBLE_DEVICES= PYTHONPATH="$PWD" timeout 250 python3 -m pytest -q -p no:cacheprovider -n 6 --tb=short \
  tests/test_engine.py tests/test_optim.py tests/test_dropin.py tests/test_functional_kernels.py tests/test_sums.py tests/test_random.py > "$OUT/cpu_tests.txt" 2>&1 &
PYTHONPATH="$PWD" timeout 250 python3 -m pytest -q -p no:cacheprovider -n 8 --tb=short -m "gpu or not gpu" \
  tests/test_captured.py tests/test_gpu.py tests/test_kernel_cache.py tests/test_engine.py tests/test_fused.py tests/test_functional_kernels.py \
  tests/test_sums.py tests/test_random.py \
  > "$OUT/gpu_tests.txt" 2>&1
wait
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests.txt" | tail -12
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/cpu_tests.txt" | tail -8
PYTHONPATH="$PWD" timeout 200 python3 benchmarks/bench_step.py --sets gpt2 --steps 100 --recompile-steps 1000 \
  --rows 'torch-f*,gx-*-optim,gx-adamw-eager,gx-grokadamw-eager,gx-grokfast_ema-eager,gx-adamw-opbyop' --out "$OUT/engine_gpt2.json" > "$OUT/engine_gpt2.txt" 2>&1
tail -16 "$OUT/engine_gpt2.txt"
PYTHONPATH="$PWD" timeout 100 python3 benchmarks/bench_step.py --cold --sets gpt2 --rows gx-userchain-optim \
  --recompile-steps 0 --steps 20 --out "$OUT/engine_gpt2_cold_userchain.json" > "$OUT/cold.txt" 2>&1
tail -4 "$OUT/cold.txt"
