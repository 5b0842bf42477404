"""CAT without Axolotl: scripts/examples/fit_cat_trl.py fits with TRL's SFTTrainer and exports.

Run as a user would, in a subprocess, for a few steps on the tiny world.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from fixtures import load_base, write_jsonl
from peft import PeftModel

from axolotl_cat_plugin.core.summary import module_values

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "examples" / "fit_cat_trl.py"


def test_trl_script_fits_coefficients_and_exports_a_plain_peft_adapter(world, tmp_path):
    rows = [{"text": f"Q: {a} + {b}? A: {a} + {b} = {a + b}"} for a in range(8) for b in range(4)]
    data = write_jsonl(tmp_path / "mix.jsonl", rows)
    out = tmp_path / "out"
    skills = [f"--skill={name}={path}" for name, path in world["skills"].items()]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--base", str(world["base"]), *skills]
        + ["--data", str(data), "--out", str(out), "--steps", "3", "--lr", "0.1"],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
            "TOKENIZERS_PARALLELISM": "false",
        },
    )
    assert result.returncode == 0, result.stderr[-4000:]

    model = PeftModel.from_pretrained(load_base(world["base"]), out)  # plain PEFT
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 10, 20, 30]])).logits).all()

    record = json.loads((out / "cat_coefficients.json").read_text())
    assert record["training"]["steps"] == 3 and record["training"]["trainer"] == "trl.SFTTrainer"
    coefficients = [
        value
        for entry in record["modules"].values()
        for values in module_values(entry).values()
        for value in values
    ]
    assert coefficients and all(abs(value - 1.0) > 1e-4 for value in coefficients)
    assert (out / "README.md").read_text().startswith("---\n")
