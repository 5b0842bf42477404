"""A fitting mix the skills write themselves, for skill LoRAs that come without their data.

For every skill k of a CAT model: sample `pool` continuations of the prompts from base + that
skill alone (the coefficients set in place, distill.skill_alone: nothing is reloaded, and
they are restored bit for bit), score each sample by how much the skill departs from the
base on it, the mean over its generated tokens of KL(p_skill ‖ p_base), and keep the `keep`
highest. The rows are written as a JSONL dataset Axolotl reads as it is (`text` for a
completion dataset, or chat `messages` when the tokenizer has a chat template), each with
the column `skill` naming its writer (the teacher of objective `distill`, distill.py) and
its score `kl`. The file is cached: its name carries a hash of everything that decides it.

Prompts: the user's, or the shipped GENERIC_PROMPTS (plain openings) / GENERIC_QUESTIONS
(for a chat template). Source: issue 23 (a prototype on the miniature recovered 94% of what
the real mix gives over the uniform sum).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import CatError
from ..state import cat_metadata
from .baselines import static_coefficients
from .distill import SKILL_COLUMN, skill_alone, skill_names
from .graded import user_turn

LOG = logging.getLogger(__name__)
FORMAT_VERSION = 1

# openings of ordinary text, for a model without a chat template
GENERIC_PROMPTS = ["The", "In", "By", "We", "Nobody", "It", "When", "There", "A", "This"]
# generic requests, each sent as one user turn through the tokenizer's chat template
GENERIC_QUESTIONS = [
    "Tell me something interesting.",
    "Explain an idea you know well.",
    "Answer a question someone might ask you.",
    "Write a short paragraph about anything.",
    "Solve a small problem and show your work.",
    "Describe how to do something step by step.",
    "What is a fact most people do not know?",
    "Give an example of what you are good at.",
]


@dataclass
class SelfMixOptions:
    """How the mix is written. pool: samples drawn per skill; keep: kept per skill (the
    highest KL); max_new_tokens: length of each sample; temperature, top_p: sampling;
    seed: the sampling's seed; batch_size: prompts per generate call; chat: wrap prompts in
    the chat template (None: when the tokenizer has one); prompts: None for the shipped ones."""

    prompts: list[str] | None = None
    pool: int = 1000
    keep: int = 200
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 64
    chat: bool | None = None

    def check(self) -> None:
        """Raises CatError naming the option that cannot work."""
        if self.pool < 1 or self.keep < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise CatError("self_mix: pool, keep, max_new_tokens and batch_size must be >= 1")
        if self.keep > self.pool:
            raise CatError(f"self_mix: keep ({self.keep}) is larger than pool ({self.pool})")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise CatError("self_mix: temperature must be > 0 and top_p in (0, 1]")
        if self.prompts is not None and not self.prompts:
            raise CatError("self_mix: prompts is an empty list (leave it out for the shipped ones)")


def uses_chat(tokenizer, options: SelfMixOptions) -> bool:
    """Whether prompts go through the chat template (options.chat, else: the tokenizer has one)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if options.chat and not has_template:
        raise CatError("self_mix: chat is true but the tokenizer has no chat_template")
    return has_template if options.chat is None else bool(options.chat)


def prompt_texts(tokenizer, options: SelfMixOptions) -> tuple[list[str], list[str]]:
    """(prompts as given, the text the model is fed): chat-formatted when uses_chat."""
    chat = uses_chat(tokenizer, options)
    prompts = options.prompts or (GENERIC_QUESTIONS if chat else GENERIC_PROMPTS)
    if not chat:
        return list(prompts), list(prompts)
    return list(prompts), [user_turn(tokenizer, p) for p in prompts]


