"""An export can be trained further with plain PEFT: no rank slot is a saddle (zero in both
lora_A and lora_B), and the export still computes exactly what the CAT model computed."""

import json

import torch
from fixtures import load_base
from peft import PeftModel
from safetensors.torch import load_file
from test_exactness import TOKENS, TOLERANCE, cat_model, logits, randomize

from axolotl_cat_plugin import export_cat


def lora_layers(model):
    return {
        name: module
        for name, module in model.base_model.model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def test_every_module_of_an_export_learns_when_trained_further(world, tmp_path):
    model = cat_model(world)  # three skills on different modules and layers
    randomize(model)
    out = export_cat(model, tmp_path / "out")
    tensors = load_file(out / "adapter_model.safetensors")
    rank = json.loads((out / "adapter_config.json").read_text())["r"]
    zero_B = [k for k, t in tensors.items() if ".lora_B." in k and not t.any()]
    assert zero_B, "the world must have a module no skill touches (the test's premise)"
    for key, lora_A in tensors.items():  # no slot is zero in both factors
        if ".lora_A." in key:
            lora_B = tensors[key.replace(".lora_A.", ".lora_B.")]
            assert ((lora_A.abs().sum(1) != 0) | (lora_B.abs().sum(0) != 0)).all(), key

    loaded = PeftModel.from_pretrained(load_base(world["base"]), out, is_trainable=True)
    assert (logits(loaded) - logits(model)).abs().max() <= TOLERANCE  # still the same update
    layers = lora_layers(loaded)
    before = {
        name: layer.get_delta_weight("default").detach().clone() for name, layer in layers.items()
    }
    factors = {
        name: (
            layer.lora_A["default"].weight.detach().clone(),
            layer.lora_B["default"].weight.detach().clone(),
        )
        for name, layer in layers.items()
    }
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(10):
        optimizer.zero_grad()
        loaded(input_ids=TOKENS, labels=TOKENS).loss.backward()
        optimizer.step()
    for name, layer in layers.items():
        moved = layer.get_delta_weight("default").detach() - before[name]
        assert moved.abs().max() > 0, f"{name}: its update never moved"
        lora_A, lora_B = factors[name]
        rows = (layer.lora_A["default"].weight.detach() != lora_A).any(1)
        columns = (layer.lora_B["default"].weight.detach() != lora_B).any(0)
        assert (rows | columns).sum() == rank, f"{name}: a rank slot never moved"


def test_the_init_of_idle_slots_is_seeded(world, tmp_path):
    model = cat_model(world)
    randomize(model)
    first = load_file(export_cat(model, tmp_path / "a") / "adapter_model.safetensors")
    second = load_file(export_cat(model, tmp_path / "b") / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
