#!/usr/bin/env bash
# The embedded demo, end to end on the CPU, nothing downloaded: a world (tokenizer, tiny Llama,
# datasets) -> a pretrained base -> a "manual" LoRA (new facts) and a "french" LoRA (answering in
# French) -> data mixing, CAT and static merges of the same skills -> every method scored on
# both skill tests and on the composite task (the manual's facts in French). Everything lands
# in demo_out/.
# Each stage is cached: it is skipped when the hash of its inputs (its YAML or script and the
# stamps of the stages it reads) matches the one stored next to its output.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_env311
source .venv/bin/activate # axolotl launches through accelerate, found on PATH

# accelerate launches a single process with OMP_NUM_THREADS=1 unless it is set: use every core
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
OUT=demo_out
YAMLS=example_yamls/tiny-cpu
mkdir -p "$OUT/logs"
started=$SECONDS
stage_no=0

# stage NAME OUTPUT_DIR INPUT_FILE... -- COMMAND...
stage() {
  local name=$1 out=$2 hash
  shift 2
  local inputs=()
  while [ "$1" != "--" ]; do inputs+=("$1"); shift; done
  shift
  stage_no=$((stage_no + 1))
  hash=$(cat "${inputs[@]}" | sha256sum | cut -c1-16)
  if [ "$(cat "$out/.stage-hash" 2>/dev/null)" = "$hash" ]; then
    echo "[demo $stage_no] $name: cached ($out)"
    return 0
  fi
  echo "[demo $stage_no] $name -> $out (log: $OUT/logs/$name.log)"
  local t0=$SECONDS
  rm -rf "$out" "$OUT/prepared/$name"
  if ! "$@" > >(progress "$OUT/logs/$name.log") 2>&1; then
    sleep 1
    tail -n 30 "$OUT/logs/$name.log"
    echo "[demo] stage $name failed (full log: $OUT/logs/$name.log)" >&2
    exit 1
  fi
  sleep 0.2 # let the progress filter finish its line
  mkdir -p "$out"
  echo $((SECONDS - t0)) > "$out/.stage-seconds"
  echo "$hash" > "$out/.stage-hash"
  echo "[demo $stage_no] $name done in $((SECONDS - t0)) s"
}

# Keep the full log; on the terminal show only the progress bars (tqdm) and our own lines.
progress() {
  tee "$1" | awk 'BEGIN { RS = "[\r\n]" }
    /[0-9]+\/[0-9]+ \[[0-9:]+</ { printf "\r    %s", substr($0, 1, 110); fflush(); bar = 1; next }
    /^(wrote|demo world)/ {
      if (bar) { print ""; bar = 0 }; print "    " $0; fflush() }
    END { if (bar) print "" }'
}

merge() { # NAME METHOD WEIGHT1 WEIGHT2 [--density D]
  local name=$1 method=$2 w1=$3 w2=$4
  shift 4
  axolotl-cat merge --method "$method" --weights "$w1" "$w2" "$@" --base "$OUT/base" \
    --out "$OUT/merges/$name" -- manual="$OUT/skill-manual" french="$OUT/skill-french"
}

stage world "$OUT/world" scripts/demo_world.py -- \
  python scripts/demo_world.py "$OUT/world"
stage base "$OUT/base" "$YAMLS/base.yml" "$OUT/world/.stage-hash" -- \
  axolotl train "$YAMLS/base.yml"
for skill in manual french; do
  stage "skill-$skill" "$OUT/skill-$skill" "$YAMLS/skill-$skill.yml" "$OUT/base/.stage-hash" -- \
    axolotl train "$YAMLS/skill-$skill.yml"
done
stage data-mix "$OUT/data-mix" "$YAMLS/data-mix.yml" "$OUT/base/.stage-hash" -- \
  axolotl train "$YAMLS/data-mix.yml"
skills=("$OUT/skill-manual/.stage-hash" "$OUT/skill-french/.stage-hash")
stage cat "$OUT/cat" "$YAMLS/demo-cat.yml" "${skills[@]}" -- \
  axolotl train "$YAMLS/demo-cat.yml"
stage cat-rank "$OUT/cat-rank" "$YAMLS/demo-cat-rank.yml" "${skills[@]}" -- \
  axolotl train "$YAMLS/demo-cat-rank.yml"
for spec in "uniform cat 1 1" "average cat 0.5 0.5" "ties ties 1 1 --density 0.5" \
  "dare dare_linear 1 1 --density 0.5"; do
  read -r name rest <<< "$spec"
  # shellcheck disable=SC2086 # word splitting of the method's arguments is intended
  stage "merge-$name" "$OUT/merges/$name" <(echo "$spec") "${skills[@]}" -- merge $name $rest
done

# Every method the evaluation scores, in the table's order: NAME=FOLDER under $OUT (base: none).
runs=(base=base manual=skill-manual french=skill-french uniform=merges/uniform
  average=merges/average ties=merges/ties dare=merges/dare data_mix=data-mix cat=cat
  cat_rank=cat-rank)
methods=() stamps=() timings=()
for run in "${runs[@]}"; do
  name=${run%%=*} dir=$OUT/${run#*=}
  if [ "$name" = base ]; then methods+=("base="); else methods+=("$name=$dir"); fi
  stamps+=("$dir/.stage-hash")
  timings+=("\"$name\": $(cat "$dir/.stage-seconds")")
done
(IFS=,; echo "{${timings[*]}}") > "$OUT/timings.json"
stage eval "$OUT/eval" scripts/eval_composition.py "${stamps[@]}" -- \
  python scripts/eval_composition.py --base "$OUT/base" --tests "$OUT/world/data" \
  --timings "$OUT/timings.json" --heatmap "$OUT/cat/cat_coefficients.png" \
  --out "$OUT/results.json" "${methods[@]/#/--method=}"
python - "$OUT/results.json" <<'PY'
import json, sys
sys.path.insert(0, "scripts")
from eval_composition import print_table
results = json.load(open(sys.argv[1]))
print_table(results)
PY
echo "[demo] done in $((SECONDS - started)) s: $OUT/results.json, $OUT/cat_coefficients.png"