def mix_hash(model, tokenizer, options: SelfMixOptions) -> str:
    """16 hex digits of sha256 over the skills' weights, the base's and tokenizer's names, the
    prompts as fed and every option: the same inputs give the same file name."""
    metadata = cat_metadata(model)
    key = {
        "version": FORMAT_VERSION,
        "skills": [(s["name"], s.get("weights_sha256")) for s in metadata.skills],
        "base": metadata.base_model,
        "tokenizer": [getattr(tokenizer, "name_or_path", None), len(tokenizer)],
        "fed": prompt_texts(tokenizer, options)[1],
        "options": {k: v for k, v in asdict(options).items() if k != "batch_size"},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_self_mix(model, tokenizer, out_dir, options: SelfMixOptions | None = None) -> Path:
    """Write (or find cached) the self-written mix; returns the JSONL path,
    out_dir/self_mix-<hash>.jsonl, `keep` rows per skill, in skill order.

    model: a CAT model (attach_cat), left in its mode with its coefficients restored bit for
    bit. Rows: {"text": prompt + sample} (or {"messages": [user, assistant]} with a chat
    template), "skill": the writer's name, "kl": its score (nats per generated token).
    Raises CatError for unusable options.
    """
    options = options or SelfMixOptions()
    options.check()
    path = Path(out_dir) / f"self_mix-{mix_hash(model, tokenizer, options)}.jsonl"
    if path.is_file():
        LOG.info("self_mix: cached %s", path)
        return path
    prompts, fed = prompt_texts(tokenizer, options)
    chat = uses_chat(tokenizer, options)
    rows = []
    for index, name in enumerate(skill_names(model)):
        seed = options.seed + 1000 * index
        samples = sample_pool(model, tokenizer, fed, options, name, seed)
        kept = sorted(samples, key=lambda s: -s["kl"])[: options.keep]
        LOG.info(
            "self_mix: %s: kept %d of %d samples, KL(skill || base) %.4f..%.4f nats/token",
            name, len(kept), len(samples), kept[-1]["kl"], kept[0]["kl"],
        )  # fmt: skip
        for sample in kept:
            rows.append(_row(tokenizer, prompts, fed, sample, name, chat))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    partial.replace(path)  # a reader never sees half a mix
    return path


def _row(tokenizer, prompts, fed, sample, name, chat) -> dict:
    # no clean-up of spaces: the text must tokenize back to what was sampled and scored
    decode = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
    completion = tokenizer.decode(sample["new_ids"], **decode)
    row = {"prompt": prompts[sample["prompt"]]}
    if chat:
        row["messages"] = [
            {"role": "user", "content": prompts[sample["prompt"]]},
            {"role": "assistant", "content": completion.strip()},
        ]
    else:
        ids = tokenizer(fed[sample["prompt"]], add_special_tokens=False)["input_ids"]
        row["text"] = tokenizer.decode(ids + sample["new_ids"], **decode)
    row[SKILL_COLUMN] = name
    row["kl"] = sample["kl"]
    return row


def sample_pool(model, tokenizer, fed: list[str], options: SelfMixOptions, skill, seed: int):
    """`options.pool` samples of base + skill `skill` alone (name or index), the prompts taken
    in turn, each scored by KL(p_skill ‖ p_base) averaged over its generated tokens (the
    sampling's temperature and top_p shape the draw, never the score). Returns
    [{"prompt": index into fed, "new_ids": [int], "kl": float}] in drawing order. The model's
    mode, coefficients, the global RNG and the tokenizer's padding side are left as found."""
    was_training = model.training
    side = tokenizer.padding_side
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    model.eval()
    tokenizer.padding_side = "left"
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            order = [i % len(fed) for i in range(options.pool)]
            samples = []
            for start in range(0, options.pool, options.batch_size):
                chunk = order[start : start + options.batch_size]
                samples += _draw(model, tokenizer, fed, chunk, options, skill)
        return samples
    finally:
        tokenizer.padding_side = side
        model.train(was_training)


@torch.no_grad()
def _draw(model, tokenizer, fed, chunk, options, skill) -> list[dict]:
    device = next(p for p in model.parameters()).device
    chat = uses_chat(tokenizer, options)
    encoded = tokenizer(
        [fed[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=not chat
    ).to(device)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    with skill_alone(model, skill):
        out = model.generate(
            **encoded,
            do_sample=True,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=0,
            max_new_tokens=options.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    prompt_len = encoded["input_ids"].shape[1]
    new = out[:, prompt_len:]
    # a sample ends with its first eos (kept); what generate wrote after it is padding
    ended = (new == eos).cumsum(1) - (new == eos).long() > 0 if eos is not None else new < 0
    new_mask = ~ended
    mask = torch.cat([encoded["attention_mask"], new_mask.long()], 1)
    kl = token_kl(model, out, mask, skill)[:, prompt_len - 1 :]
    per_sample = (kl * new_mask).sum(1) / new_mask.sum(1).clamp_min(1)
    return [
        {"prompt": p, "new_ids": new[row][new_mask[row]].tolist(), "kl": float(per_sample[row])}
        for row, p in enumerate(chunk)
    ]


def token_kl(model, input_ids, attention_mask, skill, rows: int = 8) -> torch.Tensor:
    """KL(p_skill ‖ p_base) of the next-token distributions at every position but the last,
    fp32 (batch, T-1), in nats; the base is every coefficient set to 0 in place. Computed
    `rows` rows at a time (two fp32 (rows, T, vocab) log-probability tensors at once)."""
    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    zeros = [0.0] * len(skill_names(model))
    pieces = []
    for start in range(0, input_ids.shape[0], rows):
        chunk = slice(start, start + rows)
        log_probs = []
        for context in (skill_alone(model, skill), static_coefficients(model, zeros)):
            with context:
                logits = model(
                    input_ids=input_ids[chunk],
                    attention_mask=attention_mask[chunk],
                    position_ids=positions[chunk],
                ).logits
            log_probs.append(F.log_softmax(logits[:, :-1].float(), dim=-1))
            del logits
        skill_lp, base_lp = log_probs
        pieces.append((skill_lp.exp() * (skill_lp - base_lp)).sum(-1))
    return torch.cat(pieces)
