"""Training a CAT model moves the fp32 coefficients and nothing else.

The base weights and every skill's factors are frozen bit for bit; the only trainable
parameters are the CAT coefficients (state.py), fp32 whatever the base's dtype, and the loss
reaches every coefficient of every module a skill touches. `coefficients_from` resumes
exactly where an export left off, and refuses a record of other skills.
"""

import json

import pytest
import torch
from fixtures import SKILL_SPECS, load_base

from axolotl_cat_plugin import CatConfig, CatError, attach_cat, export_cat
from axolotl_cat_plugin.core import cat_layers
from axolotl_cat_plugin.core.state import is_coefficient, state_of, weighted

TOKENS = torch.tensor([[1, 10, 20, 30, 40, 50, 60, 70], [1, 15, 25, 35, 45, 55, 65, 75]])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def adapters(world, names=None):
    names = names or list(world["skills"])
    return [{"path": str(world["skills"][name]), "name": name} for name in names]


def cat_model(world, dtype=torch.float32, **options):
    return attach_cat(load_base(world["base"], dtype=dtype), CatConfig(adapters(world), **options))


def trainable(model):
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def backward(model):
    model.train()
    loss = model(input_ids=TOKENS, labels=TOKENS).loss
    loss.backward()
    return loss


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.float()


