"""`axolotl train` with the skills people really have, for real: modules_to_save, MoE experts.

A chat-style skill trains embed_tokens and lm_head in full next to its LoRA; the run must
fit their coefficients and leave, after Axolotl's own save, an export whose modules_to_save
hold M_base + c (M_chat - M_base) and that plain PEFT loads to the fitted model. A Mixtral
skill with LoRA on its fused experts (target_parameters) must be fitted and exported alike.
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


def test_axolotl_train_composes_expert_skills(e2e_world, tmp_path):
    """A Mixtral whose skills put LoRA on the fused experts (target_parameters): `axolotl
    train` fits their coefficients, and its export is the standard target_parameters adapter
    plain PEFT loads to the model the record's coefficients describe."""
    from fixtures import build_tokenizer
    from test_real_skills import build_skill as build_any_skill
    from test_real_skills import load
    from transformers import MixtralConfig, MixtralForCausalLM

    base = tmp_path / "mixtral"
    tokenizer = build_tokenizer(base)
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(base)
    fused = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    skills = {
        "experts": build_any_skill(base, tmp_path / "experts", seed=1, r=2, lora_alpha=4,
                                   target_modules=["q_proj"], target_parameters=fused),
        "attn": build_any_skill(base, tmp_path / "attn", seed=2, r=2, lora_alpha=4,
                                target_modules=["q_proj", "v_proj"]),
    }  # fmt: skip
    run = write_config({**e2e_world, "base": base}, tmp_path / "run", max_steps=3)
    settings = yaml.safe_load(run.read_text())
    settings["cat_merge"]["skills"] = [{"path": str(p), "name": n} for n, p in skills.items()]
    run.write_text(yaml.safe_dump(settings))
    result = axolotl("train", str(run), cwd=tmp_path)
    assert result.returncode == 0, "axolotl train failed"

    out = tmp_path / "run" / "out"
    record = json.loads((out / "cat_coefficients.json").read_text())
    entry = record["modules"]["model.layers.0.mlp.experts.gate_up_proj"]["coefficients"]
    assert abs(entry["experts"] - 1.0) > 1e-4  # fitted
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    adapters = [{"path": str(p), "name": n} for n, p in skills.items()]
    fitted = CatConfig(skills=adapters, coefficients_from=str(out / "cat_coefficients.json"))
    cat = attach_cat(load(base), fitted)
    loaded = PeftModel.from_pretrained(load(base), out)
    with torch.no_grad():
        difference = loaded(input_ids=TOKENS).logits - cat(input_ids=TOKENS).logits
    assert difference.abs().max() <= 1e-5
