"""`axolotl-cat merge` says what each method computes: PEFT's `linear` combines lora_A and
lora_B separately, so over skills whose factors differ its update is not Σ w_i ΔW_i; it warns
and points to `concat`, and merge_record.json records how far from the sum the result is.
The reference is PEFT: each skill loaded as an adapter, its get_delta_weight."""

import json

import pytest
import torch
from fixtures import build_skill, load_base
from peft import PeftModel

from axolotl_cat_plugin.cli import main
from axolotl_cat_plugin.core.merge.record import SUM_TOLERANCE


@pytest.fixture(scope="module")
def twins(world, tmp_path_factory):
    """Two skills of math's rank: `other` on math's modules, `apart` on modules math leaves."""
    root = tmp_path_factory.mktemp("twins")
    targets = ["q_proj", "v_proj", "down_proj"]
    other = build_skill(
        world["base"], root / "other", seed=7, r=4, lora_alpha=8, target_modules=targets
    )
    apart = build_skill(
        world["base"], root / "apart", seed=8, r=4, lora_alpha=2, target_modules=["k_proj"]
    )
    return {"math": world["skills"]["math"], "other": other, "apart": apart}


def merge(world, out, method, weights, skills):
    argv = [
        "merge",
        "--method",
        method,
        "--weights",
        *map(str, weights),
        "--base",
        str(world["base"]),
    ]
    assert main([*argv, "--out", str(out), *(f"{n}={p}" for n, p in skills.items())]) == 0
    return json.loads((out / "merge_record.json").read_text())


def relative_difference(world, out, skills, weights, module):
    """‖ΔW_merged - Σ w_i ΔW_i‖ / ‖Σ w_i ΔW_i‖ on one module, from PEFT's own deltas."""
    names = list(skills)
    peft = PeftModel.from_pretrained(
        load_base(world["base"]), skills[names[0]], adapter_name=names[0]
    )
    for name in names[1:]:
        peft.load_adapter(skills[name], adapter_name=name)
    peft.load_adapter(out, adapter_name="merged")
    layer = peft.base_model.model.get_submodule(module)
    total = sum(
        w * layer.get_delta_weight(n).double()
        for n, w in zip(names, weights, strict=True)
        if n in layer.scaling
    )
    return float((layer.get_delta_weight("merged").double() - total).norm() / total.norm())


def test_linear_over_differing_factors_warns_and_records_it(world, twins, tmp_path, caplog):
    skills = {"math": twins["math"], "other": twins["other"]}
    with caplog.at_level("WARNING", logger="axolotl_cat_plugin"):
        record = merge(world, tmp_path / "linear", "linear", [1, 1], skills)
    warned = [r.message for r in caplog.records if "--method linear" in r.message]
    assert (
        len(warned) == 1 and "not the weighted sum" in warned[0] and "--method concat" in warned[0]
    )
    assert record["method"] == "linear" and record["sum_of_updates"] is False
    assert "cross terms" in record["computes"] and record["weights"] == [1.0, 1.0]
    assert [s["name"] for s in record["skills"]] == ["math", "other"]
    # the recorded figure is PEFT's own difference on the module it names
    measured = relative_difference(
        world, tmp_path / "linear", skills, [1, 1], record["largest_difference_on"]
    )
    assert record["relative_difference_from_sum"] == pytest.approx(measured, rel=1e-4)
    assert measured > SUM_TOLERANCE


def test_linear_with_one_skill_per_module_is_the_sum_and_says_so(world, twins, tmp_path, caplog):
    skills = {"math": twins["math"], "apart": twins["apart"]}
    with caplog.at_level("WARNING", logger="axolotl_cat_plugin"):
        record = merge(world, tmp_path / "linear", "linear", [0.5, 2], skills)
    assert "--method linear" not in caplog.text
    assert record["sum_of_updates"] is True
    assert record["relative_difference_from_sum"] <= SUM_TOLERANCE


def test_concat_records_that_it_is_the_sum(world, twins, tmp_path):
    skills = {"math": twins["math"], "other": twins["other"]}
    record = merge(world, tmp_path / "concat", "concat", [1, 1], skills)
    assert record["sum_of_updates"] is True and "exactly" in record["computes"]
    module = "model.layers.0.self_attn.q_proj"
    assert relative_difference(world, tmp_path / "concat", skills, [1, 1], module) <= 1e-6
    assert torch.isfinite(torch.tensor(record["relative_difference_from_sum"]))
