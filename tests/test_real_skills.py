"""The skills people really have: LoRAs on lm_head and embeddings, on tied-embedding models.

Each kind is either composed exactly (the CAT model == base + Σ c·ΔW_i with every ΔW_i from
PEFT's own get_delta_weight == the export loaded by plain PEFT == its merge_and_unload, fp32,
within 1e-5) or refused with a message naming the skill, the module and the fix. The models
are tiny Llama (untied), Qwen2 (tie_word_embeddings) and Mixtral (MoE) built here; nothing is
downloaded.
"""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import ParamWrapper
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file
from test_exactness import randomize
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen2Config

from axolotl_cat_plugin import CatConfig, CatError, attach_cat, export_cat
from axolotl_cat_plugin.core.layers.quantized import keep_gradients_through_4bit_layers
from axolotl_cat_plugin.core.state import is_coefficient, saved_module_wrappers, state_of, weighted

TOLERANCE = 1e-5
TOKENS = torch.tensor([[1, 10, 20, 30, 40, 50, 60, 70], [3, 15, 25, 35, 45, 55, 65, 75]])
WEIGHTS = "adapter_model.safetensors"
SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=120,
)


# ---------------------------------------------------------------- tiny bases and skills


def build_model(folder, config, seed=0):
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def load(folder, *, untie=False):
    """The base in fp32; `untie`: a tied lm_head gets its own copy of the embedding matrix."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if untie and model.config.tie_word_embeddings:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    return model.eval()


def build_skill(base, folder, *, seed, model=None, **lora):
    """A skill saved by PEFT's own save_pretrained (defaults: save_embedding_layers="auto")."""
    torch.manual_seed(seed)
    config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora)
    peft_model = get_peft_model(model if model is not None else load(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.2)
            elif "modules_to_save" in name:  # a module trained in full
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {
        "llama": build_model(root / "llama", LlamaConfig(**SMALL)),
        "qwen2": build_model(root / "qwen2", Qwen2Config(**SMALL, tie_word_embeddings=True)),
        "mixtral": build_model(
            root / "mixtral", MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)
        ),
    }


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.float()


def adapters(skills):
    return [{"path": str(path), "name": name} for name, path in skills.items()]


def reference(base, skills, record):
    """base + Σ_i c_i,m ΔW_i,m, every ΔW from PEFT's own get_delta_weight of the loaded skill
    (of a ParamWrapper: ΔP of the parameter `<module>.<parameter>` it wraps, MoE experts)."""
    model = load(base, untie=True)
    with torch.no_grad():
        for name, path in skills.items():
            peft_model = PeftModel.from_pretrained(load(base, untie=True), path)
            for module_name, layer in peft_model.base_model.model.named_modules():
                if isinstance(layer, ParamWrapper):
                    owner = module_name.replace(".base_layer", "")
                    parameter = f"{owner}.{layer.parameter_name}"
                    c = record["modules"][parameter]["coefficients"][name]
                    model.get_parameter(parameter).add_(c * layer.get_delta_weight("default"))
                    continue
                if isinstance(layer, ModulesToSaveWrapper):  # M_i - M_base, per parameter
                    c = record["saved_modules"][module_name]["coefficients"][name]
                    target = model.get_submodule(module_name)
                    for param_name, saved in layer.modules_to_save["default"].named_parameters():
                        original = layer.original_module.get_parameter(param_name)
                        target.get_parameter(param_name).add_(c * (saved - original))
                    continue
                if not hasattr(layer, "get_delta_weight") or "default" not in layer.scaling:
                    continue
                c = record["modules"][module_name]["coefficients"][name]
                weight = model.get_submodule(module_name).weight
                weight += c * layer.get_delta_weight("default")
    return model


def assert_exact(base, skills, out):
    """CAT == formula == export loaded by plain PEFT == its merge_and_unload (on an untied base:
    merging into a tied lm_head changes the input embeddings too, huggingface/peft#2777)."""
    model = attach_cat(load(base), CatConfig(skills=adapters(skills)))
    randomize(model)
    trained = logits(model)
    export_cat(model, out)
    record = json.loads((out / "cat_coefficients.json").read_text())
    assert (logits(reference(base, skills, record)) - trained).abs().max() <= TOLERANCE
    loaded = PeftModel.from_pretrained(load(base), out)
    assert (logits(loaded) - trained).abs().max() <= TOLERANCE
    merged = PeftModel.from_pretrained(load(base, untie=True), out).merge_and_unload()
    assert (logits(merged) - trained).abs().max() <= TOLERANCE
    return model, record


