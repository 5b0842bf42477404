#!/usr/bin/env bash
# Rebuild the demo's shipped base (scripts/demo/base/): build the world, pretrain the tiny
# Llama with `axolotl train example_yamls/tiny-cpu/base.yml` (about 6 minutes on 2 cores),
# and store it as bf16 with a fingerprint of its pretraining data. Run it after changing
# scripts/demo/demo_world.py or base.yml; scripts/demo.sh refuses a base that does not match.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/tools/env.sh
ensure_env311
source .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
python scripts/demo/demo_world.py demo_out/world
rm -rf demo_out/base demo_out/prepared/base
axolotl train example_yamls/tiny-cpu/base.yml
python scripts/demo/demo_base.py ship demo_out/base demo_out/world scripts/demo/base
rm -rf demo_out/base # the next scripts/demo.sh installs the shipped copy in its place
