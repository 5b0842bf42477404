#!/usr/bin/env bash
# The mechanics in about a minute (scripts/demo.sh is the real demo): build a tiny random world
# (a base, three random skill LoRAs of different ranks and targets, a data mix), fit CAT with
# `axolotl train`, then load the result with plain PEFT. It measures nothing about composition.
# Everything lands in demo_out/tiny (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/tools/env.sh
ensure_env311
source .venv/bin/activate   # axolotl launches through accelerate, found on PATH

started=$SECONDS
echo "[mechanics 1/3] building the tiny world in demo_out/tiny"
python scripts/demo/tiny_world.py demo_out/tiny

echo "[mechanics 2/3] axolotl train example_yamls/tiny-cpu/cat.yml"
axolotl train example_yamls/tiny-cpu/cat.yml

echo "[mechanics 3/3] loading demo_out/tiny/out/cat with plain PEFT"
python - <<'PY'
import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

out = "demo_out/tiny/out/cat"
config = json.load(open(f"{out}/adapter_config.json"))
record = json.load(open(f"{out}/cat_coefficients.json"))
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("demo_out/tiny/base"), out)
with torch.no_grad():
    logits = model(input_ids=torch.tensor([[1, 10, 20, 30]])).logits
print(f"standard LoRA adapter: r={config['r']}, lora_alpha={config['lora_alpha']}, "
      f"{len(record['modules'])} modules; PEFT forward ok, logits {tuple(logits.shape)}")
print("coefficients per skill (mean over modules):")
for skill in record["skills"]:
    values = [e["coefficients"][skill["name"]] for e in record["modules"].values()
              if skill["name"] in e["coefficients"]]
    print(f"  {skill['name']:>6}: mean {sum(values) / len(values):.4f}, "
          f"min {min(values):.4f}, max {max(values):.4f} over {len(values)} modules")
PY
echo "[mechanics] done in $((SECONDS - started)) s; the adapter is in demo_out/tiny/out/cat"