def refused(base, skills, *names) -> str:
    model = load(base)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(CatError) as info:
        attach_cat(model, CatConfig(skills=adapters(skills)))
    message = str(info.value)
    for name in names:
        assert str(name) in message, f"{name!r} not named in: {message}"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    return message


# ---------------------------------------------------------------- 1. lm_head LoRAs


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mixtral"])
def test_lm_head_lora_with_peft_copy_of_the_base_is_composed_exactly(bases, tmp_path, arch):
    base = bases[arch]
    head = build_skill(base, tmp_path / "head", seed=1, r=2, lora_alpha=4,
                       target_modules=["q_proj", "v_proj", "lm_head"])  # fmt: skip
    attn = build_skill(base, tmp_path / "attn", seed=2, r=3, lora_alpha=3,
                       target_modules=["q_proj", "o_proj"])  # fmt: skip
    # PEFT's default save wrote the copy this issue is about
    assert "base_model.model.lm_head.base_layer.weight" in load_file(str(head / WEIGHTS))
    _, record = assert_exact(base, {"head": head, "attn": attn}, tmp_path / "out")
    assert "lm_head" in record["modules"]
    exported = load_file(str(tmp_path / "out" / WEIGHTS))
    assert not any("base_layer" in key for key in exported)  # the export carries factors only


def test_lm_head_copy_of_a_resized_vocabulary_is_refused_naming_both_shapes(bases, tmp_path):
    base = bases["qwen2"]
    resized = load(base)
    resized.resize_token_embeddings(128)
    head = build_skill(base, tmp_path / "head", seed=1, model=resized, r=2, lora_alpha=4,
                       target_modules=["q_proj", "lm_head"])  # fmt: skip
    message = refused(base, {"head": head}, "'head'", "lm_head.weight", "(128, 32)", "(120, 32)")
    assert "resized vocabulary" in message and "128 tokens" in message


def test_lm_head_copy_that_differs_from_the_base_is_refused(bases, tmp_path):
    base = bases["llama"]
    head = build_skill(base, tmp_path / "head", seed=1, r=2, lora_alpha=4,
                       target_modules=["lm_head"])  # fmt: skip
    tensors = load_file(str(head / WEIGHTS))
    tensors["base_model.model.lm_head.base_layer.weight"] += 0.01
    save_file(tensors, str(head / WEIGHTS))
    refused(base, {"head": head}, "'head'", "lm_head.weight", "differs from the base's")


