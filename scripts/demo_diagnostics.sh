#!/usr/bin/env bash
# The two checks to run before trusting a composition result (after scripts/demo.sh):
#   1. a LoRA trained ON the composite task must reach >= 90% (the task and grader are sound);
#   2. CAT coefficients fitted ON the composite task show what any per-module weighting of
#      the two skills could reach (if it is near 0, no merge of these skills can compose).
# Neither is part of the comparison: every method there is trained without composite data.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source .venv/bin/activate
OUT=demo_out
for name in diag-composite diag-cat-composite; do
  echo "[diag] axolotl train example_yamls/tiny-cpu/$name.yml (log: $OUT/logs/$name.log)"
  rm -rf "$OUT/$name" "$OUT/prepared/$name"
  axolotl train "example_yamls/tiny-cpu/$name.yml" > "$OUT/logs/$name.log" 2>&1
done
python scripts/eval_composition.py --base "$OUT/base" --tests "$OUT/world/data" \
  --method composite_lora="$OUT/diag-composite" --method cat_on_composite="$OUT/diag-cat-composite" \
  --out "$OUT/diagnostics.json"
