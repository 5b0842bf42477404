"""Skills with LoRA on MoE expert weights, both forms PEFT loads, composed by CAT exactly.

- `target_parameters` (PEFT's ParamWrapper on the fused 3-D expert parameters of a
  transformers-v5 Mixtral, and on its 2-D router weight), nested wrappers included;
- the older per-expert Linear layout (`block_sparse_moe.experts.N.w1/w2/w3`), which PEFT
  converts to the first form when it loads it.

Exact means: the CAT model == base + Σ c·ΔP with every ΔP from PEFT's own get_delta_weight of
the loaded skill == the export loaded by plain PEFT == its merge_and_unload (fp32, <= 1e-5).
Tiny bases built here; nothing is downloaded.
"""

import json
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import ParamWrapper
from safetensors.torch import load_file, save_file
from test_exactness import randomize
from test_real_skills import (
    SMALL,
    TOKENS,
    TOLERANCE,
    WEIGHTS,
    adapters,
    assert_exact,
    build_model,
    build_skill,
    load,
    logits,
    refused,
)
from torch import nn
from transformers import MixtralConfig

from axolotl_cat_plugin import CatConfig, CatError, attach_cat, export_cat
from axolotl_cat_plugin.core.layers import experts
from axolotl_cat_plugin.core.state import (
    cat_layers,
    coefficient_parameters,
    is_coefficient,
    state_of,
)

FUSED = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
EXPERTS = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    config = MixtralConfig(**SMALL, num_local_experts=EXPERTS, num_experts_per_tok=2)
    return build_model(tmp_path_factory.mktemp("bases") / "mixtral", config)


@pytest.fixture(scope="module")
def skills(base, tmp_path_factory):
    """Three skills whose ParamWrappers nest differently: `both` (attention + both expert
    parameters: down_proj outside, gate_up_proj inside), `gate` (gate_up_proj alone, so its
    outermost wrapper, and the router's 2-D weight) and `attn` (no experts)."""
    root = tmp_path_factory.mktemp("skills")
    return {
        "both": build_skill(base, root / "both", seed=1, r=2, lora_alpha=4,
                            target_modules=["q_proj"], target_parameters=FUSED),
        "gate": build_skill(base, root / "gate", seed=2, r=3, lora_alpha=3, use_rslora=True,
                            target_modules=[],
                            target_parameters=["gate_up_proj", "mlp.gate.weight"]),
        "attn": build_skill(base, root / "attn", seed=3, r=2, lora_alpha=4,
                            target_modules=["q_proj", "v_proj"]),
    }  # fmt: skip


def legacy_expert_skill(base, folder, *, leaves=("w1", "w2", "w3"), router=False, seed=5, r=2):
    """A Mixtral skill as an older PEFT saved it on transformers v4: LoRA on the per-expert
    Linear modules block_sparse_moe.experts.N.<leaves> (and q_proj, and the router
    block_sparse_moe.gate), which transformers v5 fuses into mlp.experts.gate_up_proj /
    down_proj and mlp.gate.weight."""
    build_skill(base, folder, seed=seed, r=r, lora_alpha=2 * r, target_modules=["q_proj"])
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", *leaves, *(["gate"] if router else [])]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(folder / WEIGHTS))
    generator = torch.Generator().manual_seed(seed)
    hidden, inner = SMALL["hidden_size"], SMALL["intermediate_size"]
    shapes = {"w1": (hidden, inner), "w3": (hidden, inner), "w2": (inner, hidden)}
    modules = {}
    for layer in range(SMALL["num_hidden_layers"]):
        prefix = f"base_model.model.model.layers.{layer}.block_sparse_moe"
        if router:
            modules[f"{prefix}.gate"] = (hidden, EXPERTS)
        for expert in range(EXPERTS):
            for leaf in leaves:
                modules[f"{prefix}.experts.{expert}.{leaf}"] = shapes[leaf]
    for key, (d_in, d_out) in modules.items():
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, d_in, generator=generator) * 0.2
        tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, r, generator=generator) * 0.2
    save_file(tensors, str(folder / WEIGHTS))
    return folder


def peft_exact(model, out):
    """The export loaded by plain PEFT, and its merge_and_unload, reproduce the CAT model."""
    trained = logits(model)
    base = model.peft_config["default"].base_model_name_or_path
    loaded = PeftModel.from_pretrained(load(base), out)
    assert (logits(loaded) - trained).abs().max() <= TOLERANCE
    assert (logits(loaded.merge_and_unload()) - trained).abs().max() <= TOLERANCE


def slot_weights(w):
    """Stand-in for a layer's CatState with these slot weights (fp32, (R,))."""
    return mock.patch.object(
        experts, "state_of", return_value=SimpleNamespace(slot_weights=lambda: w)
    )


