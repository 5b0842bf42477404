"""Exporting at a lower rank keeps the best approximation; pruning drops small coefficients.

`export_cat(model, dir, rank=k)` writes, for every module, the best rank-k approximation of
its ΔW (Eckart-Young) and records the relative Frobenius error of that truncation; `rank`
equal to the concatenated rank loses nothing. `prune_threshold=t` removes exactly the
skill blocks (or, with granularity `rank`, the components) whose |c| < t, which is the
CAT model with those coefficients set to 0, and the exported rank shrinks to the largest
rank that any module keeps. Bad requests are refused before anything is written.
"""

import json
import math

import pytest
import torch
from fixtures import SKILL_SPECS, load_base
from peft import PeftModel
from safetensors.torch import load_file

from axolotl_cat_plugin import CatConfig, CatError, attach_cat, export_cat
from axolotl_cat_plugin.core.state import is_coefficient, state_of

TOKENS = torch.tensor([[1, 10, 20, 30, 40, 50, 60, 70], [1, 15, 25, 35, 45, 55, 65, 75]])
CONCATENATED_RANK = 7  # layer 1's v_proj: math (r=4) + prose (r=3)
THRESHOLD = 0.25
# (module, skill) blocks to push below THRESHOLD; gate_proj of layer 1 carries prose only
PRUNED = {
    ("model.layers.1.self_attn.v_proj", "math"): 0.01,
    ("model.layers.0.self_attn.q_proj", "code"): -0.2,
    ("model.layers.1.mlp.gate_proj", "prose"): 0.0,
}


def cat_model(world, **options):
    adapters = [{"path": str(path), "name": name} for name, path in world["skills"].items()]
    model = attach_cat(load_base(world["base"]), CatConfig(skills=adapters, **options))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every |c| in [0.5, 1.5], with both signs: far from THRESHOLD
        for name, param in model.named_parameters():
            if is_coefficient(name):
                magnitude = torch.rand(param.shape, generator=generator) + 0.5
                sign = torch.randint(0, 2, param.shape, generator=generator) * 2 - 1
                param.copy_(magnitude * sign)
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.float()


def loaded(world, folder):
    return PeftModel.from_pretrained(load_base(world["base"]), folder)


