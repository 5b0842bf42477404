"""One fit of the real-model study on a small mix of the skills' rows: CAT or a fresh LoRA.

    python scripts/real_model/fit.py --base BASE --task-dir OUT/world/math_words \
        --skill math=OUT/math_words/skill-math --skill words=OUT/math_words/skill-words \
        --method cat_core --seed 0 --out OUT/math_words/seed-0/cat_core

Methods: ``cat_module`` / ``cat_layer`` / ``cat_rank`` / ``cat_core`` (CAT through this
project's Python API, ``attach_cat`` + ``export_cat``, as a TRL or plain-PEFT user runs it)
and ``mix_lora`` (a fresh PEFT LoRA of the skills' total rank on exactly the same rows, steps
and batch). The mix is ``--fraction`` of each skill's rows, drawn once per task (the same rows
for every method and seed); the seed changes the order of the batches (and mix_lora's
initialisation). The loss is on the assistant's tokens and its end-of-turn token, as
Axolotl's ``chat_template`` datasets train by default.

Objectives: ``lm`` (the loss on the mix's answers, as ``axolotl train`` fits CAT) or
``distill`` (KL(skill ‖ composed) per answer token, each row's teacher the skill whose data it
is: ``axolotl_cat_plugin.core.distill``, issue 23). ``--mix-file`` replaces the skills' rows
by a JSONL mix with chat ``messages`` and a ``skill`` column, such as the one ``axolotl-cat
self-mix`` writes from the skills alone (no skill data); the held-out loss stays on the
skills' own rows.

The loop is the miniature harness's (scripts/demo/fit_loop.py: AdamW, cosine schedule). Two
fixes for a fit that follows its mix too far (issue 19, item 4; scripts/demo/regularize.py):
``--penalty W`` adds W times the squared change of the coefficients relative to their start's
squared norm to the loss (L2-SP toward the start); ``--early-stop N`` computes the held-out
loss every N steps and keeps the coefficients at its best. Neither is on by default; without
them the fit is the one the main tables report.

Writes the adapter (a standard PEFT folder) and ``fit.json``: the settings, the training
loss every 4 steps, the loss on 32 rows of the skills' data outside the mix, before and after
the fit, how far the coefficients moved, the number of trainable parameters and the seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from evaluate import read_jsonl
from fit_loop import fit_loop  # scripts/demo, on the path as in real_model.sh
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

GRANULARITY = {"cat_module": "module", "cat_layer": "layer", "cat_rank": "rank", "cat_core": "core"}
METHODS = [*GRANULARITY, "mix_lora"]
MIX_SEED = 1234  # the mix's rows do not depend on the fit's seed


def split_rows(task_dir: Path, skills: list[str], fraction: float, held_out: int):
    """(mix, held-out) rows: ``fraction`` of each skill's rows, and ``held_out`` others; each
    mix row gains the column ``skill`` (its teacher under the ``distill`` objective)."""
    rng = random.Random(MIX_SEED)
    mix, rest = [], []
    for skill in skills:
        rows = read_jsonl(task_dir / f"{skill}.jsonl")
        rng.shuffle(rows)
        count = max(1, round(fraction * len(rows)))
        mix += [{**row, "skill": skill} for row in rows[:count]]
        rest += rows[count : count + held_out // len(skills)]
    return mix, rest


def encode(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """input ids and labels (-100 on the prompt), in the tokenizer's chat template."""
    messages = row["messages"]
    prompt = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    answer = full[len(prompt) :].rstrip("\n")  # the reply and its <|im_end|>
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def batches(encoded, batch: int, collator):
    """Consecutive groups of ``batch`` encoded rows, right-padded by ``collator``
    (transformers' DataCollatorForSeq2Seq: pad id for inputs, -100 for labels)."""
    for start in range(0, len(encoded), batch):
        chunk = encoded[start : start + batch]
        yield collator([{"input_ids": ids, "labels": labels} for ids, labels in chunk])


@torch.no_grad()
def mean_loss(model, encoded, batch: int, collator) -> float:
    """Token-weighted mean loss over ``encoded``."""
    total, tokens = 0.0, 0
    for inputs in batches(encoded, batch, collator):
        count = int((inputs["labels"][:, 1:] != -100).sum())
        total += float(model(**inputs).loss) * count
        tokens += count
    return total / max(tokens, 1)


def read_mix_file(path: Path, skills: list[str]) -> list[dict]:
    """The rows of a JSONL mix (chat ``messages`` and a ``skill`` column naming one of
    ``skills``); raises SystemExit naming the file for a row without them."""
    rows = read_jsonl(path)
    for number, row in enumerate(rows, 1):
        if "messages" not in row or row.get("skill") not in skills:
            raise SystemExit(f"{path}:{number}: needs chat `messages` and a `skill` in {skills}")
    return rows


