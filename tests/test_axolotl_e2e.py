"""`axolotl train cat.yml`, run for real in a subprocess, leaves one standard adapter.

These tests run the user's own command on the tiny CPU world (example_yamls/tiny-cpu),
so they take a few minutes; they are what tells us the plugin works inside Axolotl.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from axolotl_runner import axolotl, write_config
from fixtures import load_base
from peft import PeftModel

from axolotl_cat_plugin import CatConfig, attach_cat

pytestmark = pytest.mark.e2e
TOKENS = torch.tensor([[1, 10, 20, 30, 40, 50, 60, 70]])


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def adapter_config(folder: Path) -> dict:
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"])  # saved from a set
    return config


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.fixture(scope="module")
def trained(e2e_world, tmp_path_factory):
    """One CAT run of 4 steps that checkpoints at step 2."""
    folder = tmp_path_factory.mktemp("cat_run")
    before = {name: digests(path) for name, path in e2e_world["skills"].items()}
    config = write_config(e2e_world, folder, max_steps=4, save_strategy="steps", save_steps=2)
    result = axolotl("train", str(config), cwd=folder)
    assert result.returncode == 0, "axolotl train failed"
    return {
        "folder": folder,
        "config": config,
        "out": folder / "out",
        "before": before,
        "log": result.stdout + result.stderr,
    }


def test_output_dir_holds_a_standard_adapter_equal_to_the_trained_cat_model(e2e_world, trained):
    out = trained["out"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"]
    assert config["use_rslora"] is False and config["rank_pattern"] == {}

    record = json.loads((out / "cat_coefficients.json").read_text())
    adapters = [{"path": s["source"], "name": s["name"]} for s in record["skills"]]
    cat = attach_cat(
        load_base(e2e_world["base"]),
        CatConfig(skills=adapters, coefficients_from=str(out / "cat_coefficients.json")),
    )
    exported = PeftModel.from_pretrained(load_base(e2e_world["base"]), out)
    assert (logits(exported) - logits(cat)).abs().max() <= 1e-5


def test_coefficients_moved_and_were_logged(trained):
    record = json.loads((trained["out"] / "cat_coefficients.json").read_text())
    values = [c for entry in record["modules"].values() for c in entry["coefficients"].values()]
    assert values and any(abs(c - 1.0) > 1e-4 for c in values)
    assert record["training"]["steps"] == 4
    assert "cat/math/mean" in trained["log"]


def test_skill_sources_are_byte_identical_afterwards(e2e_world, trained):
    after = {name: digests(path) for name, path in e2e_world["skills"].items()}
    assert after == trained["before"]


def test_checkpoints_hold_a_loadable_adapter_and_the_raw_coefficients(trained):
    checkpoint = trained["out"] / "checkpoint-2"
    assert (checkpoint / "cat_coefficients.safetensors").is_file()
    assert (checkpoint / "cat_coefficients.json").is_file()
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"]


def test_merge_lora_equals_base_plus_adapter(e2e_world, trained):
    result = axolotl("merge-lora", str(trained["config"]), cwd=trained["folder"])
    assert result.returncode == 0
    merged_dir = trained["out"] / "merged"
    merged = load_base(merged_dir)
    expected = PeftModel.from_pretrained(load_base(e2e_world["base"]), trained["out"])
    assert (logits(merged) - logits(expected)).abs().max() <= 1e-5


def test_plain_lora_run_is_unchanged_by_listing_the_plugin(e2e_world, tmp_path):
    # Axolotl's own LoRA init is not seeded, so two runs never match bitwise; what must match
    # is everything the plugin could touch: the config written, the files, a clean run.
    lora = dict(
        adapter="lora",
        cat_merge=None,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
        max_steps=2,
    )
    with_plugin = write_config(e2e_world, tmp_path / "with", **lora)
    without = write_config(e2e_world, tmp_path / "without", plugins=None, **lora)
    run_with = axolotl("train", str(with_plugin), cwd=tmp_path)
    assert run_with.returncode == 0
    assert axolotl("train", str(without), cwd=tmp_path).returncode == 0

    out_with, out_without = tmp_path / "with" / "out", tmp_path / "without" / "out"
    assert sorted(p.name for p in out_with.iterdir()) == sorted(
        p.name for p in out_without.iterdir()
    )
    assert adapter_config(out_with) == adapter_config(out_without)
    assert "CAT:" not in run_with.stdout + run_with.stderr