# ---------------------------------------------------------------- PEFT's layout, per expert


class ToyExperts(nn.Module):
    """A fused-experts module with both storage orders and a 2-D parameter."""

    def __init__(self, transposed: bool):
        super().__init__()
        self.is_transposed = transposed
        d_in, d_out = 6, 5
        self.weight = nn.Parameter(
            torch.randn(3, d_in, d_out) if transposed else torch.randn(3, d_out, d_in)
        )
        self.router = nn.Parameter(torch.randn(3, d_in))


class Toy(nn.Module):
    def __init__(self, transposed: bool):
        super().__init__()
        self.experts = ToyExperts(transposed)


@pytest.mark.parametrize("transposed", [False, True])
def test_per_expert_factors_and_the_cat_delta_match_peft_get_delta_weight(transposed):
    torch.manual_seed(0)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=[], init_lora_weights=False,
                        target_parameters=["experts.weight", "experts.router"])  # fmt: skip
    wrappers = [m for m in get_peft_model(Toy(transposed), config).modules()
                if isinstance(m, ParamWrapper)]  # fmt: skip
    assert {w.parameter_name for w in wrappers} == {"weight", "router"}
    for wrapper in wrappers:
        lora_A = wrapper.lora_A["default"].weight
        lora_B = wrapper.lora_B["default"].weight
        stacked_A, stacked_B = experts.per_expert(lora_A, lora_B, wrapper.num_experts)
        assert [t.shape[0] for t in (stacked_A, stacked_B)] == [wrapper.num_experts] * 2
        again = experts.peft_layout(stacked_A, stacked_B)
        assert torch.equal(again[0], lora_A) and torch.equal(again[1], lora_B)
        delta = wrapper.get_delta_weight("default")
        ours = 2.0 * stacked_B @ stacked_A  # scaling 6 / 3, expert by expert: (E, out, in)
        if wrapper.get_param().dim() == 2:
            ours = ours[0]
        elif transposed:
            ours = ours.mT
        assert torch.allclose(delta, ours, atol=1e-6)

        # the CAT update with every slot weighted by the scaling is PEFT's; with slot weights
        # w, each rank slot of every expert is weighted: ΔP_e = B_e diag(w) A_e
        with slot_weights(torch.full((3,), 2.0)):
            assert torch.allclose(experts.delta_weight(wrapper, "default"), delta, atol=1e-6)
        w = torch.tensor([0.5, -1.0, 2.0])
        with slot_weights(w):
            cat = experts.delta_weight(wrapper, "default")
            lhs, rhs, scale = experts.delta_factors(wrapper, "default")  # PEFT >= 0.21's path
        expected = (stacked_B * w) @ stacked_A
        expected = expected[0] if wrapper.get_param().dim() == 2 else expected
        expected = expected.mT if transposed and expected.dim() == 3 else expected
        assert torch.allclose(cat, expected, atol=1e-6)
        product = scale * lhs @ rhs
        assert torch.allclose(product[0] if cat.dim() == 2 else product, cat, atol=1e-6)


# ---------------------------------------------------------------- target_parameters


def test_target_parameter_skills_are_composed_exactly_in_peft_layout(base, skills, tmp_path):
    model, record = assert_exact(base, skills, tmp_path / "out")
    modules = record["modules"]
    assert modules["model.layers.0.mlp.experts.gate_up_proj"]["coefficients"].keys() == {
        "both",
        "gate",
    }
    assert modules["model.layers.1.mlp.experts.down_proj"]["coefficients"].keys() == {"both"}
    assert modules["model.layers.0.mlp.gate.weight"]["coefficients"].keys() == {"gate"}
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == [
        "experts.down_proj",
        "experts.gate_up_proj",
        "gate.weight",
    ]
    # the exact keys and shapes PEFT itself saves for these targets
    r = config["r"]
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=r,
                             target_modules=config["target_modules"],
                             target_parameters=config["target_parameters"])  # fmt: skip
    get_peft_model(load(base), peft_config).save_pretrained(tmp_path / "peft")
    ours = load_file(str(tmp_path / "out" / WEIGHTS))
    theirs = load_file(str(tmp_path / "peft" / WEIGHTS))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    gate_up = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"
    assert ours[gate_up].shape == (r * EXPERTS, SMALL["hidden_size"])

    # only the coefficients train, and the expert parameters' get gradients
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_coefficient(name) for name in trainable)
    model.set_adapter("default")  # PEFT's set_adapter must leave the factors frozen
    assert all(p.requires_grad == is_coefficient(n) for n, p in model.named_parameters())
    model.train()
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    for name, param in coefficient_parameters(model).items():
        assert param.dtype == torch.float32
        if "mlp.experts" in name or "mlp.gate" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("granularity", ["layer", "model", "rank"])
