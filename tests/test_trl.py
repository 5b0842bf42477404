"""CAT without Axolotl: scripts/examples/fit_cat_trl.py fits with TRL's SFTTrainer and exports.

Run as a user would, in a subprocess, for a few steps on the tiny world.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from fixtures import load_base
from peft import PeftModel

from axolotl_cat_plugin.core.export.summary import module_values

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "examples" / "fit_cat_trl.py"


def fit_cat_trl(e2e_world, tmp_path: Path, *flags: str) -> Path:
    """Run the script as a user would, 3 steps on the world's mix; the export's folder.
    (tests/test_real_skills.py runs it on a 4-bit base with --load-in-4bit.)"""
    out = tmp_path / "out"
    skills = [f"--skill={name}={path}" for name, path in e2e_world["skills"].items()]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--base", str(e2e_world["base"]), *skills, *flags]
        + ["--data", str(e2e_world["mix"]), "--out", str(out), "--steps", "3", "--lr", "0.1"],
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
    return out


def test_trl_script_fits_coefficients_and_exports_a_plain_peft_adapter(e2e_world, tmp_path):
    out = fit_cat_trl(e2e_world, tmp_path)
    model = PeftModel.from_pretrained(load_base(e2e_world["base"]), out)  # plain PEFT
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
