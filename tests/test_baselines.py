"""Static mixes set in place on a CAT model equal PEFT's own adapters with those weights."""

import pytest
import torch
from fixtures import load_base
from peft import PeftModel
from test_core_granularity import randomize_cores
from test_exactness import TOLERANCE, cat_model, logits, randomize

from axolotl_cat_plugin import CatError
from axolotl_cat_plugin.core.fit.baselines import static_coefficients, static_mixes

SKILLS = ("math", "code", "prose")  # the world's skills, in the order cat_model lists them


def peft_mix(world, weights):
    """PEFT's multi-adapter forward with each skill's lora_B scaled by its weight."""
    model = PeftModel.from_pretrained(
        load_base(world["base"]), world["skills"][SKILLS[0]], SKILLS[0]
    )
    for name in SKILLS[1:]:
        model.load_adapter(world["skills"][name], adapter_name=name)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B"):
                for name, weight in zip(SKILLS, weights, strict=True):
                    if name in module.lora_B:
                        module.lora_B[name].weight *= weight
    model.base_model.set_adapter(list(SKILLS))
    return model


def test_mixes_name_each_skill_the_sum_and_the_average():
    assert static_mixes(["a", "b"]) == {
        "a alone": [1.0, 0.0],
        "b alone": [0.0, 1.0],
        "uniform sum": [1.0, 1.0],
        "average": [0.5, 0.5],
    }


@pytest.mark.parametrize(
    "granularity,parametrization",
    [
        ("module", "free"),
        ("rank", "free"),
        ("layer", "softmax"),
        ("model", "free"),
        ("core", "free"),
    ],
)
def test_static_mix_equals_peft_and_restores_the_fit(world, granularity, parametrization):
    model = cat_model(world, granularity=granularity, parametrization=parametrization)
    (randomize_cores if granularity == "core" else randomize)(model)
    fitted = logits(model)
    for weights in ([0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.5, -0.25, 2.0]):
        with static_coefficients(model, weights):
            assert (logits(model) - logits(peft_mix(world, weights))).abs().max() <= TOLERANCE
        assert torch.equal(logits(model), fitted)  # restored bit for bit


def test_static_mix_refuses_a_wrong_number_of_weights(world):
    model = cat_model(world)
    fitted = logits(model)
    with (
        pytest.raises(CatError, match="2 weights for 3 skills"),
        static_coefficients(model, [1.0, 1.0]),
    ):
        pass
    assert torch.equal(logits(model), fitted)