def read_export(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    record = json.loads((folder / "cat_coefficients.json").read_text())
    return config, record, load_file(str(folder / "adapter_model.safetensors"))


def delta(tensors, module, config):
    """ΔW of one module as the exported adapter applies it (float64)."""
    lora_A = tensors[f"base_model.model.{module}.lora_A.weight"].double()
    lora_B = tensors[f"base_model.model.{module}.lora_B.weight"].double()
    return config["lora_alpha"] / config["r"] * lora_B @ lora_A


def skill_rank(skill, module):
    spec = SKILL_SPECS[skill]
    return (spec.get("rank_pattern") or {}).get(module.rsplit(".", 1)[-1], spec["r"])


def set_coefficient(model, module, skill, value, rows=slice(None)):
    layer = model.get_submodule(f"base_model.model.{module}")
    with torch.no_grad():
        state_of(layer).coefficients[rows, state_of(layer).skill_names.index(skill)] = value


@pytest.fixture(scope="module")
def plain(world, tmp_path_factory):
    """The randomised CAT model, its logits, and its exact (unpruned, full-rank) export."""
    model = cat_model(world)
    folder = export_cat(model, tmp_path_factory.mktemp("plain"))
    return model, logits(model), read_export(folder)


def test_full_rank_svd_export_equals_the_plain_export(world, plain, tmp_path):
    model, trained, _ = plain
    folder = export_cat(model, tmp_path / "svd", rank=CONCATENATED_RANK)
    config, record, _ = read_export(folder)
    assert config["r"] == CONCATENATED_RANK
    assert all(entry["svd_relative_error"] <= 1e-6 for entry in record["modules"].values())
    assert (logits(loaded(world, folder)) - trained).abs().max() <= 1e-5


@pytest.mark.parametrize("k", [1, 3, 5])
def test_low_rank_export_is_the_best_rank_k_approximation(plain, tmp_path, k):
    model, _, (plain_config, plain_record, plain_tensors) = plain
    config, record, tensors = read_export(export_cat(model, tmp_path / "svd", rank=k))
    assert config["r"] == config["lora_alpha"] == k
    assert record["export_rank"] == k and record["exported_rank"] == k
    truncated = 0
    for module in plain_record["modules"]:
        full = delta(plain_tensors, module, plain_config)
        u, s, vh = torch.linalg.svd(full)
        total = float(s.square().sum())
        expected_error = math.sqrt(float(s[k:].square().sum()) / total) if total else 0.0
        assert record["modules"][module]["svd_relative_error"] == pytest.approx(
            expected_error, abs=1e-6
        ), module
        best = (u[:, :k] * s[:k]) @ vh[:k]
        exported = delta(tensors, module, config)
        assert tensors[f"base_model.model.{module}.lora_A.weight"].shape[0] == k
        assert torch.linalg.norm(exported - best) <= 1e-4 * max(torch.linalg.norm(full), 1e-12)
        truncated += expected_error > 1e-3
    assert truncated, "some module must lose something at this rank"


@pytest.mark.parametrize("rank", [0, -1, CONCATENATED_RANK + 1, 2.5, "3", True])
def test_export_rank_outside_one_to_the_concatenated_rank_is_refused(plain, tmp_path, rank):
    model = plain[0]
    with pytest.raises(CatError, match="export_rank"):
        export_cat(model, tmp_path / "out", rank=rank)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("threshold", [-0.1, math.nan, math.inf, "0.1"])
def test_invalid_prune_threshold_is_refused(plain, tmp_path, threshold):
    with pytest.raises(CatError, match="prune_threshold"):
        export_cat(plain[0], tmp_path / "out", prune_threshold=threshold)
    assert not (tmp_path / "out").exists()


def test_pruning_removes_exactly_the_blocks_below_the_threshold(world, plain, tmp_path):
    _, _, (_, plain_record, _) = plain
    model = cat_model(world)
    for (module, skill), value in PRUNED.items():
        set_coefficient(model, module, skill, value)
    set_coefficient(model, "model.layers.0.self_attn.v_proj", "math", -THRESHOLD)  # |c| = t: kept

    folder = export_cat(model, tmp_path / "pruned", prune_threshold=THRESHOLD)
    config, record, _ = read_export(folder)

    expected_ranks = {}
    for module, entry in record["modules"].items():
        pruned = {skill for (m, skill) in PRUNED if m == module}
        if pruned:  # granularity module: a pruned skill loses all of its components
            expected = {skill: list(range(skill_rank(skill, module))) for skill in pruned}
            assert entry["pruned"] == expected, module
        else:
            assert "pruned" not in entry, module
        removed = sum(len(components) for components in entry.get("pruned", {}).values())
        expected_ranks[module] = plain_record["modules"][module]["rank"] - removed
        assert entry["rank"] == expected_ranks[module], module
    assert record["modules"]["model.layers.1.mlp.gate_proj"]["rank"] == 0
    assert config["r"] == max(expected_ranks.values()) == 6  # layer 1's q_proj: math 4 + code 2

    for module, skill in PRUNED:
        set_coefficient(model, module, skill, 0.0)
    assert (logits(loaded(world, folder)) - logits(model)).abs().max() <= 1e-5


def test_pruning_with_rank_granularity_works_per_component(world, tmp_path):
    model = cat_model(world, granularity="rank")
    module = "model.layers.0.self_attn.q_proj"  # math r=4, code r=2
    set_coefficient(model, module, "math", 0.05, rows=[1, 3])
    set_coefficient(model, module, "math", THRESHOLD, rows=[2])  # |c| = t: kept
    set_coefficient(model, module, "code", -0.1, rows=[0])

    folder = export_cat(model, tmp_path / "pruned", prune_threshold=THRESHOLD)
    config, record, _ = read_export(folder)
    entry = record["modules"][module]
    assert entry["pruned"] == {"math": [1, 3], "code": [0]}
    assert entry["rank"] == 6 - 3
    assert sum("pruned" in e for e in record["modules"].values()) == 1
    assert config["r"] == CONCATENATED_RANK  # layer 1's v_proj keeps everything

    set_coefficient(model, module, "math", 0.0, rows=[1, 3])
    set_coefficient(model, module, "code", 0.0, rows=[0])
    assert (logits(loaded(world, folder)) - logits(model)).abs().max() <= 1e-5


def test_pruning_then_svd_compresses_what_is_kept(world, tmp_path):
    model = cat_model(world)
    for (module, skill), value in PRUNED.items():
        set_coefficient(model, module, skill, value)
    pruned = export_cat(model, tmp_path / "pruned", prune_threshold=THRESHOLD)
    both = export_cat(model, tmp_path / "both", prune_threshold=THRESHOLD, rank=6)
    config, record, _ = read_export(both)
    assert config["r"] == 6
    assert all(entry["svd_relative_error"] <= 1e-6 for entry in record["modules"].values())
    assert (logits(loaded(world, both)) - logits(loaded(world, pruned))).abs().max() <= 1e-5


@pytest.mark.parametrize("rank", [None, 2])
def test_pruning_every_skill_everywhere_is_refused(plain, tmp_path, rank):
    with pytest.raises(CatError, match="prune_threshold"):
        export_cat(plain[0], tmp_path / "out", prune_threshold=2.0, rank=rank)
    assert not (tmp_path / "out").exists()
