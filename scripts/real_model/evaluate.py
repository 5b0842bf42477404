"""Score the base and any LoRA adapters on one real-model task's three tests.

    python scripts/real_model/evaluate.py --base BASE --task-dir OUT/world/manual_json \
        --task manual_json --method base= --method manual=OUT/manual_json/skill-manual \
        --out scores.json

Greedy replies (the model's own chat template, its default system prompt) to every test
prompt, graded by ``grade.py``. Each adapter is loaded with plain PEFT (no code of this
project) and merged into a fresh copy of the base, as a user would serve it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import time
from pathlib import Path

import torch
from eval_composition import update_ratio  # scripts/demo, on the path as in real_model.sh
from grade import GRADERS
from transformers import AutoModelForCausalLM, AutoTokenizer

from axolotl_cat_plugin.core.fit.graded import greedy_replies  # chat turn, left-padded, greedy

MAX_NEW_TOKENS = 16
BATCH = 16


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load(base: str, adapter: str | None):
    """The base in fp32, with ``adapter`` (a PEFT folder) merged in when given."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def score(model, tokenizer, task_dir: Path, task: str) -> dict:
    """Accuracy (%) on each test of ``task``, with three sample replies per test."""
    result = {}
    for test, grader in GRADERS[task].items():
        rows = read_jsonl(task_dir / f"test_{test}.jsonl")
        prompts = [row["prompt"] for row in rows]
        answers = greedy_replies(model, tokenizer, prompts, MAX_NEW_TOKENS, BATCH)
        correct = [grader(reply, row) for reply, row in zip(answers, rows, strict=True)]
        result[test] = round(100.0 * sum(correct) / len(rows), 1)
        result[f"{test}_samples"] = [
            {"prompt": row["prompt"], "reply": reply, "correct": ok}
            for row, reply, ok in list(zip(rows, answers, correct, strict=True))[:3]
        ]
    return result


def read_scores(path: Path) -> dict:
    """Every method's scores in ``path`` (a scores.json), or none."""
    return json.loads(path.read_text()) if path.is_file() else {}


def add_scores(path: Path, name: str, scores: dict) -> None:
    """Put one method's scores into ``path``, whole or not at all, under a lock: two runs of
    the study (two task chains, or two parts of one task's chain) may score into it at once."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        results = read_scores(path)
        results[name] = scores
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(results, indent=1))
        partial.replace(path)


def stage_hash(folder: str) -> str | None:
    """The stage stamp of a folder built by scripts/real_model.sh, if any."""
    stamp = Path(folder) / ".stage-hash"
    return stamp.read_text().strip() if stamp.is_file() else None


def main() -> None:
    """Command line: score each --method NAME=ADAPTER (empty: the base) into --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--task-dir", required=True, type=Path)
    parser.add_argument("--task", required=True, choices=sorted(GRADERS))
    parser.add_argument("--method", action="append", default=[], help="NAME=ADAPTER_DIR")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--skip-scored",
        action="store_true",
        help="keep a method's scores when its folder's .stage-hash is the one they were made of",
    )
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    base_state = load(args.base, None).state_dict()
    for spec in args.method:
        name, _, adapter = spec.partition("=")
        stamp = stage_hash(adapter or args.base)
        # read afresh for every method: another run may have scored it meanwhile
        if args.skip_scored and read_scores(args.out).get(name, {}).get("stage_hash") == stamp:
            continue
        started = time.time()
        model = load(args.base, adapter or None)
        scores = score(model, tokenizer, args.task_dir, args.task)
        ratio = update_ratio(base_state, model)
        scores["update_ratio"] = round(ratio, 5) if ratio is not None else None
        scores["eval_seconds"] = round(time.time() - started, 1)
        scores["stage_hash"] = stamp
        add_scores(args.out, name, scores)
        print(f"{name}: " + ", ".join(f"{t} {scores[t]}%" for t in GRADERS[args.task]), flush=True)


if __name__ == "__main__":
    main()