def test_a_copy_of_a_module_the_base_lacks_is_refused(bases, tmp_path):
    base = bases["llama"]
    head = build_skill(base, tmp_path / "head", seed=1, r=2, lora_alpha=4,
                       target_modules=["lm_head"])  # fmt: skip
    tensors = load_file(str(head / WEIGHTS))
    tensors["base_model.model.model.wte.base_layer.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(head / WEIGHTS))
    refused(base, {"head": head}, "'head'", "model.wte.weight", "no such module")


def test_merge_cat_accepts_an_lm_head_skill_and_refuses_a_differing_copy(bases, tmp_path, capsys):
    from axolotl_cat_plugin.cli import main

    base = bases["qwen2"]
    head = build_skill(base, tmp_path / "head", seed=1, r=2, lora_alpha=4,
                       target_modules=["q_proj", "lm_head"])  # fmt: skip
    attn = build_skill(base, tmp_path / "attn", seed=2, r=3, lora_alpha=3,
                       target_modules=["q_proj", "v_proj"])  # fmt: skip
    argv = ["merge", "--method", "concat", "--weights", "0.5", "1.5", "--base", str(base)]
    assert main([*argv, "--out", str(tmp_path / "m"), f"head={head}", f"attn={attn}"]) == 0
    merged = logits(PeftModel.from_pretrained(load(base), tmp_path / "m"))
    cat = attach_cat(load(base), CatConfig(skills=adapters({"head": head, "attn": attn})))
    for _, layer in cat.named_modules():
        if weighted(layer):
            with torch.no_grad():
                for index, skill in enumerate(state_of(layer).skill_names):
                    state_of(layer).coefficients[:, index] = {"head": 0.5, "attn": 1.5}[skill]
    assert (merged - logits(cat)).abs().max() <= TOLERANCE

    tensors = load_file(str(head / WEIGHTS))
    tensors["base_model.model.lm_head.base_layer.weight"] *= 2
    save_file(tensors, str(head / WEIGHTS))
    assert main([*argv, "--out", str(tmp_path / "m2"), f"head={head}", f"attn={attn}"]) == 2
    err = capsys.readouterr().err
    assert "'head'" in err and "lm_head.weight" in err and "differs" in err


# ---------------------------------------------------------------- 5. merge checks what CAT checks


def set_coefficients(model, values):
    with torch.no_grad():
        for _, layer in model.named_modules():
            if weighted(layer):
                for index, skill in enumerate(state_of(layer).skill_names):
                    state_of(layer).coefficients[:, index] = values[skill]


def test_merge_warns_about_a_skill_trained_on_another_base(bases, tmp_path, caplog):
    import logging

    from axolotl_cat_plugin.core.merge.run import merge_skills

    base = bases["llama"]
    skill = build_skill(base, tmp_path / "s", seed=1, r=2, lora_alpha=2, target_modules=["q_proj"])
    config = json.loads((skill / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    with caplog.at_level(logging.WARNING, logger="axolotl_cat_plugin"):
        merge_skills(load(base), [str(skill)], [1.0], tmp_path / "same", method="concat")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    config["base_model_name_or_path"] = "org/other-base"
    (skill / "adapter_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="axolotl_cat_plugin"):
        merge_skills(load(base), [str(skill)], [1.0], tmp_path / "other", method="concat")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'s'" in m and "org/other-base" in m for m in warned), warned


def test_merge_advice_for_a_restricted_first_skill_leads_to_a_merge(bases, tmp_path):
    from axolotl_cat_plugin.core.merge.run import merge_skills

    base = bases["llama"]
    late = build_skill(base, tmp_path / "late", seed=1, r=2, lora_alpha=2,
                       target_modules=["q_proj"], layers_to_transform=[1])  # fmt: skip
    free = build_skill(base, tmp_path / "free", seed=2, r=2, lora_alpha=4,
                       target_modules=["q_proj", "v_proj"])  # fmt: skip
    skills = {"late": late, "free": free}
    with pytest.raises(CatError, match="list a skill without that restriction first .*'free'"):
        merge_skills(load(base), adapters(skills), [0.5, 2.0], tmp_path / "m", method="concat")
    # following the advice works, and gives Σ w_i ΔW_i
    reordered = adapters({"free": free, "late": late})
    out = merge_skills(load(base), reordered, [2.0, 0.5], tmp_path / "m", method="concat")
    cat = attach_cat(load(base), CatConfig(skills=adapters(skills)))
    set_coefficients(cat, {"late": 0.5, "free": 2.0})
    merged = PeftModel.from_pretrained(load(base), out)
    assert (logits(merged) - logits(cat)).abs().max() <= TOLERANCE


def test_merge_advice_is_cat_when_no_order_can_work(bases, tmp_path):
    from axolotl_cat_plugin.core.merge.run import merge_skills

    base = bases["llama"]
    late = build_skill(base, tmp_path / "late", seed=1, r=2, lora_alpha=2,
                       target_modules=["o_proj"], layers_to_transform=[1])  # fmt: skip
    free = build_skill(base, tmp_path / "free", seed=2, r=2, lora_alpha=4,
                       target_modules=["q_proj"])  # fmt: skip
    skills = {"late": late, "free": free}
    with pytest.raises(CatError) as info:
        merge_skills(load(base), adapters(skills), [1.0, 1.0], tmp_path / "m", method="concat")
    message = str(info.value)
    assert "would not help" in message and "model.layers.0.self_attn.o_proj" in message
    assert "fit CAT instead" in message
    # the other order is refused too, as the message said
    with pytest.raises(CatError, match="fit CAT"):
        merge_skills(load(base), adapters({"free": free, "late": late}), [1.0, 1.0],
                     tmp_path / "m", method="concat")  # fmt: skip
    # and CAT, as advised, composes them
    assert_exact(base, skills, tmp_path / "cat")


# ---------------------------------------------------------------- 2. embedding LoRAs


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mixtral"])
def test_embedding_lora_is_composed_exactly_and_exported_in_peft_format(bases, tmp_path, arch):
    base = bases[arch]
    emb = build_skill(base, tmp_path / "emb", seed=1, r=3, lora_alpha=6,
                      target_modules=["embed_tokens", "q_proj"])  # fmt: skip
    emb2 = build_skill(base, tmp_path / "emb2", seed=3, r=2, lora_alpha=2, use_rslora=True,
                       target_modules=["embed_tokens", "v_proj"])  # fmt: skip
    attn = build_skill(base, tmp_path / "attn", seed=2, r=2, lora_alpha=4,
                       target_modules=["q_proj", "v_proj"])  # fmt: skip
    saved = load_file(str(emb / WEIGHTS))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in saved
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved  # PEFT's copy

    skills = {"emb": emb, "emb2": emb2, "attn": attn}
    model, record = assert_exact(base, skills, tmp_path / "out")
    assert set(record["modules"]["model.embed_tokens"]["coefficients"]) == {"emb", "emb2"}
    exported = load_file(str(tmp_path / "out" / WEIGHTS))
    r = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"]
    assert exported["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (r, 120)
    assert exported["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, r)

    # the coefficients of the embedding get gradients like any other
    model.train()
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    grad = state_of(model.base_model.model.model.embed_tokens).coefficients.grad
    assert grad is not None and grad.abs().sum() > 0


def test_merge_cat_composes_embedding_skills_like_peft(bases, tmp_path):
    from axolotl_cat_plugin.cli import main

    base = bases["llama"]
    emb = build_skill(base, tmp_path / "emb", seed=1, r=3, lora_alpha=6,
                      target_modules=["embed_tokens", "q_proj"])  # fmt: skip
    attn = build_skill(base, tmp_path / "attn", seed=2, r=2, lora_alpha=4,
                       target_modules=["q_proj"])  # fmt: skip
    argv = ["merge", "--method", "concat", "--weights", "0.7", "1.3", "--base", str(base)]
    assert main([*argv, "--out", str(tmp_path / "m"), f"emb={emb}", f"attn={attn}"]) == 0
    merged = logits(PeftModel.from_pretrained(load(base), tmp_path / "m"))
    cat = attach_cat(load(base), CatConfig(skills=adapters({"emb": emb, "attn": attn})))
    set_coefficients(cat, {"emb": 0.7, "attn": 1.3})
    assert (merged - logits(cat)).abs().max() <= TOLERANCE


def test_embedding_factors_on_a_linear_module_are_refused(bases, tmp_path):
    base = bases["llama"]
    skill = build_skill(base, tmp_path / "s", seed=1, r=2, lora_alpha=2,
                        target_modules=["q_proj"])  # fmt: skip
    tensors = load_file(str(skill / WEIGHTS))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors[f"{prefix}.lora_embedding_A"] = tensors.pop(f"{prefix}.lora_A.weight")
    tensors[f"{prefix}.lora_embedding_B"] = tensors.pop(f"{prefix}.lora_B.weight")
    save_file(tensors, str(skill / WEIGHTS))
    refused(base, {"s": skill}, "'s'", "model.layers.0.self_attn.q_proj", "lora_embedding_A/B")


# ---------------------------------------------------------------- 6. a 4-bit or 8-bit base


def quantized(base, mode):
    """The base quantized by bitsandbytes on the CPU, as transformers loads it for QLoRA."""
    from transformers import BitsAndBytesConfig

    options = (
        dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if mode == "4bit"
        else dict(load_in_8bit=True)
    )
    return AutoModelForCausalLM.from_pretrained(
        base, quantization_config=BitsAndBytesConfig(**options), device_map="cpu",
        dtype=torch.float32,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_cat_fits_on_a_bitsandbytes_base_and_exports_the_same_adapter(bases, tmp_path, mode):
    pytest.importorskip("bitsandbytes")
    # hidden 64: bitsandbytes' CPU 4-bit kernels fail on a hidden size of 32 (a reshape to
    # [32, 0] inside bitsandbytes/functional.py, in the base layer itself)
    base = build_model(tmp_path / "base", LlamaConfig(**{**SMALL, "hidden_size": 64}))
    skills = {
        "a": build_skill(base, tmp_path / "a", seed=1, r=2, lora_alpha=4,
                         target_modules=["q_proj", "v_proj", "lm_head"]),
        "b": build_skill(base, tmp_path / "b", seed=2, r=3, lora_alpha=3,
                         target_modules=["q_proj", "down_proj"]),
    }  # fmt: skip
    model = attach_cat(quantized(base, mode), CatConfig(skills=adapters(skills)))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__module__ == "peft.tuners.lora.bnb"  # PEFT's bnb LoRA layer
    randomize(model)
    trained = logits(model)

    # every coefficient trains on the quantized base, also after an eval forward (which makes
    # bitsandbytes repack 4-bit weights on the CPU unless attach_cat turned that off)
    model.train()
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    alphas = [p for n, p in model.named_parameters() if is_coefficient(n)]
    assert len(alphas) == 7 and all(a.grad is not None and a.grad.abs().sum() > 0 for a in alphas)
    model.eval()

    out = export_cat(model, tmp_path / "out")
    # plain PEFT on the same quantized base, through the same bitsandbytes kernel (its packed
    # CPU inference kernel computes the base layers in bf16: 5e-3 away, in the base alone)
    plain_base = quantized(base, mode)
    keep_gradients_through_4bit_layers(plain_base)
    loaded = PeftModel.from_pretrained(plain_base, out)
    assert (logits(loaded) - trained).abs().max() <= TOLERANCE

    # the export is the very adapter the same coefficients give on the full-precision base
    full = attach_cat(load(base), CatConfig(skills=adapters(skills)))
    randomize(full)
    export_cat(full, tmp_path / "full")
    ours, theirs = load_file(str(out / WEIGHTS)), load_file(str(tmp_path / "full" / WEIGHTS))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_a_4bit_base_already_repacked_for_cpu_inference_is_refused(bases, tmp_path):
    pytest.importorskip("bitsandbytes")
    base = build_model(tmp_path / "base", LlamaConfig(**{**SMALL, "hidden_size": 64}))
    skill = build_skill(base, tmp_path / "s", seed=1, r=2, lora_alpha=2, target_modules=["q_proj"])
    model = quantized(base, "4bit")
    logits(model)  # an inference forward: bitsandbytes repacks on CPUs with AVX512-BF16
    q_proj = model.model.layers[0].self_attn.q_proj
    if not getattr(q_proj.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    with pytest.raises(CatError, match="model.layers.0.self_attn.q_proj.*reload the base"):
        attach_cat(model, CatConfig(skills=[str(skill)]))


def test_fit_cat_trl_fits_on_a_4bit_base(e2e_world, tmp_path):
    """The Python path for QLoRA users, end to end: TRL's SFTTrainer on a 4-bit base."""
    from test_trl import fit_cat_trl

    from axolotl_cat_plugin.core.export.summary import module_values

    pytest.importorskip("bitsandbytes")
    out = fit_cat_trl(e2e_world, tmp_path, "--load-in-4bit")
    record = json.loads((out / "cat_coefficients.json").read_text())
    moved = [
        abs(value - 1.0) > 1e-4
        for entry in record["modules"].values()
        for values in module_values(entry).values()
        for value in values
    ]
    assert moved and all(moved)  # every coefficient trained, through every 4-bit layer
    loaded = PeftModel.from_pretrained(load(e2e_world["base"]), out)  # plain PEFT, full precision
    assert torch.isfinite(logits(loaded)).all()


@pytest.mark.parametrize(
    "flag, named",
    [
        ("load_in_4bit", "silently ignored"),
        ("load_in_8bit", "scripts/examples/fit_cat_trl.py --load-in-4bit"),
        ("gptq", "GPTQ"),
    ],
)
def test_axolotl_yaml_refuses_a_quantized_base_saying_what_works(flag, named):
    from pydantic import ValidationError

    from axolotl_cat_plugin.integration.args import CatMergeArgs

    config = {"adapter": "cat_merge", "cat_merge": {"skills": ["./skill"]}, flag: True}
    with pytest.raises(ValidationError) as error:
        CatMergeArgs.model_validate(config)
    assert named in str(error.value)


# ---------------------------------------------------------------- 3. modules_to_save


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mixtral"])
def test_modules_to_save_are_composed_with_coefficients_and_exported(bases, tmp_path, arch):
    base = bases[arch]
    chat = build_skill(base, tmp_path / "chat", seed=1, r=2, lora_alpha=4,
                       target_modules=["q_proj"],
                       modules_to_save=["embed_tokens", "lm_head"])  # fmt: skip
    head = build_skill(base, tmp_path / "head", seed=2, r=2, lora_alpha=2,
                       target_modules=["v_proj"], modules_to_save=["lm_head"])  # fmt: skip
    attn = build_skill(base, tmp_path / "attn", seed=3, r=3, lora_alpha=3,
                       target_modules=["q_proj", "v_proj"])  # fmt: skip
    assert "base_model.model.lm_head.weight" in load_file(str(chat / WEIGHTS))
    skills = {"chat": chat, "head": head, "attn": attn}
    model, record = assert_exact(base, skills, tmp_path / "out")
    assert record["saved_modules"]["lm_head"]["coefficients"].keys() == {"chat", "head"}
    assert record["saved_modules"]["model.embed_tokens"]["coefficients"].keys() == {"chat"}
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["lm_head", "model.embed_tokens"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "vLLM does not load `modules_to_save`" in card and "`lm_head` (chat " in card

    # the saved modules' coefficients train; the base's own matrices stay as they were
    base_embedding = load(base).model.embed_tokens.weight
    model.train()
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    saved = [state_of(wrapper).coefficients for _, wrapper in saved_module_wrappers(model)]
    assert len(saved) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in saved)
    inner = model.base_model.model.model.embed_tokens.original_module.weight
    assert torch.equal(inner, base_embedding)

    # apply_export leaves the plain PEFT model whose own save_pretrained writes the export
    from axolotl_cat_plugin.core.export.fold import fold
    from axolotl_cat_plugin.core.export.write import apply_export

    model.eval()
    folded = fold(model)
    before = logits(model)
    apply_export(model, folded)
    assert (logits(model) - before).abs().max() <= TOLERANCE
    model.save_pretrained(tmp_path / "peft_save")
    again = load_file(str(tmp_path / "peft_save" / WEIGHTS))
    exported = load_file(str(tmp_path / "out" / WEIGHTS))
    for key in ("base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"):
        assert (again[key] - exported[key]).abs().max() <= TOLERANCE


def test_modules_to_save_of_a_resized_vocabulary_are_refused_naming_both_shapes(bases, tmp_path):
    base = bases["llama"]
    resized = load(base)
    resized.resize_token_embeddings(128)
    chat = build_skill(base, tmp_path / "chat", seed=1, model=resized, r=2, lora_alpha=4,
                       target_modules=["q_proj"],
                       modules_to_save=["embed_tokens", "lm_head"])  # fmt: skip
    # PEFT saved the wrapper's original module too (save_embedding_layers after a resize):
    # that copy of the base is what names the shapes first
    message = refused(base, {"chat": chat}, "'chat'", "(128, 32)", "(120, 32)")
    assert "128 tokens" in message and "resized vocabulary" in message


def test_saved_modules_of_other_shapes_are_refused_naming_both_shapes(bases, tmp_path):
    base = bases["llama"]
    chat = build_skill(base, tmp_path / "chat", seed=1, r=2, lora_alpha=4,
                       target_modules=["q_proj"], modules_to_save=["lm_head"])  # fmt: skip
    tensors = load_file(str(chat / WEIGHTS))
    tensors["base_model.model.lm_head.weight"] = torch.randn(128, 32)
    save_file(tensors, str(chat / WEIGHTS))
    message = refused(base, {"chat": chat}, "'chat'", "lm_head.weight", "(128, 32)", "(120, 32)")
    assert "vocabulary of 128 tokens" in message


def test_a_module_saved_by_one_skill_and_lora_targeted_by_another_is_refused(bases, tmp_path):
    base = bases["llama"]
    chat = build_skill(base, tmp_path / "chat", seed=1, r=2, lora_alpha=4,
                       target_modules=["q_proj"], modules_to_save=["lm_head"])  # fmt: skip
    head = build_skill(base, tmp_path / "head", seed=2, r=2, lora_alpha=4,
                       target_modules=["lm_head"])  # fmt: skip
    refused(base, {"chat": chat, "head": head}, "'chat'", "'head'", "lm_head")


def test_merge_refuses_modules_to_save_pointing_to_cat(bases, tmp_path, capsys):
    from axolotl_cat_plugin.cli import main

    base = bases["llama"]
    chat = build_skill(base, tmp_path / "chat", seed=1, r=2, lora_alpha=4,
                       target_modules=["q_proj"], modules_to_save=["lm_head"])  # fmt: skip
    argv = ["merge", "--method", "concat", "--weights", "1", "--base", str(base)]
    assert main([*argv, "--out", str(tmp_path / "m"), f"chat={chat}"]) == 2
    err = capsys.readouterr().err
    assert "'chat'" in err and "modules_to_save" in err and "Fit CAT" in err


def test_inspect_and_reexport_of_an_export_with_modules_to_save(bases, tmp_path, capsys):
    from axolotl_cat_plugin.cli import main

    base = bases["qwen2"]
    chat = build_skill(base, tmp_path / "chat", seed=1, r=2, lora_alpha=4,
                       target_modules=["q_proj"], modules_to_save=["lm_head"])  # fmt: skip
    attn = build_skill(base, tmp_path / "attn", seed=2, r=2, lora_alpha=2,
                       target_modules=["q_proj"], modules_to_save=["lm_head"])  # fmt: skip
    model = attach_cat(load(base), CatConfig(skills=adapters({"chat": chat, "attn": attn})))
    randomize(model)
    export_cat(model, tmp_path / "out")
    assert main(["inspect", str(tmp_path / "out")]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "modules_to_save" in shown and "vLLM does not load" in shown
    # axolotl-cat export rebuilds the fit from the record, saved modules' coefficients included
    assert main(["export", str(tmp_path / "out"), "--out", str(tmp_path / "again")]) == 0
    first = load_file(str(tmp_path / "out" / WEIGHTS))
    again = load_file(str(tmp_path / "again" / WEIGHTS))
    assert first.keys() == again.keys()
    assert all((first[key] - again[key]).abs().max() <= TOLERANCE for key in first)


def test_a_saved_module_the_base_lacks_or_a_parameter_it_lacks_is_refused(bases, tmp_path):
    base = bases["llama"]
    chat = build_skill(base, tmp_path / "chat", seed=1, r=2, lora_alpha=4,
                       target_modules=["q_proj"], modules_to_save=["lm_head"])  # fmt: skip
    tensors = load_file(str(chat / WEIGHTS))
    tensors["base_model.model.lm_head.bias"] = torch.zeros(120)
    save_file(tensors, str(chat / WEIGHTS))
    refused(base, {"chat": chat}, "'chat'", "lm_head", "'bias'")

    config = json.loads((chat / "adapter_config.json").read_text())
    config["modules_to_save"] = ["lm_head", "score"]
    (chat / "adapter_config.json").write_text(json.dumps(config))
    del tensors["base_model.model.lm_head.bias"]
    tensors["base_model.model.score.weight"] = torch.zeros(2, 32)
    save_file(tensors, str(chat / WEIGHTS))
    refused(base, {"chat": chat}, "'chat'", "score", "no such module")


def test_linear_and_embedding_factors_on_one_module_are_refused(bases, tmp_path):
    base = bases["llama"]
    emb = build_skill(base, tmp_path / "emb", seed=1, r=2, lora_alpha=2,
                      target_modules=["embed_tokens"])  # fmt: skip
    tensors = load_file(str(emb / WEIGHTS))
    tensors["base_model.model.model.embed_tokens.lora_A.weight"] = torch.zeros(2, 120)
    tensors["base_model.model.model.embed_tokens.lora_B.weight"] = torch.zeros(32, 2)
    save_file(tensors, str(emb / WEIGHTS))
    refused(base, {"emb": emb}, "'emb'", "model.embed_tokens", "both lora_A/lora_B")


def chat_with_saved_head_and_attn(bases, tmp_path):
    """(base, the chat skill's folder, a CAT model of chat + attn with random coefficients):
    chat is a q_proj LoRA that also saves lm_head, attn a q_proj LoRA alone."""
    base = bases["llama"]
    chat = build_skill(base, tmp_path / "chat", seed=1, r=2, lora_alpha=4,
                       target_modules=["q_proj"], modules_to_save=["lm_head"])  # fmt: skip
    attn = build_skill(base, tmp_path / "attn", seed=2, r=2, lora_alpha=2,
                       target_modules=["q_proj"])  # fmt: skip
    model = attach_cat(load(base), CatConfig(skills=adapters({"chat": chat, "attn": attn})))
    randomize(model)
    return base, chat, model


def test_static_mixes_set_the_saved_modules_coefficients_too(bases, tmp_path):
    from axolotl_cat_plugin.core.fit.baselines import static_coefficients

    base, chat, model = chat_with_saved_head_and_attn(bases, tmp_path)
    fitted = logits(model)
    head = model.base_model.model.lm_head.modules_to_save["default"]
    w0 = load(base).lm_head.weight
    saved = load_file(str(chat / WEIGHTS))["base_model.model.lm_head.weight"]
    with static_coefficients(model, [0.0, 1.0]):  # "attn alone": no chat, in lm_head too
        assert (head.weight - w0).abs().max() <= TOLERANCE
    with static_coefficients(model, [0.5, 0.5]):
        assert (head.weight - (w0 + 0.5 * (saved - w0))).abs().max() <= TOLERANCE
    assert torch.equal(logits(model), fitted)  # restored bit for bit


def test_the_saved_module_kind_installs_folds_mixes_and_tears_down_its_modules(bases, tmp_path):
    """modules_to_save are a registered whole-module kind (layers/variants.py MODULE_KINDS):
    each composed wrapper's state answers to that kind, whose fold gives PEFT's keys, the
    record's entries and modules_to_save, whose set_static sets c, and whose teardown leaves
    the composed module a plain frozen parameter with no CAT state."""
    from axolotl_cat_plugin.core.layers.saved_modules import SavedModuleKind
    from axolotl_cat_plugin.core.layers.variants import MODULE_KINDS

    base, chat, model = chat_with_saved_head_and_attn(bases, tmp_path)
    (kind,) = [kind for kind in MODULE_KINDS if isinstance(kind, SavedModuleKind)]
    (name, wrapper), *others = list(saved_module_wrappers(model))
    assert name == "lm_head" and others == [] and state_of(wrapper).strategy is kind
    head = wrapper.modules_to_save["default"]

    tensors, record, names = kind.fold(model)
    assert names == ["lm_head"] and list(tensors) == ["base_model.model.lm_head.weight"]
    assert torch.equal(tensors["base_model.model.lm_head.weight"], head.weight.detach())
    c = state_of(wrapper).effective().flatten().tolist()
    assert record == {"lm_head": {"coefficients": {"chat": c[0]}}}  # attn saved no lm_head

    w0 = load(base).lm_head.weight
    saved = load_file(str(chat / WEIGHTS))["base_model.model.lm_head.weight"]
    state = state_of(wrapper)
    fitted = (state.coefficients.detach().clone(), state.parametrization)
    with torch.no_grad():
        restore = kind.set_static(state, torch.tensor([0.25, 1.0]))
        assert (head.weight - (w0 + 0.25 * (saved - w0))).abs().max() <= TOLERANCE
        restore()
        state.coefficients.copy_(fitted[0])  # the caller restores the coefficients
    assert state.parametrization == fitted[1]

    composed = head.weight.detach().clone()
    kind.teardown(model)
    assert list(saved_module_wrappers(model)) == [] and not hasattr(wrapper, "cat_state")
    assert not head.weight.requires_grad and torch.equal(head.weight, composed)


def test_granularity_core_with_an_embedding_skill_is_refused(bases, tmp_path):
    base = bases["llama"]
    emb = build_skill(base, tmp_path / "emb", seed=1, r=2, lora_alpha=2,
                      target_modules=["embed_tokens", "q_proj"])  # fmt: skip
    model = load(base)
    with pytest.raises(CatError, match="granularity core .* model.embed_tokens"):
        attach_cat(model, CatConfig(skills=[str(emb)], granularity="core"))
    assert not any("lora_" in name for name, _ in model.named_modules())  # not wrapped


def test_set_adapter_leaves_the_saved_modules_frozen(bases, tmp_path):
    """PEFT's set_adapter (also on enable_adapter_layers and leaving disable_adapter) marks a
    ModulesToSaveWrapper's copy trainable; on CAT only the coefficients may train."""
    base = bases["llama"]
    chat = build_skill(base, tmp_path / "chat", seed=1, r=2, lora_alpha=4,
                       target_modules=["q_proj"], modules_to_save=["lm_head"])  # fmt: skip
    model = attach_cat(load(base), CatConfig(skills=[str(chat)]))
    with model.disable_adapter():
        pass
    model.base_model.enable_adapter_layers()
    model.set_adapter("default")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_coefficient(name) for name in trainable), trainable
