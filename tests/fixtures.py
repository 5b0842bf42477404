"""Tiny, fully local building blocks: a tokenizer, a Llama base, skill LoRAs, datasets.

Nothing here downloads anything; every test builds what it needs in its tmp folder.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: every printable ASCII character is one token."""
    vocab = {token: i for i, token in enumerate(SPECIAL + list(string.printable))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_base(folder: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A random tiny Llama with the tokenizer beside it, saved as a normal HF model folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load_base(folder: Path, dtype=torch.float32) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    return model


def build_skill(base_folder: Path, folder: Path, *, seed: int, **lora_kwargs) -> Path:
    """A skill LoRA on the base with random, non-zero A and B (as if trained).

    lora_kwargs go to LoraConfig: r, lora_alpha, target_modules, use_rslora, rank_pattern...
    """
    torch.manual_seed(seed)
    model = load_base(base_folder)
    config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # small updates, like real skills on a capable base
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    peft_model.save_pretrained(folder)
    return folder


# Three skills that differ in everything CAT must get right.
SKILL_SPECS = {
    "math": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "code": dict(
        r=2,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "up_proj"],
        rank_pattern={"k_proj": 3},
        alpha_pattern={"up_proj": 2},
    ),
    "prose": dict(
        r=3,
        lora_alpha=5,
        target_modules=["v_proj", "o_proj", "gate_proj"],
        layers_to_transform=[1],
    ),
}


def build_skills(base_folder: Path, root: Path) -> dict[str, Path]:
    return {
        name: build_skill(base_folder, root / name, seed=10 + i, **kwargs)
        for i, (name, kwargs) in enumerate(SKILL_SPECS.items())
    }


def build_world(root: Path) -> dict:
    """The tiny world: a base in root/base and the SKILL_SPECS skills in root/skills/NAME.

    The one builder behind the tests' `world` fixture, the multi-process workers (built there
    when no --base is given) and scripts/demo/tiny_world.py.
    """
    base = build_base(root / "base")
    return {"base": base, "skills": build_skills(base, root / "skills"), "root": root}


def mix_rows(count: int, seed: int = 0) -> list[dict]:
    """A small data mix for a CAT fit: `count` arithmetic and `count` code rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append({"text": f"Q: what is {a} + {b}? A: {a} + {b} = {a + b}"})
        rows.append({"text": f"Write a program for {a} + {b}. def solution(): return {a} + {b}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