def randomize(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in trainable(model).values():
            param.copy_(torch.randn(param.shape, generator=generator) + 0.5)


def touched_modules():
    """Every module some skill puts factors on, derived from the skill specs themselves."""
    leaves = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn"}
    leaves |= {"o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    names = set()
    for spec in SKILL_SPECS.values():
        for layer in spec.get("layers_to_transform", [0, 1]):
            for leaf in spec["target_modules"]:
                names.add(f"model.layers.{layer}.{leaves[leaf]}.{leaf}")
    return names


def test_one_optimizer_step_changes_the_coefficients_and_nothing_else(world):
    model = cat_model(world)
    before = {
        name: param.detach().clone()
        for name, param in model.named_parameters(remove_duplicate=False)
    }
    optimizer = torch.optim.AdamW(trainable(model).values(), lr=1e-2)
    backward(model)
    optimizer.step()

    changed = 0
    for name, param in model.named_parameters(remove_duplicate=False):
        if is_coefficient(name):
            continue
        assert torch.equal(param, before[name]), f"{name} moved"
        changed += 1
    assert changed > 0 and any(".lora_A." in name for name in before)
    for name, layer in cat_layers(model):
        if weighted(layer):
            alpha_before = before[f"base_model.model.{name}.cat_state.default.coefficients"]
            moved = state_of(layer).coefficients.detach() != alpha_before
            assert moved[state_of(layer).present].all(), f"{name}: a coefficient did not move"


@pytest.mark.parametrize(
    "granularity, tensors, shape",
    [("module", 12, (1, 3)), ("layer", 2, (1, 3)), ("model", 1, (1, 3)), ("rank", 12, (4, 3))],
)
def test_only_fp32_coefficients_are_trainable(world, granularity, tensors, shape):
    model = cat_model(world, granularity=granularity)
    params = trainable(model)
    assert len(params) == tensors  # shared coefficients are one parameter, counted once
    for name, param in params.items():
        assert is_coefficient(name) and "lora_" not in name
        assert param.dtype == torch.float32
        assert param.dim() >= 1 and tuple(param.shape) == shape
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and "lora_" in n]
    assert frozen, "the skill factors are parameters, but frozen"


@pytest.mark.parametrize("granularity", ["module", "rank"])
def test_gradient_reaches_every_coefficient_of_every_touched_module(world, granularity):
    model = cat_model(world, granularity=granularity, parametrization="free")
    backward(model)
    with_alpha = {name for name, layer in cat_layers(model) if weighted(layer)}
    assert with_alpha == touched_modules()
    for name, layer in cat_layers(model):
        if name not in with_alpha:
            continue
        grad, mask = state_of(layer).coefficients.grad, state_of(layer).present
        assert grad is not None and grad.dtype == torch.float32
        assert (grad[mask] != 0).all(), f"{name}: no gradient on {grad}"
        assert (grad[~mask] == 0).all(), f"{name}: gradient on a skill that is absent"


def test_rank_granularity_has_one_coefficient_per_component_present(world):
    model = cat_model(world, granularity="rank")
    layer = model.get_submodule("base_model.model.model.layers.1.self_attn.v_proj")
    math_rank, prose_rank = SKILL_SPECS["math"]["r"], SKILL_SPECS["prose"]["r"]
    expected = torch.zeros(4, 3, dtype=torch.bool)
    expected[:math_rank, 0] = True
    expected[:prose_rank, 2] = True
    assert torch.equal(state_of(layer).present, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_coefficients_stay_fp32_and_train_on_any_base_dtype(world, dtype):
    model = cat_model(world, dtype=dtype)
    base_weight = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert base_weight.base_layer.weight.dtype == dtype
    optimizer = torch.optim.AdamW(trainable(model).values(), lr=1e-2)
    loss = backward(model)
    assert torch.isfinite(loss)
    params = trainable(model)
    assert params
    for name, param in params.items():
        assert param.dtype == torch.float32, name
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), name
    assert any(param.grad.abs().sum() > 0 for param in params.values())
    optimizer.step()
    assert all(param.dtype == torch.float32 for param in trainable(model).values())
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize(
    "granularity, parametrization",
    [
        ("module", "free"),
        ("module", "softmax"),
        ("rank", "free"),
        ("rank", "softmax"),
        ("layer", "softmax"),
        ("model", "free"),
    ],
)
def test_coefficients_from_an_export_resumes_the_same_model(
    world, tmp_path, granularity, parametrization
):
    options = dict(granularity=granularity, parametrization=parametrization)
    trained = cat_model(world, **options)
    randomize(trained)
    record = export_cat(trained, tmp_path / "export") / "cat_coefficients.json"

    resumed = cat_model(world, coefficients_from=str(record), **options)
    assert (logits(resumed) - logits(trained)).abs().max() <= 1e-5
    assert (logits(resumed) - logits(cat_model(world, **options))).abs().max() > 1e-3


def refuse_coefficients(world, names, record, *named, **options):
    """attach_cat refuses this coefficients_from before wrapping or changing the base."""
    model = load_base(world["base"])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    modules_before = [name for name, _ in model.named_modules()]
    config = CatConfig(adapters(world, names), coefficients_from=str(record), **options)
    with pytest.raises(CatError) as info:
        attach_cat(model, config)
    for name in named:
        assert name in str(info.value), f"{name!r} not named in: {info.value}"
    assert [name for name, _ in model.named_modules()] == modules_before
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.fixture(scope="module")
def exported_record(world, tmp_path_factory):
    model = cat_model(world)
    randomize(model)
    return export_cat(model, tmp_path_factory.mktemp("record")) / "cat_coefficients.json"


@pytest.mark.parametrize(
    "names", [["math", "code"], ["code", "math", "prose"]], ids=["fewer", "reordered"]
)
def test_coefficients_from_with_other_skills_is_refused(world, exported_record, names):
    refuse_coefficients(world, names, exported_record, "coefficients_from", str(names))


def test_coefficients_from_with_other_granularity_is_refused(world, exported_record):
    refuse_coefficients(
        world, None, exported_record, "coefficients_from", "'rank'", granularity="rank"
    )


def test_coefficients_from_missing_or_malformed_is_refused(world, exported_record, tmp_path):
    refuse_coefficients(world, None, tmp_path / "missing.json", str(tmp_path / "missing.json"))

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    refuse_coefficients(world, None, broken, str(broken))

    record = json.loads(exported_record.read_text())
    del next(iter(record["modules"].values()))["coefficients"]
    no_values = tmp_path / "no-values.json"
    no_values.write_text(json.dumps(record))
    refuse_coefficients(world, None, no_values, str(no_values))

    record = json.loads(exported_record.read_text())
    record["modules"]["model.layers.0.self_attn.q_proj"]["coefficients"]["math"] = "NaN"
    not_numbers = tmp_path / "not-numbers.json"
    not_numbers.write_text(json.dumps(record))
    refuse_coefficients(world, None, not_numbers, str(not_numbers))


def test_peft_calls_that_reactivate_the_adapter_keep_the_skills_frozen(world):
    """PEFT's set_adapter marks the adapter's factors trainable (also when leaving
    disable_adapter(), as TRL does for reference logits): the skills must stay frozen."""
    model = attach_cat(load_base(world["base"]), CatConfig(skills=adapters(world)))

    def trainable():
        return sorted(name for name, p in model.named_parameters() if p.requires_grad)

    before = trainable()
    assert before and all(is_coefficient(name) for name in before)
    model.set_adapter("default")
    model.base_model.set_adapter("default")
    with model.disable_adapter():
        pass
    model.base_model.enable_adapter_layers()
    assert trainable() == before


def test_cat_state_is_one_submodule_per_layer_and_gone_after_apply_export(world, tmp_path):
    """Like DoRA's lora_magnitude_vector: `layer.cat_state["default"]` holds a layer's CAT state;
    no save writes it; apply_export leaves a plain LoRA model."""
    from safetensors.torch import load_file

    from axolotl_cat_plugin.core.export.fold import fold
    from axolotl_cat_plugin.core.export.write import apply_export
    from axolotl_cat_plugin.core.state import CatState, has_coefficients

    model = cat_model(world, granularity="layer")
    layers = dict(cat_layers(model))
    assert set(layers) >= touched_modules()
    for name, layer in layers.items():
        state = layer.cat_state["default"]
        assert isinstance(state, CatState) and state is state_of(layer)
        assert state.module_name == name and state.skill_names == tuple(world["skills"])
        assert state.weighted == (name in touched_modules())
    # granularity layer: the modules of one decoder layer share one Parameter
    shared = {id(state_of(layers[f"model.layers.0.self_attn.{m}_proj"]).coefficients) for m in "qv"}
    assert len(shared) == 1
    # the model's own save writes the folded standard adapter, never the state (PEFT >= 0.21's
    # get_peft_model_state_dict would sweep up everything on a tuner layer)
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    assert saved and all(key.endswith(("lora_A.weight", "lora_B.weight")) for key in saved)

    expected = logits(model)
    apply_export(model, fold(model))
    assert not has_coefficients(model) and not list(cat_layers(model))
    assert not any("cat_state" in name for name, _ in model.named_modules())
    assert (logits(model) - expected).abs().max() <= 1e-5


def test_a_checkpoint_written_before_0_2_still_resumes(world, tmp_path):
    """Checkpoints of 0.1 hold `cat_alpha.safetensors` with `<layer>.cat_alpha` names."""
    from safetensors.torch import save_file

    from axolotl_cat_plugin.core.state import coefficient_parameters
    from axolotl_cat_plugin.integration.trainer import CatTrainer

    fitted = cat_model(world)
    randomize(fitted)
    legacy = {
        name.replace(".cat_state.default.coefficients", ".cat_alpha"): param.detach().clone()
        for name, param in coefficient_parameters(fitted).items()
    }
    assert all(name.endswith(".cat_alpha") for name in legacy)
    save_file(legacy, tmp_path / "cat_alpha.safetensors")

    fresh = cat_model(world)
    assert (logits(fresh) - logits(fitted)).abs().max() > 1e-3
    CatTrainer._load_from_checkpoint(None, str(tmp_path), model=fresh)
    assert (logits(fresh) - logits(fitted)).abs().max() <= 1e-6
