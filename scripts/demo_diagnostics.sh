#!/usr/bin/env bash
# The two checks to run before trusting a composition result (after scripts/demo.sh):
#   1. a LoRA trained ON the composite task must reach >= 90% (the task and grader are sound);
#   2. CAT coefficients fitted ON the composite task, per module (the paper's CAT) and per
#      rank-1 component: how far weighting the two skills gets when it sees the task itself
#      (near 0 would mean no weighting of these skills composes).
# Neither is part of the comparison: every method there is trained without composite data.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source .venv/bin/activate
OUT=demo_out
# side by side, one thread each (as in demo.sh: a second thread barely helps a tiny model)
pids=()
for name in diag-composite diag-cat-composite diag-cat-rank-composite; do
  echo "[diag] axolotl train example_yamls/tiny-cpu/$name.yml (log: $OUT/logs/$name.log)"
  rm -rf "${OUT:?}/$name" "$OUT/prepared/$name"
  OMP_NUM_THREADS=1 axolotl train "example_yamls/tiny-cpu/$name.yml" > "$OUT/logs/$name.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do
  wait "$pid" || { echo "[diag] a run failed (logs in $OUT/logs)" >&2; exit 1; }
done
python scripts/eval_composition.py --base "$OUT/base" --tests "$OUT/world/data" \
  --method composite_lora="$OUT/diag-composite" \
  --method cat_on_composite="$OUT/diag-cat-composite" \
  --method cat_rank_on_composite="$OUT/diag-cat-rank-composite" \
  --out "$OUT/diagnostics.json"