def test_expert_skills_compose_exactly_at_every_shared_granularity(
    base, skills, tmp_path, granularity
):
    model = attach_cat(load(base), CatConfig(skills=adapters(skills), granularity=granularity))
    randomize(model, seed=3)
    export_cat(model, tmp_path / "out")
    peft_exact(model, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "cat_coefficients.json").read_text())
    entry = record["modules"]["model.layers.0.mlp.experts.gate_up_proj"]["coefficients"]
    if granularity == "rank":  # one coefficient per component: r_gate = 3, r_both = 2
        assert len(entry["gate"]) == 3 and len(entry["both"]) == 2


def test_export_rank_and_prune_threshold_fold_each_expert(base, skills, tmp_path):
    model = attach_cat(load(base), CatConfig(skills=adapters(skills)))
    randomize(model, seed=1)
    concatenated = model.peft_config["default"].r
    export_cat(model, tmp_path / "full", rank=concatenated)  # lossless
    peft_exact(model, tmp_path / "full")
    export_cat(model, tmp_path / "small", rank=2)
    record = json.loads((tmp_path / "small" / "cat_coefficients.json").read_text())
    entry = record["modules"]["model.layers.0.mlp.experts.gate_up_proj"]
    assert 0 < entry["svd_relative_error"] < 1
    tensors = load_file(str(tmp_path / "small" / WEIGHTS))
    gate_up = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"
    assert tensors[gate_up].shape == (2 * EXPERTS, SMALL["hidden_size"])
    PeftModel.from_pretrained(load(base), tmp_path / "small")  # loads as a standard adapter

    with torch.no_grad():  # `gate`'s coefficient on layer 0's gate_up_proj below the threshold
        layer = dict(cat_layers(model))["model.layers.0.mlp.experts.gate_up_proj"]
        state = state_of(layer)
        state.coefficients[:, list(state.skill_names).index("gate")] = 0.01
    export_cat(model, tmp_path / "pruned", prune_threshold=0.05)
    record = json.loads((tmp_path / "pruned" / "cat_coefficients.json").read_text())
    assert record["modules"]["model.layers.0.mlp.experts.gate_up_proj"]["pruned"] == {
        "gate": [0, 1, 2]
    }
    PeftModel.from_pretrained(load(base), tmp_path / "pruned")


def test_apply_export_leaves_the_plain_peft_model_and_reexport_rebuilds_it(base, skills, tmp_path):
    from axolotl_cat_plugin.cli import main
    from axolotl_cat_plugin.core.export.fold import fold
    from axolotl_cat_plugin.core.export.write import apply_export

    model = attach_cat(load(base), CatConfig(skills=adapters(skills)))
    randomize(model, seed=2)
    export_cat(model, tmp_path / "out")
    before = logits(model)
    apply_export(model, fold(model))
    assert (logits(model) - before).abs().max() <= TOLERANCE
    assert not any(isinstance(m, ParamWrapper) and "get_delta_weight" in vars(m)
                   for m in model.modules())  # fmt: skip
    model.save_pretrained(tmp_path / "peft_save")  # PEFT's own save writes the same adapter
    first = load_file(str(tmp_path / "out" / WEIGHTS))
    again = load_file(str(tmp_path / "peft_save" / WEIGHTS))
    assert first.keys() == again.keys()
    assert all((first[key] - again[key]).abs().max() <= TOLERANCE for key in first)

    # axolotl-cat export rebuilds the fit from the record alone (coefficients_from)
    assert main(["export", str(tmp_path / "out"), "--out", str(tmp_path / "rebuilt")]) == 0
    rebuilt = load_file(str(tmp_path / "rebuilt" / WEIGHTS))
    assert first.keys() == rebuilt.keys()
    assert all((first[key] - rebuilt[key]).abs().max() <= TOLERANCE for key in first)


def test_granularity_core_with_an_expert_skill_is_refused(base, skills):
    model = load(base)
    with pytest.raises(CatError) as info:
        attach_cat(model, CatConfig(skills=adapters(skills), granularity="core"))
    message = str(info.value)
    assert "granularity core" in message and "target_parameters" in message
    assert "granularity module, layer, model or rank" in message


def test_dropout_applies_to_the_linear_layers_only(base, skills):
    model = attach_cat(load(base), CatConfig(skills=adapters(skills), dropout=0.1))
    dropouts = {
        type(layer.lora_dropout["default"]).__name__
        for _, layer in experts.lora_layers(model)
        if not experts.is_parameter_wrapper(layer)
    }
    assert dropouts == {"Dropout"}
    randomize(model)
    model.eval()
    reference = attach_cat(load(base), CatConfig(skills=adapters(skills)))
    randomize(reference)
    assert (logits(model) - logits(reference)).abs().max() <= TOLERANCE


