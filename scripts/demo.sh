#!/usr/bin/env bash
# The embedded demo, end to end on the CPU, nothing downloaded: a world (tokenizer, tiny Llama,
# datasets) -> a pretrained base -> a "manual" LoRA (new facts) and a "french" LoRA (answering in
# French) -> data mixing, CAT and static merges of the same skills -> every method scored on
# both skill tests and on the composite task (the manual's facts in French). Everything lands
# in demo_out/.
# Each stage is cached: it is skipped when the hash of its inputs (its YAML or script, the
# data files it reads and the stamps of the stages it builds on) matches the one stored next
# to its output. Stages hash the data, not demo_world.py, so an edit that leaves a dataset
# unchanged reruns nothing that reads it.
# The base is the pretrained one shipped in scripts/demo/base/ (scripts/demo/build_base.sh made
# it with base.yml); DEMO_PRETRAIN=1 pretrains it here instead (about 6 more minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/tools/env.sh
# DEMO_AXOLOTL=0.21 runs every training with axolotl 0.21 (.venv312) under demo_out/axolotl-0.21/
if [ "${DEMO_AXOLOTL:-0.19}" = 0.21 ]; then
  ensure_env312
  source .venv312/bin/activate # axolotl launches through accelerate, found on PATH
else
  ensure_env311
  source .venv/bin/activate
fi
# the YAMLs of the LoRA trainings list demo_plugins.SeedLoraInit (same seed, same adapters),
# which lives in scripts/demo/
export PYTHONPATH="$PWD/scripts/demo${PYTHONPATH:+:$PYTHONPATH}"

# accelerate launches a single process with OMP_NUM_THREADS=1 unless it is set: use every core
# when one stage runs alone; stages that run side by side get one thread each (see `together`)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
OUT=demo_out
# DEMO_SEED=N (not 0) trains every skill, baseline and fit again with seed N under
# demo_out/seed-N/, on the same world and base (scripts/demo/seeds.sh runs several).
SEED=${DEMO_SEED:-0}
RUN=$OUT
[ "${DEMO_AXOLOTL:-0.19}" = 0.21 ] && RUN=$OUT/axolotl-0.21
[ "$SEED" = 0 ] || RUN=$RUN/seed-$SEED
YAMLS=example_yamls/tiny-cpu
SHIPPED=scripts/demo/base
mkdir -p "$RUN/logs"
started=$SECONDS
source scripts/demo/stages.sh # say, stage, together, show_table

merge() { # NAME METHOD WEIGHT1 WEIGHT2 [--density D]
  local name=$1 method=$2 w1=$3 w2=$4
  shift 4
  axolotl-cat merge --method "$method" --weights "$w1" "$w2" "$@" --base "$OUT/base" \
    --out "$RUN/merges/$name" -- manual="$RUN/skill-manual" french="$RUN/skill-french"
}

# config NAME: the YAML a stage trains with; for another seed or axolotl, a copy with that seed
# whose outputs (and the skills it reads) are under $RUN; the world and the base stay shared.
config() {
  if [ "$RUN" = "$OUT" ]; then echo "$YAMLS/$1.yml"; return; fi
  mkdir -p "$RUN/yamls"
  sed -E "s/^seed: 0\$/seed: $SEED/; s#demo_out/(skill-|data-mix|mix-lora|cat|random-|prepared/)#$RUN/\1#g" \
    "$YAMLS/$1.yml" > "$RUN/yamls/$1.yml"
  if ! grep -q "^seed: $SEED\$" "$RUN/yamls/$1.yml"; then
    echo "[demo] $YAMLS/$1.yml has no 'seed: 0' line to change" >&2
    exit 1
  fi
  echo "$RUN/yamls/$1.yml"
}

skill() { # NAME
  local yaml
  yaml=$(config "skill-$1")
  stage "skill-$1" "$RUN/skill-$1" "$yaml" "$OUT/world/data/$1.jsonl" "$OUT/base/.stage-hash" \
    -- axolotl train "$yaml"
}

