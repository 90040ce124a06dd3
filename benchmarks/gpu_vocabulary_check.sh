#!/usr/bin/env bash
# The optimizers beside the Grokfast family on a CUDA machine (run from the repository root; $OUT
# receives the logs and JSON): their CUDA tests, then the default gx.Optimizer step of every
# pipeline and method on GPT-2 beside torch's AdamW (fused, foreach), SGD (fused) and Muon.
# Usage: OUT=/tmp/out bash benchmarks/gpu_vocabulary_check.sh
set -uo pipefail
mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
PYTHONPATH="$PWD" timeout 300 python3 -m pytest -q -p no:cacheprovider -n 8 --tb=short -m "gpu or not gpu" \
  tests/test_muon.py tests/test_stage.py tests/test_captured.py tests/test_vocabulary.py tests/test_vocabulary_adam.py \
  tests/test_vocabulary_sums.py tests/test_optax_basics.py tests/test_gpu.py \
  > "$OUT/gpu_tests.txt" 2>&1
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests.txt" | tail -12
PYTHONPATH="$PWD" timeout 240 python3 benchmarks/bench_step.py --sets gpt2 --steps 100 --recompile-steps 0 \
  --rows 'torch-fused,torch-foreach,torch-sgd-fused,gx-*-optim,gx-sgd-eager,gx-lion-eager,gx-ademamix-eager,torch-muon' \
  --out "$OUT/vocabulary_gpt2.json" > "$OUT/vocabulary_gpt2.txt" 2>&1
tail -24 "$OUT/vocabulary_gpt2.txt"