def build(method: str, base, skills: dict[str, str], init: float):
    """The model to train: CAT over the skills, or a fresh LoRA of their total rank."""
    if method == "mix_lora":
        from peft import LoraConfig, PeftConfig, get_peft_model

        configs = [PeftConfig.from_pretrained(path) for path in skills.values()]
        rank = sum(c.r for c in configs)
        return get_peft_model(
            base,
            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=configs[0].target_modules),
        )
    from axolotl_cat_plugin import CatConfig, attach_cat

    skill_list = [{"path": path, "name": name} for name, path in skills.items()]
    return attach_cat(
        base, CatConfig(skills=skill_list, granularity=GRANULARITY[method], init=init)
    )


def coefficient_movement(model, start: dict[str, torch.Tensor]) -> dict:
    """How far the trainable parameters moved: relative L2 change, min and max value."""
    moved = {}
    now = {n: p.detach().float() for n, p in model.named_parameters() if p.requires_grad}
    flat_now = torch.cat([v.flatten() for v in now.values()])
    flat_start = torch.cat([start[n].flatten() for n in now])
    moved["relative_change"] = float(
        (flat_now - flat_start).norm() / flat_start.norm().clamp_min(1e-12)
    )
    moved["min"], moved["max"] = float(flat_now.min()), float(flat_now.max())
    return moved


def main() -> None:
    """Command line: one fit, its adapter and fit.json under --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--task-dir", required=True, type=Path)
    parser.add_argument("--skill", action="append", required=True, help="NAME=PATH (CAT's skills)")
    parser.add_argument(
        "--data-skills", nargs="+", help="whose rows form the mix (default: --skill names)"
    )
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--init", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--objective", choices=["lm", "distill"], default="lm")
    parser.add_argument(
        "--mix-file", type=Path, help="a JSONL mix (chat messages + skill) for the skills' rows"
    )
    parser.add_argument("--penalty", type=float, default=0.0, help="L2-SP weight toward the start")
    parser.add_argument("--early-stop", type=int, default=0, help="held-out check every N steps")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    skills = dict(spec.split("=", 1) for spec in args.skill)
    started = time.time()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    if args.objective == "distill" and args.method not in GRANULARITY:
        parser.error("--objective distill needs a CAT method (the skills are the teachers)")
    model = build(args.method, base, skills, args.init)
    mix, held_out = split_rows(args.task_dir, args.data_skills or list(skills), args.fraction, 32)
    if args.mix_file is not None:
        mix = read_mix_file(args.mix_file, list(skills))
    mix_encoded = [encode(tokenizer, row) for row in mix]
    held_encoded = [encode(tokenizer, row) for row in held_out]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, return_tensors="pt")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().float().clone() for n, p in named.items()}
    held_before = mean_loss(model.eval(), held_encoded, 8, collator)

    def batch_loss(picked: list[int]) -> torch.Tensor:
        inputs = next(batches([mix_encoded[i] for i in picked], args.batch, collator))
        if args.objective == "distill":
            from axolotl_cat_plugin.core.distill import distill_loss

            return distill_loss(model, teachers=[mix[i]["skill"] for i in picked], **inputs)
        return model(**inputs).loss

    def held_out_loss() -> float:
        value = mean_loss(model.eval(), held_encoded, 8, collator)
        model.train()
        return value

    def log(step: int, loss: float) -> None:
        if step % 4 == 0 or step == args.steps:
            where = f"[{args.method} seed {args.seed}] step {step}/{args.steps}"
            print(f"{where} loss {loss:.4f}", flush=True)

    model.train()
    losses, stopping = fit_loop(
        named,
        batch_loss,
        rows=len(mix_encoded),
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        penalty=args.penalty,
        early_stop=(args.early_stop, held_out_loss) if args.early_stop else None,
        on_step=log,
    )
    train_seconds = time.time() - started
    held_after = mean_loss(model.eval(), held_encoded, 8, collator)
    record = {
        "method": args.method,
        "seed": args.seed,
        "lr": args.lr,
        "init": args.init,
        "steps": args.steps,
        "batch": args.batch,
        "mix_rows": len(mix),
        "fraction": args.fraction,
        "objective": args.objective,
        "mix_file": str(args.mix_file) if args.mix_file else None,
        "skills": skills,
        "trainable_parameters": sum(p.numel() for p in named.values()),
        "train_loss": [
            round(sum(losses[i : i + 4]) / len(losses[i : i + 4]), 4)
            for i in range(0, len(losses), 4)
        ],
        "held_out_loss_before": round(held_before, 4),
        "held_out_loss_after": round(held_after, 4),
        "movement": coefficient_movement(model, start),
        **({"penalty": args.penalty} if args.penalty else {}),
        **(
            {
                "early_stop": {
                    "every": args.early_stop,
                    "held_out": stopping.history,
                    "kept_step": stopping.best_step,
                }
            }
            if stopping
            else {}
        ),
        "train_seconds": round(train_seconds, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if args.method == "mix_lora":
        model.save_pretrained(args.out)
    else:
        from axolotl_cat_plugin import export_cat

        export_cat(model, args.out)
    (args.out / "fit.json").write_text(json.dumps(record, indent=1))
    print(
        json.dumps(
            {
                k: record[k]
                for k in (
                    "method",
                    "seed",
                    "objective",
                    "held_out_loss_before",
                    "held_out_loss_after",
                    "train_seconds",
                )
            }
        )
    )


if __name__ == "__main__":
    main()
