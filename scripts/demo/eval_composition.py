"""Score a base and any number of LoRA adapters on each skill's test and on the composite test.

    python scripts/demo/eval_composition.py --base demo_out/base --tests demo_out/world/data \
        --method base= --method manual=demo_out/skill-manual --method cat=demo_out/cat \
        --out demo_out/results.json

Greedy decoding of a few tokens after each prompt. The answer is the last word of the first
sentence the model writes ("red , rouge ." -> "rouge"); it must equal the expected word.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

TESTS = ("manual", "french", "composite")


def final_word(text: str) -> str:
    """The last word before the first full stop: what a reader takes as the answer."""
    words = text.split(".")[0].split()
    return words[-1] if words else ""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], batch: int, max_new: int) -> list[str]:
    outputs = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]  # as axolotl's completion type: no BOS
        encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(
            **encoded,
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = ids[:, encoded["input_ids"].shape[1] :]
        outputs += [tokenizer.decode(row, skip_special_tokens=True) for row in new]
    return outputs


def load(base: str, adapter: str | None):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def update_ratio(base_state: dict, model) -> float | None:
    """Mean over changed weight matrices of ||W' - W||_F / ||W||_F."""
    ratios = []
    for name, weight in model.state_dict().items():
        original = base_state.get(name)
        if original is None or weight.dim() != 2 or torch.equal(original, weight):
            continue
        ratios.append(((weight - original).norm() / original.norm()).item())
    return sum(ratios) / len(ratios) if ratios else None


def accuracy(rows: list[dict], answers: list[str]) -> float:
    right = sum(final_word(text) == row["answer"] for row, text in zip(rows, answers, strict=True))
    return right / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--tests", required=True, help="folder with test_{manual,french,composite}")
    parser.add_argument("--method", action="append", required=True, help="NAME=ADAPTER or NAME=")
    parser.add_argument("--timings", help="JSON {method: training seconds}")
    parser.add_argument("--heatmap", help="a CAT export's cat_coefficients.png to copy beside")
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each test")
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--out", default="demo_out/results.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    tokenizer = AutoTokenizer.from_pretrained(args.base, padding_side="left")
    folder = Path(args.tests)
    tests = {t: read_jsonl(folder / f"test_{t}.jsonl")[: args.limit] for t in TESTS}
    train_seconds = json.loads(Path(args.timings).read_text()) if args.timings else {}
    base_state = {k: v.clone() for k, v in load(args.base, None).state_dict().items()}
    results = {}
    for entry in tqdm(args.method, desc="methods", unit="method"):
        name, _, adapter = entry.partition("=")
        started = time.time()
        model = load(args.base, adapter or None)
        result = {"adapter": adapter or None, "update_ratio": update_ratio(base_state, model)}
        for test, rows in tests.items():
            answers = generate(model, tokenizer, [r["prompt"] for r in rows], args.batch, 6)
            result[test] = accuracy(rows, answers)
            shown = zip(rows[:3], answers[:3], strict=True)
            result[f"{test}_samples"] = [f"{r['prompt']} -> {a}" for r, a in shown]
        result["eval_seconds"] = round(time.time() - started, 1)
        result["train_seconds"] = train_seconds.get(name)
        result["test_sizes"] = {test: len(rows) for test, rows in tests.items()}
        results[name] = result

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if args.heatmap and Path(args.heatmap).exists():
        shutil.copy(args.heatmap, out.parent / Path(args.heatmap).name)
    print_table(results, {t: len(r) for t, r in tests.items()})
    print(f"wrote {out}")


def print_table(results: dict, sizes: dict | None = None) -> None:
    names = {t: f"{t} ({sizes[t]})" if sizes else t for t in TESTS}
    width = max(14, *(len(name) + 2 for name in results))
    header = f"{'method':<{width}}" + "".join(f"{names[t]:>17}" for t in TESTS)
    print("\n" + header + f"{'|ΔW|/|W|':>10}{'train s':>9}")
    print("-" * len(header) + "-" * 19)
    for name, r in results.items():
        ratio = f"{r['update_ratio']:.3f}" if r["update_ratio"] is not None else "-"
        seconds = f"{r['train_seconds']:.0f}" if r["train_seconds"] is not None else "-"
        cells = "".join(f"{100 * r[t]:>16.1f}%" for t in TESTS)
        print(f"{name:<{width}}{cells}{ratio:>10}{seconds:>9}")


if __name__ == "__main__":
    main()
