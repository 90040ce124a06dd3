#!/usr/bin/env bash
# Compressed state on a CUDA machine (run from the repository root; $OUT receives the logs and
# JSON): its CUDA tests, then the default gx.Optimizer step with state_format="int8"/"bf16" on GPT-2
# beside float32 rows and torchao's and bitsandbytes' AdamW8bit (wheels in .wheels/, if present).
# Usage: OUT=/tmp/out bash benchmarks/gpu_compress_check.sh
set -uo pipefail
mkdir -p "$OUT"
if ls .wheels/*.whl > /dev/null 2>&1; then python3 -m pip install -q --no-deps .wheels/*.whl > "$OUT/pip.txt" 2>&1; fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
PYTHONPATH="$PWD" timeout 150 python3 -m pytest -q -p no:cacheprovider -n 8 --tb=short -m "gpu or not gpu" \
  tests/test_compress_engine.py tests/test_compress.py tests/test_stage.py > "$OUT/gpu_tests.txt" 2>&1
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests.txt" | tail -12
PYTHONPATH="$PWD" timeout 200 python3 benchmarks/bench_step.py --sets gpt2 --steps 100 --recompile-steps 0 \
  --rows 'torch-fused,gx-adamw-optim,gx-grokadamw-optim,gx-grokfast_ma-optim,gx-*-int8-optim,gx-*-bf16-optim,torchao-adamw8bit,bnb-adamw8bit,gx-adam-optim,gx-nadam-optim,gx-rmsprop-optim,gx-lamb-optim,gx-orthograd_sgd-optim' \
  --out "$OUT/compress_gpt2.json" > "$OUT/compress_gpt2.txt" 2>&1
tail -24 "$OUT/compress_gpt2.txt"
