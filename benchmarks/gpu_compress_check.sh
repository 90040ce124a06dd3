#!/usr/bin/env bash
# Compressed state on a CUDA machine (run from the repository root; $OUT receives the logs and one
# archive, results.tgz, of every JSON written: a machine returns only a few files). In order:
# the CUDA tests of compressed state; the default gx.Optimizer step with state_format="int8"/"bf16"
# on GPT-2 beside float32 rows and torchao's and bitsandbytes' AdamW8bit (wheels in .wheels/, if
# present), the int8 rows on the engine's tiles or, given TILES, once per tile of TILES, then again
# with the element loads hoisted (--hoist-loads); part "variants" (not by default): torch's fused
# AdamW and grokadamw's float32 and int8 and adamw's int8 rows under each kernel variant (plain,
# --hoist-loads, --rounding-in-line, both); part "profile" (not by default): Nsight Compute's
# sections of grokadamw's int8 pass that writes the codes (PROFILE_FLAGS: bench_step flags); the
# kernels' registers and spills (part "resources", not by default); part "seeds" (not by default): the quality
# sweeps of SEEDS_TASKS (default div) with seeds 0..SEEDS-1 (default 10) for Grokfast-EMA and GrokAdamW, float32
# and int8, into quality_seeds/ of the archive; then the quality sweeps
# (benchmarks/compressed_quality.py, resuming from the committed benchmarks/results/compress_quality/)
# until SECONDS_LEFT (default 570) seconds have passed.
# PARTS (default "tests speed quality") picks among them; TESTS (default the compressed-state and random-number
# test modules) names the test files and TESTS_SECONDS (default 240) bounds them; HOIST=0 skips the hoisted
# rows; TASKS, METHODS, FORMATS and JOBS narrow the sweeps.
# Usage: OUT=/tmp/out bash benchmarks/gpu_compress_check.sh
set -uo pipefail
mkdir -p "$OUT/json" "$OUT/quality" "$OUT/quality_seeds"
pack() { tar -czf "$OUT/results.tgz" -C "$OUT" json quality quality_seeds 2>/dev/null; }
if ls .wheels/*.whl > /dev/null 2>&1; then python3 -m pip install -q --no-deps .wheels/*.whl > "$OUT/pip.txt" 2>&1; fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
parts=" ${PARTS:-tests speed quality} "
if [[ $parts == *" tests "* ]]; then
PYTHONPATH="$PWD" timeout "${TESTS_SECONDS:-240}" python3 -m pytest -q -p no:cacheprovider -n 8 --tb=short -m "gpu or not gpu" \
  ${TESTS:-tests/test_compress_engine.py tests/test_compress.py tests/test_random.py} > "$OUT/gpu_tests.txt" 2>&1
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests.txt" | tail -12
fi
# TILES: the int8 rows once per tile of the passes that write codes (elements x warps [x registers [x items]])
tiles=()
[ -n "${TILES:-}" ] && tiles=(--int8-tiles "$TILES")
if [[ $parts == *" speed "* ]]; then
PYTHONPATH="$PWD" timeout 330 python3 benchmarks/bench_step.py --sets gpt2 --steps 100 --recompile-steps 0 \
  --rows 'torch-fused,gx-adamw-optim,gx-grokadamw-optim,gx-grokfast_ma-optim,gx-*-int8-optim,gx-*-bf16-optim,torchao-adamw8bit,bnb-adamw8bit' \
  "${tiles[@]}" \
  --out "$OUT/json/compress_gpt2.json" > "$OUT/compress_gpt2.txt" 2>&1
tail -30 "$OUT/compress_gpt2.txt"
if [ "${HOIST:-1}" != 0 ]; then  # the same float32 and int8 rows with the element loads first (HOIST_LOADS)
PYTHONPATH="$PWD" timeout 200 python3 benchmarks/bench_step.py --sets gpt2 --steps 100 --recompile-steps 0 \
  --rows 'torch-fused,gx-adamw-optim,gx-grokadamw-optim,gx-grokfast_ma-optim,gx-*-int8-optim' --hoist-loads \
  "${tiles[@]}" \
  --out "$OUT/json/compress_gpt2_hoisted.json" > "$OUT/compress_gpt2_hoisted.txt" 2>&1
tail -16 "$OUT/compress_gpt2_hoisted.txt"
fi
pack
fi
if [[ $parts == *" variants "* ]]; then  # the int8 rows under each kernel variant: plain, loads first, roots in line, both
for flags in "" "--hoist-loads" "--rounding-in-line" "--hoist-loads --rounding-in-line"; do
name=$(echo "${flags:-plain}" | sed 's/--//g; s/ /_/g')
PYTHONPATH="$PWD" timeout 150 python3 benchmarks/bench_step.py --sets gpt2 --steps 100 --recompile-steps 0 \
  --rows 'torch-fused,gx-grokadamw-optim,gx-grokadamw-int8-optim,gx-adamw-int8-optim' $flags "${tiles[@]}" \
  --out "$OUT/json/variants_$name.json" > "$OUT/variants_$name.txt" 2>&1
echo "== ${flags:-plain}"; grep -E "^(torch|gx)-" "$OUT/variants_$name.txt" | tail -10
done
pack
fi
if [[ $parts == *" profile "* ]]; then  # Nsight Compute on grokadamw's int8 pass that writes the codes (PROFILE_FLAGS: bench_step's)
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
PYTHONPATH="$PWD" timeout 150 "$ncu" --clock-control none --kernel-name regex:step_pass1 --launch-skip 3 --launch-count 1 \
  --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
  --section Occupancy --section InstructionStats --section MemoryWorkloadAnalysis \
  python3 benchmarks/bench_step.py --sets gpt2 --steps 6 --warmup 1 --recompile-steps 0 \
  --rows gx-grokadamw-int8-optim ${PROFILE_FLAGS:-} > "$OUT/ncu_grokadamw_int8.txt" 2>&1
grep -v "^==PROF==" "$OUT/ncu_grokadamw_int8.txt" | grep -v "^ *$" | tail -60
fi
if [[ $parts == *" resources "* ]]; then  # registers, spills and shared memory of the kernels
PYTHONPATH="$PWD" timeout 90 python3 benchmarks/kernel_resources.py --out "$OUT/json/kernel_resources.json" \
  > "$OUT/kernel_resources.txt" 2>&1
tail -12 "$OUT/kernel_resources.txt"
pack
fi
if [[ $parts == *" seeds "* ]]; then  # more seeds on the three-seed tasks: float32 and int8
PYTHONPATH="$PWD" timeout "${SEEDS_SECONDS:-300}" python3 benchmarks/compressed_quality.py --device cuda \
  --out "$OUT/quality_seeds" --jobs 4 --tasks "${SEEDS_TASKS:-div}" --methods grokfast_ema,grokadamw \
  --formats float32,int8 --seeds "${SEEDS:-10}" > "$OUT/quality_seeds.txt" 2>&1
tail -14 "$OUT/quality_seeds.txt"  # the sweeps, then the summary the script writes at its end
pack
fi
[[ $parts == *" quality "* ]] || { echo "elapsed $SECONDS s"; exit 0; }
cp benchmarks/results/compress_quality/*.json "$OUT/quality/" 2>/dev/null
(while sleep 20; do pack; done) &
packer=$!
PYTHONPATH="$PWD" timeout $(( ${SECONDS_LEFT:-570} - SECONDS )) python3 benchmarks/compressed_quality.py --device cuda \
  --out "$OUT/quality" --jobs "${JOBS:-14}" --tasks "${TASKS:-mul,sub,div,lm}" \
  --methods "${METHODS:-grokfast_ema,grokfast_ma,grokadamw}" --formats "${FORMATS:-float32,bf16,bf16_sr,int8}" \
  > "$OUT/quality.txt" 2>&1
kill $packer 2>/dev/null
pack
grep -v "^|" "$OUT/quality.txt" | tail -20
echo "elapsed $SECONDS s"