data_mix() { # data mixing, then the fresh LoRA on the CAT mix: neither needs the skills
  local name yaml data
  for name in data-mix mix-lora; do
    yaml=$(config "$name")
    data=both
    [ "$name" = mix-lora ] && data=mix
    stage "$name" "$RUN/$name" "$yaml" "$OUT/world/data/$data.jsonl" "$OUT/base/.stage-hash" \
      -- axolotl train "$yaml"
  done
}

fit() { # NAME: demo-NAME.yml fitted on the 5% mix, over the skills it lists
  local yaml inputs=("${skills[@]}")
  yaml=$(config "demo-$1")
  [[ $1 == *random ]] && inputs=("$RUN/random-skills/.stage-hash")
  stage "$1" "$RUN/$1" "$yaml" "$OUT/world/data/mix.jsonl" "${inputs[@]}" -- axolotl train "$yaml"
}

cat_fits() { # the three CAT granularities over the real skills, one after the other
  local name
  for name in cat cat-rank cat-core; do fit "$name"; done
}

controls() { # random skills shaped like the real ones, the same fits over them, static merges
  local name
  stage random-skills "$RUN/random-skills" scripts/demo/random_skills.py "${skills[@]}" -- \
    python scripts/demo/random_skills.py --seed "$SEED" \
    "$RUN/skill-manual=$RUN/random-skills/manual" "$RUN/skill-french=$RUN/random-skills/french"
  for name in cat-random cat-rank-random cat-core-random; do fit "$name"; done
  static_merges
}

static_merges() {
  local spec name rest
  for spec in "uniform concat 1 1" "average concat 0.5 0.5" "ties ties 1 1 --density 0.5" \
    "dare dare_linear 1 1 --density 0.5"; do
    read -r name rest <<< "$spec"
    # shellcheck disable=SC2086 # word splitting of the method's arguments is intended
    stage "merge-$name" "$RUN/merges/$name" <(echo "$spec") "${skills[@]}" -- merge $name $rest
  done
}

stage world "$OUT/world" scripts/demo/demo_world.py -- \
  python scripts/demo/demo_world.py "$OUT/world"
if [ "${DEMO_PRETRAIN:-0}" = 1 ]; then
  stage base "$OUT/base" "$YAMLS/base.yml" "$OUT"/world/init/* "$OUT/world/data/generic.jsonl" \
    -- axolotl train "$YAMLS/base.yml"
else
  stage base "$OUT/base" "$SHIPPED"/* "$OUT/world/data/generic.jsonl" -- \
    python scripts/demo/demo_base.py install "$SHIPPED" "$OUT/world" "$OUT/base"
fi
skills=("$RUN/skill-manual/.stage-hash" "$RUN/skill-french/.stage-hash")
compositions() { # what is built from the two skills, once both exist
  together "skill manual" "skill french"
  together cat_fits controls
}
together data_mix compositions

# Every method the evaluation scores, in the table's order: NAME=FOLDER under $RUN (base: none).
runs=(base=base manual=skill-manual french=skill-french uniform=merges/uniform
  average=merges/average ties=merges/ties dare=merges/dare data_mix=data-mix mix_lora=mix-lora
  cat_random=cat-random cat=cat cat_rank_random=cat-rank-random cat_rank=cat-rank
  cat_core_random=cat-core-random cat_core=cat-core)
methods=() stamps=() timings=()
for run in "${runs[@]}"; do
  name=${run%%=*} dir=$RUN/${run#*=}
  if [ "$name" = base ]; then dir=$OUT/base methods+=("base="); else methods+=("$name=$dir"); fi
  stamps+=("$dir/.stage-hash")
  timings+=("\"$name\": $(cat "$dir/.stage-seconds")")
done
(IFS=,; echo "{${timings[*]}}") > "$RUN/timings.json"
stage eval "$RUN/eval" scripts/demo/eval_composition.py "$OUT"/world/data/test_*.jsonl \
  "${stamps[@]}" -- \
  python scripts/demo/eval_composition.py --base "$OUT/base" --tests "$OUT/world/data" \
  --timings "$RUN/timings.json" --heatmap "$RUN/cat/cat_coefficients.png" \
  --out "$RUN/results.json" "${methods[@]/#/--method=}"
show_table "$RUN/results.json"
say "done: $RUN/results.json, $RUN/cat_coefficients.png"
