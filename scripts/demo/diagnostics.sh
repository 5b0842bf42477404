#!/usr/bin/env bash
# The two checks to run before trusting a composition result (after scripts/demo.sh):
#   1. a LoRA trained ON the composite task must reach >= 90% (the task and grader are sound);
#   2. CAT coefficients fitted ON the composite task, per module (the paper's CAT) and per
#      rank-1 component: how far weighting the two skills gets when it sees the task itself
#      (near 0 would mean no weighting of these skills composes).
# Neither is part of the comparison: every method there is trained without composite data.
# Stages are cached as in demo.sh; the results land in demo_out/diagnostics.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/tools/env.sh
ensure_env311
source .venv/bin/activate
OUT=demo_out RUN=demo_out YAMLS=example_yamls/tiny-cpu
mkdir -p "$RUN/logs"
started=$SECONDS
source scripts/demo/stages.sh # say, stage, together, show_table
composite=$OUT/world/data/composite.jsonl
skills=("$OUT/skill-manual/.stage-hash" "$OUT/skill-french/.stage-hash")

diagnostic() { # NAME STAMP...: train example_yamls/tiny-cpu/NAME.yml on the composite
  local name=$1
  shift
  stage "$name" "$OUT/$name" "$YAMLS/$name.yml" "$composite" "$@" -- \
    axolotl train "$YAMLS/$name.yml"
}

together "diagnostic diag-composite $OUT/base/.stage-hash" \
  "diagnostic diag-cat-composite ${skills[*]}" "diagnostic diag-cat-rank-composite ${skills[*]}"
stage diagnostics-eval "$OUT/diagnostics-eval" scripts/demo/eval_composition.py \
  "$OUT"/world/data/test_*.jsonl "$OUT"/diag-*/.stage-hash -- \
  python scripts/demo/eval_composition.py --base "$OUT/base" --tests "$OUT/world/data" \
  --method composite_lora="$OUT/diag-composite" \
  --method cat_on_composite="$OUT/diag-cat-composite" \
  --method cat_rank_on_composite="$OUT/diag-cat-rank-composite" \
  --out "$OUT/diagnostics.json"
show_table "$OUT/diagnostics.json"
say "done: $OUT/diagnostics.json"
