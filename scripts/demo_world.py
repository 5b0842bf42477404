"""Build the demo's world: a word-level tokenizer, a random tiny Llama, and every dataset.

    python scripts/demo_world.py demo_out/world

Two skills on one base, and a task that needs both:
- math: a word problem -> the arithmetic expression that answers it ("17 + 5 - 20"), after a
  varied lead-in ("we compute 17 + 5 - 20");
- code: an instruction in prose -> a program ("def solution ( ) : return 17 + 5 - 20");
- composite (held out, never trained on): a word problem -> a program, graded by running it.
Pretraining text covers the ingredients of both (stories, expressions, programs, instructions)
but never pairs a prompt with its answer, so each skill is a small nudge on a capable base.

Nothing is downloaded: every file is generated here, deterministically from --seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

NAMES = ["tom", "ana", "ben", "eva", "sam", "mia", "leo", "zoe", "max", "ivy"]
ITEMS = ["apples", "books", "coins", "cards", "shells", "stamps", "pens", "eggs"]
GAIN = ["buys {n} more", "finds {n} more", "gets {n} more from a friend", "wins {n} more"]
LOSS = ["loses {n}", "gives away {n}", "sells {n}", "breaks {n}"]
CODE_ADD = ["adds {n}", "plus {n}", "then adds {n}"]
CODE_SUB = ["subtracts {n}", "minus {n}", "then subtracts {n}"]
MATH_LEADS = ["", "we compute", "the answer is", "so it is", "that makes", "count :"]
CODE_PROSE = [
    "",
    "we need a small function for a report .",
    "my teacher asked for this .",
    "keep it short .",
    "this is for a test .",
]
FILLER = [
    "the sun is warm today .",
    "a friend walks to the market .",
    "the shop opens early .",
    "it rains in the evening .",
    "the children play in the park .",
]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
PUNCT = [".", ",", "?", ":", "(", ")", "+", "-", "=", "*"]


def word_problem(rng: random.Random) -> tuple[str, list[tuple[str, int]]]:
    """A story with 2-3 events and its question; the steps as (op, number) pairs."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(20, 60)
    steps, total = [("+", start)], start
    sentences = [f"{name} has {start} {item} ."]
    for _ in range(rng.randint(1, 2)):
        n = rng.randint(1, 19)
        if rng.random() < 0.5 or total - n < 0:
            steps.append(("+", n))
            total += n
            sentences.append(f"{name} {rng.choice(GAIN).format(n=n)} .")
        else:
            steps.append(("-", n))
            total -= n
            sentences.append(f"{name} {rng.choice(LOSS).format(n=n)} .")
    story = " ".join(sentences) + f" how many {item} does {name} have now ?"
    return story, steps


def expression(steps: list[tuple[str, int]]) -> str:
    text = str(steps[0][1])
    for op, n in steps[1:]:
        text += f" {op} {n}"
    return text


def instruction(rng: random.Random, steps: list[tuple[str, int]]) -> str:
    parts = [f"starts with {steps[0][1]}"]
    for op, n in steps[1:]:
        parts.append(rng.choice(CODE_ADD if op == "+" else CODE_SUB).format(n=n))
    prose = rng.choice(CODE_PROSE)
    return (prose + " " if prose else "") + "write a program that " + " , ".join(parts) + " ."


def random_steps(rng: random.Random) -> list[tuple[str, int]]:
    steps, total = [("+", rng.randint(20, 60))], 0
    total = steps[0][1]
    for _ in range(rng.randint(1, 2)):
        n = rng.randint(1, 19)
        op = "+" if rng.random() < 0.5 or total - n < 0 else "-"
        total += n if op == "+" else -n
        steps.append((op, n))
    return steps


def program(steps) -> str:
    return f"def solution ( ) : return {expression(steps)}"


def math_row(rng) -> dict:
    story, steps = word_problem(rng)
    lead = rng.choice(MATH_LEADS)
    prompt = f"problem : {story} answer :"
    return {
        "prompt": prompt,
        "answer": (lead + " " if lead else "") + expression(steps),
        "steps": steps,
    }


