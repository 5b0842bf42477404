"""CAT computes ΔW_m = Σ_i c_{i,m} s_i B_i A_i, and its export reproduces the trained model.

The reference factors and scalings come from PEFT itself (each skill loaded as a normal
PEFT adapter), so the tests check our reading of rsLoRA, rank_pattern and alpha_pattern
against PEFT's, not against our own code.
"""

import json

import pytest
import torch
from fixtures import load_base
from peft import PeftModel

from axolotl_cat_plugin import CatConfig, attach_cat, export_cat
from axolotl_cat_plugin.core.state import is_coefficient

TOKENS = torch.tensor([[1, 10, 20, 30, 40, 50, 60, 70], [1, 15, 25, 35, 45, 55, 65, 75]])
TOLERANCE = 1e-5


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.float()


def cat_model(world, **options):
    adapters = [{"path": str(path), "name": name} for name, path in world["skills"].items()]
    return attach_cat(load_base(world["base"]), CatConfig(skills=adapters, **options))


def randomize(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_coefficient(name):
                param.copy_(torch.randn(param.shape, generator=generator) + 0.5)


def skill_factors(world):
    """{module: {skill: (A, B, scaling)}} as PEFT itself loads each skill."""
    factors = {}
    for name, path in world["skills"].items():
        peft_model = PeftModel.from_pretrained(load_base(world["base"]), path)
        for module_name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                factors.setdefault(module_name, {})[name] = (
                    module.lora_A["default"].weight.detach(),
                    module.lora_B["default"].weight.detach(),
                    module.scaling["default"],
                )
    return factors


def reference_model(world, coefficients):
    """The base with W += Σ c s B A written into its weights, from the reported coefficients."""
    model = load_base(world["base"])
    with torch.no_grad():
        for module_name, per_skill in skill_factors(world).items():
            weight = model.get_submodule(module_name).weight
            for skill, (lora_A, lora_B, scaling) in per_skill.items():
                c = torch.as_tensor(coefficients[module_name]["coefficients"][skill])
                weight += scaling * (lora_B * c) @ lora_A  # c: scalar, or one per component
    return model


GRANULARITIES = ["module", "layer", "model", "rank"]
PARAMETRIZATIONS = ["free", "softmax"]


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cat_equals_formula_export_and_merge(world, tmp_path, granularity, parametrization):
    model = cat_model(world, granularity=granularity, parametrization=parametrization)
    randomize(model)
    trained = logits(model)

    out = export_cat(model, tmp_path / "export")
    record = json.loads((out / "cat_coefficients.json").read_text())

    # (a) the CAT model is exactly base + Σ c s B A with the coefficients it reports
    expected = logits(reference_model(world, record["modules"]))
    assert (trained - expected).abs().max() <= TOLERANCE

    # (b) plain PEFT loads the export into a fresh base and gets the same model
    loaded = PeftModel.from_pretrained(load_base(world["base"]), out)
    assert (logits(loaded) - trained).abs().max() <= TOLERANCE

    # (c) and merging it into the weights changes nothing either
    merged = loaded.merge_and_unload()
    assert (logits(merged) - trained).abs().max() <= TOLERANCE


def test_export_is_one_plain_uniform_rank_adapter(world, tmp_path):
    model = cat_model(world)
    config = json.loads((export_cat(model, tmp_path / "x") / "adapter_config.json").read_text())
    # layer 1's v_proj carries math (r=4) and prose (r=3): the largest per-module sum
    assert config["peft_type"] == "LORA"
    assert config["r"] == config["lora_alpha"] == 7
    assert config["use_rslora"] is False and config["use_dora"] is False
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


def test_all_ones_equals_peft_multi_adapter_sum(world):
    peft_sum = PeftModel.from_pretrained(load_base(world["base"]), world["skills"]["math"], "math")
    for name in ("code", "prose"):
        peft_sum.load_adapter(world["skills"][name], adapter_name=name)
    peft_sum.base_model.set_adapter(["math", "code", "prose"])

    assert (logits(cat_model(world)) - logits(peft_sum)).abs().max() <= TOLERANCE


def test_softmax_starts_uniform_over_the_skills_present(world, tmp_path):
    record = json.loads(
        (
            export_cat(cat_model(world, parametrization="softmax"), tmp_path)
            / "cat_coefficients.json"
        ).read_text()
    )
    for entry in record["modules"].values():
        values = list(entry["coefficients"].values())
        assert not values or values == pytest.approx([1 / len(values)] * len(values))


def test_layer_and_adapter_granularity_share_coefficients(world, tmp_path):
    for granularity, group_of in (
        ("layer", lambda name: name.split(".")[2]),
        ("model", lambda name: "all"),
    ):
        model = cat_model(world, granularity=granularity)
        randomize(model)
        record = json.loads(
            (export_cat(model, tmp_path / granularity) / "cat_coefficients.json").read_text()
        )
        seen = {}
        for module_name, entry in record["modules"].items():
            for skill, c in entry["coefficients"].items():
                seen.setdefault((group_of(module_name), skill), set()).add(round(c, 7))
        assert all(len(values) == 1 for values in seen.values())


def test_rank_granularity_has_one_coefficient_per_component(world, tmp_path):
    record = json.loads(
        (
            export_cat(cat_model(world, granularity="rank"), tmp_path) / "cat_coefficients.json"
        ).read_text()
    )
    entry = record["modules"]["model.layers.0.self_attn.k_proj"]
    assert entry["coefficients"] == {"code": [1.0, 1.0, 1.0]}  # rank_pattern gives k_proj r=3
