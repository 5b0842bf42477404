"""`axolotl train` with a skill that saved modules in full (modules_to_save), for real.

A chat-style skill trains embed_tokens and lm_head in full next to its LoRA; the run must
fit their coefficients and leave, after Axolotl's own save, an export whose modules_to_save
hold M_base + c (M_chat - M_base) and that plain PEFT loads to the fitted model.
"""

import json

import pytest
import torch
import yaml
from axolotl_runner import axolotl, write_config
from fixtures import build_skill, load_base
from peft import PeftModel
from safetensors.torch import load_file, save_file

from axolotl_cat_plugin import CatConfig, attach_cat

pytestmark = pytest.mark.e2e
TOKENS = torch.tensor([[1, 10, 20, 30, 40, 50, 60, 70]])
SAVED_KEYS = ("base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight")


def test_axolotl_train_composes_modules_to_save(e2e_world, tmp_path):
    chat = build_skill(
        e2e_world["base"], tmp_path / "chat", seed=7, r=2, lora_alpha=4,
        target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"],
    )  # fmt: skip
    # build_skill perturbs the factors only: make the saved modules differ from the base's
    tensors = load_file(str(chat / "adapter_model.safetensors"))
    for key in SAVED_KEYS:
        tensors[key] = tensors[key] + 0.1 * torch.randn_like(tensors[key])
    save_file(tensors, str(chat / "adapter_model.safetensors"))
    config = write_config(e2e_world, tmp_path / "run", max_steps=3)
    settings = yaml.safe_load(config.read_text())
    settings["cat_merge"]["skills"] = [
        {"path": str(e2e_world["skills"]["math"]), "name": "math"},
        {"path": str(chat), "name": "chat"},
    ]
    config.write_text(yaml.safe_dump(settings))
    result = axolotl("train", str(config), cwd=tmp_path)
    assert result.returncode == 0, "axolotl train failed"

    out = tmp_path / "run" / "out"
    record = json.loads((out / "cat_coefficients.json").read_text())
    saved = record["saved_modules"]
    assert set(saved) == {"lm_head", "model.embed_tokens"}
    assert all(abs(entry["coefficients"]["chat"] - 1.0) > 1e-4 for entry in saved.values())
    modules_to_save = json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
    assert set(modules_to_save) == set(saved)

    # what Axolotl's own save left is M_base + c (M_chat - M_base)
    base = load_base(e2e_world["base"])
    written = load_file(str(out / "adapter_model.safetensors"))
    for name in saved:
        key = f"base_model.model.{name}.weight"
        w0 = base.get_submodule(name).weight.detach()
        expected = w0 + saved[name]["coefficients"]["chat"] * (tensors[key] - w0)
        assert (written[key] - expected).abs().max() <= 1e-6

    # and plain PEFT loads it to the model the fitted coefficients describe
    adapters = [{"path": s["source"], "name": s["name"]} for s in record["skills"]]
    cat = attach_cat(
        load_base(e2e_world["base"]),
        CatConfig(skills=adapters, coefficients_from=str(out / "cat_coefficients.json")),
    )
    exported = PeftModel.from_pretrained(load_base(e2e_world["base"]), out)
    with torch.no_grad():
        difference = exported(input_ids=TOKENS).logits - cat(input_ids=TOKENS).logits
    assert difference.abs().max() <= 1e-5
