"""Granularity `core`: a learned R x R core per module in the skills' joint subspace.

ΔW = Q_B M Q_Aᵀ with B = [s_1 B_1 ... s_K B_K] = Q_B R_B and Aᵀ = [A_1; ...; A_K]ᵀ = Q_A R_A,
M starting at init · R_B R_Aᵀ (the plain sum of the skills). The references are PEFT's own:
the skills loaded as PEFT adapters, the export loaded by plain PEFT and merged.
"""

import json

import pytest
import torch
from fixtures import load_base
from peft import PeftModel
from test_exactness import TOLERANCE, cat_model, logits, reference_model, skill_factors

from axolotl_cat_plugin import CatConfig, CatError, attach_cat, export_cat
from axolotl_cat_plugin.core import cat_layers
from axolotl_cat_plugin.core.state import is_coefficient, state_of, weighted


def cores(model):
    return [layer for _, layer in cat_layers(model) if weighted(layer)]


def randomize_cores(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in cores(model):
            noise = torch.randn(state_of(layer).coefficients.shape, generator=generator)
            state_of(layer).coefficients += 0.3 * noise * state_of(layer).coefficients.abs().mean()


def test_core_starts_as_the_plain_sum_of_the_skills(world, tmp_path):
    peft_sum = PeftModel.from_pretrained(load_base(world["base"]), world["skills"]["math"], "math")
    for name in ("code", "prose"):
        peft_sum.load_adapter(world["skills"][name], adapter_name=name)
    peft_sum.base_model.set_adapter(["math", "code", "prose"])
    model = cat_model(world, granularity="core")
    assert (logits(model) - logits(peft_sum)).abs().max() <= TOLERANCE

    record = json.loads((export_cat(model, tmp_path) / "cat_coefficients.json").read_text())
    for entry in record["modules"].values():
        assert all(c == pytest.approx(1.0, abs=1e-5) for c in entry["coefficients"].values())
        if entry["coefficients"]:
            assert entry["core_residual"] == pytest.approx(0.0, abs=1e-5)


def test_init_scales_the_starting_core(world):
    base_logits = logits(load_base(world["base"]))
    full = logits(cat_model(world, granularity="core")) - base_logits
    half = logits(cat_model(world, granularity="core", init=0.0)) - base_logits
    assert full.abs().max() > 1e-3
    assert half.abs().max() <= TOLERANCE  # init 0: no update at all


def test_learned_core_exports_exactly(world, tmp_path):
    model = cat_model(world, granularity="core")
    randomize_cores(model)
    trained = logits(model)
    out = export_cat(model, tmp_path / "export")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 7  # the largest per-module concatenation

    loaded = PeftModel.from_pretrained(load_base(world["base"]), out)
    assert (logits(loaded) - trained).abs().max() <= TOLERANCE
    merged = loaded.merge_and_unload()
    assert (logits(merged) - trained).abs().max() <= TOLERANCE


def test_update_stays_in_the_span_of_the_skills_factors(world, tmp_path):
    model = cat_model(world, granularity="core")
    randomize_cores(model, seed=3)
    merged = PeftModel.from_pretrained(
        load_base(world["base"]), export_cat(model, tmp_path)
    ).merge_and_unload()
    base = load_base(world["base"])
    for module_name, per_skill in skill_factors(world).items():
        delta = (
            merged.get_submodule(module_name).weight - base.get_submodule(module_name).weight
        ).detach()
        columns = torch.cat([B for _, B, _ in per_skill.values()], 1).double()
        rows = torch.cat([A for A, _, _ in per_skill.values()]).double()
        q_out, _ = torch.linalg.qr(columns)
        q_in, _ = torch.linalg.qr(rows.t())
        delta = delta.double()
        outside = delta - q_out @ (q_out.t() @ delta @ q_in) @ q_in.t()
        assert outside.abs().max() <= 1e-5 * max(1.0, float(delta.abs().max()))


def test_a_core_that_is_a_weighting_reports_those_weights(world, tmp_path):
    """M = Σ c_i C_i is per-module CAT with coefficients c: same model, same record."""
    chosen = {"math": 0.7, "code": -0.4, "prose": 1.9}
    model = cat_model(world, granularity="core")
    with torch.no_grad():
        for layer in cores(model):
            weights = torch.tensor([chosen[name] for name in state_of(layer).skill_names])
            state_of(layer).coefficients.copy_(
                torch.einsum("i,iab->ab", weights, state_of(layer).skill_cores)
            )
    out = export_cat(model, tmp_path)
    record = json.loads((out / "cat_coefficients.json").read_text())
    for entry in record["modules"].values():
        for skill, c in entry["coefficients"].items():
            assert c == pytest.approx(chosen[skill], abs=1e-4)
    module_form = {
        name: {"coefficients": {skill: chosen[skill] for skill in entry["coefficients"]}}
        for name, entry in record["modules"].items()
    }
    expected = logits(reference_model(world, module_form))
    assert (logits(model) - expected).abs().max() <= TOLERANCE


def test_resume_from_the_record_restores_the_core(world, tmp_path):
    model = cat_model(world, granularity="core")
    randomize_cores(model, seed=5)
    out = export_cat(model, tmp_path / "first")
    adapters = [{"path": str(path), "name": name} for name, path in world["skills"].items()]
    resumed = attach_cat(
        load_base(world["base"]),
        CatConfig(
            skills=adapters,
            granularity="core",
            coefficients_from=str(out / "cat_coefficients.json"),
        ),
    )
    assert (logits(resumed) - logits(model)).abs().max() <= TOLERANCE


def test_only_the_cores_train_and_they_get_gradients(world):
    model = cat_model(world, granularity="core")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_coefficient(name) for name in trainable)
    tokens = torch.tensor([[1, 10, 20, 30, 40, 50]])
    model(input_ids=tokens, labels=tokens).loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if is_coefficient(name)]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(g.abs().max() > 0 for g in grads)


def test_svd_export_of_a_core_fit(world, tmp_path):
    model = cat_model(world, granularity="core")
    randomize_cores(model)
    out = export_cat(model, tmp_path, rank=3)
    record = json.loads((out / "cat_coefficients.json").read_text())
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    errors = [entry.get("svd_relative_error", 0.0) for entry in record["modules"].values()]
    assert all(0.0 <= error < 1.0 for error in errors) and max(errors) > 0.0


def test_core_refuses_softmax_and_pruning(world, tmp_path):
    adapters = [str(path) for path in world["skills"].values()]
    with pytest.raises(CatError, match="parametrization free"):
        CatConfig(skills=adapters, granularity="core", parametrization="softmax")
    with pytest.raises(CatError, match="export_rank"):
        export_cat(cat_model(world, granularity="core"), tmp_path, prune_threshold=0.1)
