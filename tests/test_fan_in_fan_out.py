"""fan_in_fan_out is decided by the layer type, as PEFT decides it on load (Conv1D -> True,
Linear -> False, whatever adapter_config.json says): skills whose saved flags disagree compose
exactly, and the export carries the flag its layers need. The reference is PEFT loading the
same skills with their (partly wrong) flags."""

import json
import shutil

import pytest
import torch
from fixtures import load_base
from peft import LoraConfig, PeftModel, get_peft_model
from test_exactness import TOLERANCE
from transformers import GPT2Config, GPT2LMHeadModel

from axolotl_cat_plugin import CatConfig, attach_cat, export_cat

TOKENS = torch.tensor([[1, 10, 20, 30, 40, 50, 60, 70]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.float()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    GPT2LMHeadModel(config).save_pretrained(root / "base")
    return root


def gpt2_base(root):
    return GPT2LMHeadModel.from_pretrained(root / "base", dtype=torch.float32).eval()


def save_skill(root, name, seed, targets, flag):
    """A skill with random factors, its adapter_config.json then saying fan_in_fan_out=flag
    (as older tools wrote it, right or wrong)."""
    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(gpt2_base(root), config)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                param.copy_(torch.randn_like(param) * 0.2)
    model.save_pretrained(root / name)
    path = root / name / "adapter_config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "fan_in_fan_out": flag}))
    return root / name


def test_gpt2_skills_with_disagreeing_flags_compose_exactly(gpt2, tmp_path):
    old = save_skill(gpt2, "old", 1, ["c_attn"], True)
    fresh = save_skill(gpt2, "fresh", 2, ["c_attn", "c_proj"], False)  # wrong for Conv1D
    reference = PeftModel.from_pretrained(gpt2_base(gpt2), old, adapter_name="old")
    reference.load_adapter(fresh, adapter_name="fresh")
    reference.base_model.set_adapter(["old", "fresh"])  # the plain sum, as PEFT loads them

    skills = [{"path": str(old), "name": "old"}, {"path": str(fresh), "name": "fresh"}]
    model = attach_cat(gpt2_base(gpt2), CatConfig(skills=skills))
    assert (logits(model) - logits(reference)).abs().max() <= TOLERANCE

    out = export_cat(model, tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    loaded = PeftModel.from_pretrained(gpt2_base(gpt2), out)
    assert (logits(loaded) - logits(reference)).abs().max() <= TOLERANCE


def test_gpt2_skills_agreeing_on_the_wrong_flag_export_the_right_one(gpt2, tmp_path):
    wrong = save_skill(gpt2, "wrong", 3, ["c_attn"], False)
    model = attach_cat(gpt2_base(gpt2), CatConfig(skills=[str(wrong)]))
    out = export_cat(model, tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_llama_skill_saved_with_fan_in_fan_out_true_exports_false(world, tmp_path):
    skill = tmp_path / "math"
    shutil.copytree(world["skills"]["math"], skill)
    saved = json.loads((skill / "adapter_config.json").read_text())
    (skill / "adapter_config.json").write_text(json.dumps({**saved, "fan_in_fan_out": True}))
    reference = PeftModel.from_pretrained(load_base(world["base"]), world["skills"]["math"])
    model = attach_cat(load_base(world["base"]), CatConfig(skills=[str(skill)]))
    assert (logits(model) - logits(reference)).abs().max() <= TOLERANCE
    out = export_cat(model, tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is False
