"""Granularity `core` stays in the span of the skills' own factors, also when they are
rank-deficient: an untrained skill (PEFT's init, lora_B = 0), a skill listed twice.

The span is computed here from the factors PEFT itself loads, not from core_space.py; the
exported update is read from the export's own tensors (B A, scaling 1) in float64.
"""

import json

import pytest
import torch
from fixtures import load_base
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_exactness import TOKENS, TOLERANCE, logits, skill_factors

from axolotl_cat_plugin import CatConfig, attach_cat, export_cat
from axolotl_cat_plugin.core.format import peft_key
from axolotl_cat_plugin.core.state import coefficient_parameters

OUTSIDE = 1e-6  # the share of the update's norm allowed outside the skills' span


def untrained_skill(world, folder, seed=0, target_modules=("q_proj", "k_proj")):
    """A LoRA exactly as PEFT creates it (lora_B = 0), saved before any training step."""
    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=list(target_modules))
    get_peft_model(load_base(world["base"]), config).save_pretrained(folder)
    return folder


def fit(model, steps=20, lr=0.01):
    """Adam on the coefficients, as a trainer would."""
    optimizer = torch.optim.Adam(coefficient_parameters(model).values(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        optimizer.step()
    return model


def exported_updates(folder) -> dict[str, torch.Tensor]:
    """{module: ΔW} of an export (scaling 1), float64."""
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"]
    tensors = load_file(folder / "adapter_model.safetensors")
    updates = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            lora_B = tensors[peft_key(module, "B")].double()
            updates[module] = lora_B @ tensors[key].double()
    return updates


def span(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space, at the rank torch.linalg.matrix_rank finds."""
    u, s, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u[:, : int(torch.linalg.matrix_rank(matrix.double()))]


def outside_share(delta: torch.Tensor, factors) -> float:
    """‖ΔW - P_B ΔW P_A‖ / ‖ΔW‖ with P_B, P_A the projections on span{s_i B_i}, span{A_iᵀ}."""
    q_out = span(torch.cat([s * B for _, B, s in factors], 1))
    q_in = span(torch.cat([A for A, _, _ in factors]).t())
    inside = q_out @ (q_out.t() @ delta @ q_in) @ q_in.t()
    norm = float(delta.norm())
    return float((delta - inside).norm()) / norm if norm else 0.0


def core_model(world, skills):
    adapters = [{"path": str(path), "name": name} for name, path in skills.items()]
    return attach_cat(load_base(world["base"]), CatConfig(skills=adapters, granularity="core"))


def test_a_trained_and_an_untrained_skill_stay_in_their_span(world, tmp_path, caplog):
    fresh = untrained_skill(world, tmp_path / "fresh")
    skills = {"math": world["skills"]["math"], "fresh": fresh}
    with caplog.at_level("WARNING", logger="axolotl_cat_plugin"):
        model = fit(core_model(world, skills))
    assert "skill 'fresh'" in caplog.text and "peft#1402" in caplog.text
    out = export_cat(model, tmp_path / "out")
    updates = exported_updates(out)
    peft = skill_factors({"base": world["base"], "skills": skills})
    for module, per_skill in peft.items():
        delta = updates[module]
        if all(not B.any() for _, B, _ in per_skill.values()):  # only `fresh` here: span {0}
            assert not delta.any(), module
        else:
            assert delta.norm() > 0
            assert outside_share(delta, per_skill.values()) <= OUTSIDE, module

    record = json.loads((out / "cat_coefficients.json").read_text())
    k_proj = record["modules"]["model.layers.0.self_attn.k_proj"]
    q_proj = record["modules"]["model.layers.0.self_attn.q_proj"]
    assert k_proj["kept_directions"] == {"lora_A": 2, "lora_B": 0}
    assert q_proj["kept_directions"] == {"lora_A": 6, "lora_B": 4}  # fresh's B adds nothing


def test_a_skill_listed_twice_keeps_one_skills_directions(world, tmp_path):
    math = world["skills"]["math"]
    model = fit(core_model(world, {"math": math, "math-again": math}))
    out = export_cat(model, tmp_path / "out")
    peft = skill_factors({"base": world["base"], "skills": {"math": math}})
    updates = exported_updates(out)
    for module, per_skill in peft.items():
        assert outside_share(updates[module], per_skill.values()) <= OUTSIDE, module
    record = json.loads((out / "cat_coefficients.json").read_text())
    assert {json.dumps(e["kept_directions"]) for e in record["modules"].values()} == {
        json.dumps({"lora_A": 4, "lora_B": 4})
    }
    # R shrinks to the span: math's r = 4, not the concatenated 8
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_two_untrained_skills_export_a_zero_update(world, tmp_path):
    skills = {
        "fresh": untrained_skill(world, tmp_path / "fresh", seed=1),
        "fresh2": untrained_skill(world, tmp_path / "fresh2", seed=2, target_modules=["q_proj"]),
    }
    model = fit(core_model(world, skills))
    out = export_cat(model, tmp_path / "out")
    assert all(not delta.any() for delta in exported_updates(out).values())
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(load_base(world["base"]), out)
    assert (logits(loaded) - logits(load_base(world["base"]))).abs().max() <= TOLERANCE


@pytest.mark.parametrize("granularity", ["module", "rank"])
def test_an_untrained_skill_is_named_in_every_granularity(world, tmp_path, caplog, granularity):
    fresh = untrained_skill(world, tmp_path / "fresh")
    adapters = [{"path": str(world["skills"]["math"]), "name": "math"}, str(fresh)]
    with caplog.at_level("WARNING", logger="axolotl_cat_plugin"):
        attach_cat(load_base(world["base"]), CatConfig(skills=adapters, granularity=granularity))
    warned = [r.message for r in caplog.records if "peft#1402" in r.message]
    assert len(warned) == 1 and "skill 'fresh'" in warned[0]