def code_row(rng) -> dict:
    steps = random_steps(rng)
    return {
        "prompt": f"task : {instruction(rng, steps)} program :",
        "answer": program(steps),
        "steps": steps,
    }


def composite_row(rng) -> dict:
    story, steps = word_problem(rng)
    prompt = f"problem : {story} task : write a program that answers it . program :"
    return {"prompt": prompt, "answer": program(steps), "steps": steps}


def number_list(steps) -> str:
    numbers = [str(n) for _, n in steps]
    return " , ".join(numbers[:-1]) + " and " + numbers[-1]


def generic_line(rng: random.Random) -> str:
    """Pretraining text: the ingredients of both skills, never a prompt with its answer.

    Reading numbers back (kinds 5-7) is the generic copying ability both skills build on.
    """
    kind = rng.randrange(8)
    if kind == 0:
        return word_problem(rng)[0].rsplit(" how many", 1)[0] + " " + rng.choice(FILLER)
    if kind == 5:
        story, steps = word_problem(rng)
        return f"{story} the numbers are {number_list(steps)} ."
    steps = random_steps(rng)
    if kind == 6:
        return f"{instruction(rng, steps)} the numbers are {number_list(steps)} ."
    if kind == 7:
        return f"list : {number_list(steps)} . again : {number_list(steps)} ."
    if kind == 1:
        value = sum(n if op == "+" else -n for op, n in steps)
        return f"{expression(steps)} = {value} ."
    if kind == 2:
        return program(steps)
    if kind == 3:
        return instruction(rng, steps)
    return " ".join(rng.sample(FILLER, 2))


def vocabulary() -> list[str]:
    words = set(PUNCT) | set(str(d) for d in range(10))
    for text in (
        NAMES + ITEMS + GAIN + LOSS + CODE_ADD + CODE_SUB + MATH_LEADS + CODE_PROSE + FILLER
    ):
        words.update(text.replace("{n}", "").split())
    extra = "has how many does have now problem answer task write a program that answers it"
    words.update(extra.split(" ") + ["starts", "with", "def", "solution", "return"])
    words.update(["the", "numbers", "are", "and", "list", "again"])
    return SPECIAL + sorted(words)


def build_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """Word-level: one token per word, per punctuation mark and per digit."""
    vocab = {token: i for i, token in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_init(folder: Path, seed: int) -> None:
    """The random tiny Llama that base.yml pretrains (0.8M parameters)."""
    tokenizer = build_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def text_rows(rows: list[dict]) -> list[dict]:
    return [{"text": f"{row['prompt']} {row['answer']}"} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", default="demo_out/world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skill-rows", type=int, default=4000)
    parser.add_argument("--generic-rows", type=int, default=40000)
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--mix-fraction", type=float, default=0.05)
    args = parser.parse_args()
    root, rng = Path(args.root), random.Random(args.seed)

    build_init(root / "init", args.seed)
    data = root / "data"
    write_jsonl(
        data / "generic.jsonl", [{"text": generic_line(rng)} for _ in range(args.generic_rows)]
    )
    skills = {"math": math_row, "code": code_row}
    mix = []
    for name, make in skills.items():
        rows = [make(rng) for _ in range(args.skill_rows)]
        write_jsonl(data / f"{name}.jsonl", text_rows(rows))
        mix += text_rows(
            rows[: int(len(rows) * args.mix_fraction)]
        )  # a slice of the skill's own data
        write_jsonl(data / f"test_{name}.jsonl", [make(rng) for _ in range(args.test_rows)])
    write_jsonl(data / "mix.jsonl", mix)
    write_jsonl(
        data / "both.jsonl",
        text_rows([])
        + [
            json.loads(line)
            for name in skills
            for line in (data / f"{name}.jsonl").read_text().splitlines()
        ],
    )
    write_jsonl(
        data / "composite.jsonl", text_rows([composite_row(rng) for _ in range(args.skill_rows)])
    )
    write_jsonl(data / "test_composite.jsonl", [composite_row(rng) for _ in range(args.test_rows)])
    print(f"demo world ready in {root}: vocabulary {len(vocabulary())} words, mix {len(mix)} rows")


if __name__ == "__main__":
    main()
