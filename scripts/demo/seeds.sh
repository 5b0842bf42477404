#!/usr/bin/env bash
# The demo again with other seeds (default: 1 and 2), then one table over every seed run so
# far (demo_out/results.json is seed 0): the mean and the range of each accuracy.
#   scripts/demo/seeds.sh          seeds 1 and 2 (about 5 minutes each on 2 cores)
#   scripts/demo/seeds.sh 3 4 5    other seeds
# Each seed retrains the skills, data mixing, CAT and the merges (their `seed:` changes); the
# world and the pretrained base stay the same.
set -euo pipefail
cd "$(dirname "$0")/../.."
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(1 2)
for seed in "${seeds[@]}"; do
  echo "[seeds] seed $seed"
  DEMO_SEED=$seed bash scripts/demo.sh
done
source .venv/bin/activate
python scripts/demo/seed_summary.py demo_out/results.json demo_out/seed-*/results.json \
  --out demo_out/seeds.json