def test_nested_factors_the_skill_has_no_wrapper_for_are_refused(base, skills, tmp_path):
    folder = tmp_path / "gate"
    folder.mkdir()
    config = json.loads((skills["gate"] / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(skills["gate"] / WEIGHTS))
    moved = {key.replace("mlp.experts.lora_", "mlp.experts.base_layer.lora_"): value
             for key, value in tensors.items()}  # fmt: skip
    save_file(moved, str(folder / WEIGHTS))
    refused(base, {"gate": folder}, "'gate'", "model.layers.0.mlp.experts.base_layer",
            "['gate_up_proj']", "PEFT's own loading finds no wrapper")  # fmt: skip


def test_expert_factors_of_another_shape_are_refused_naming_both(base, skills, tmp_path):
    folder = tmp_path / "both"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        (skills["both"] / "adapter_config.json").read_text()
    )
    tensors = load_file(str(skills["both"] / WEIGHTS))
    key = "base_model.model.model.layers.1.mlp.experts.lora_A.weight"  # down_proj: (r·E, I)
    tensors[key] = torch.zeros(2 * EXPERTS, 48)
    save_file(tensors, str(folder / WEIGHTS))
    refused(base, {"both": folder}, "'both'", "model.layers.1.mlp.experts.down_proj",
            "(8, 64)", "(8, 48)")  # fmt: skip


# ---------------------------------------------------------------- the older per-expert form


def test_legacy_per_expert_skill_is_composed_as_peft_loads_it(base, skills, tmp_path):
    legacy = legacy_expert_skill(base, tmp_path / "legacy", router=True)
    applied = logits(PeftModel.from_pretrained(load(base), legacy))  # PEFT converts it
    assert (applied - logits(load(base))).abs().max() > 1e-3
    alone = attach_cat(load(base), CatConfig(skills=adapters({"legacy": legacy})))
    assert (logits(alone) - applied).abs().max() <= TOLERANCE  # c = 1: the skill itself

    _, record = assert_exact(base, {"legacy": legacy, "attn": skills["attn"]}, tmp_path / "out")
    assert "model.layers.0.mlp.experts.gate_up_proj" in record["modules"]
    assert "model.layers.0.mlp.gate.weight" in record["modules"]
    mixed = {"legacy": legacy, "gate": skills["gate"], "both": skills["both"]}
    assert_exact(base, mixed, tmp_path / "mixed")


def test_legacy_forms_peft_cannot_load_are_refused_naming_the_form(base, tmp_path):
    # w1 without w3: PEFT's conversion refuses, as they fuse into gate_up_proj
    w1 = legacy_expert_skill(base, tmp_path / "w1", leaves=("w1",))
    refused(base, {"w1": w1}, "'w1'", "model.layers.0.block_sparse_moe.experts.0.w1",
            "per-expert MoE layout", "without also targeting w3", "merge_and_unload")  # fmt: skip
    # w1 and w3 without w2: PEFT converts them to a wrapper it never builds, and drops them
    w13 = legacy_expert_skill(base, tmp_path / "w13", leaves=("w1", "w3"))
    message = refused(base, {"w13": w13}, "'w13'", "per-expert MoE layout",
                      "model.layers.0.mlp.experts.base_layer", "missing adapter keys")  # fmt: skip
    assert "is not in the base model" not in message


# ---------------------------------------------------------------- axolotl-cat merge


def test_merge_concat_folds_expert_skills_and_other_methods_are_refused(
    base, skills, tmp_path, capsys
):
    from axolotl_cat_plugin.cli import main
    from axolotl_cat_plugin.core.fit.baselines import static_coefficients

    legacy = legacy_expert_skill(base, tmp_path / "legacy")
    argv = ["merge", "--method", "concat", "--weights", "0.7", "1.3", "-0.4", "--base", str(base)]
    named = [f"both={skills['both']}", f"legacy={legacy}", f"attn={skills['attn']}"]
    assert main([*argv, "--out", str(tmp_path / "m"), *named]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "adapter_config.json",
        WEIGHTS,
        "merge_record.json",
    ]
    merged = logits(PeftModel.from_pretrained(load(base), tmp_path / "m"))
    chosen = {"both": skills["both"], "legacy": legacy, "attn": skills["attn"]}
    cat = attach_cat(load(base), CatConfig(skills=adapters(chosen)))
    with static_coefficients(cat, [0.7, 1.3, -0.4]):
        assert (merged - logits(cat)).abs().max() <= TOLERANCE

    argv = ["merge", "--method", "svd", "--weights", "1", "1", "--base", str(base)]
    assert main([*argv, "--out", str(tmp_path / "s"), named[0], named[2]]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'both'" in err and "target_parameters" in err and "--method concat" in err
