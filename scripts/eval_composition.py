"""Score a base and any number of LoRA adapters on each skill's test and on the composite test.

    python scripts/eval_composition.py --base demo_out/base --tests demo_out/world/data \
        --method base= --method math=demo_out/skill-math --method cat=demo_out/cat \
        --out demo_out/results.json

Greedy decoding. math: the last arithmetic expression of the answer must evaluate to the
right number. code and composite: the answer is a program, run in a sandbox (a separate
process with a timeout, a memory limit, no file writes, restricted builtins and no imports);
its solution() must return the right number. A misbehaving program scores 0.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

TESTS = ("math", "code", "composite")
EXPRESSION = re.compile(r"\d+(?: [+\-*] \d+)*")
SANDBOX = r"""
import json, sys
SAFE = ("abs", "divmod", "float", "int", "len", "max", "min", "pow", "range", "round", "sum")
builtins = __builtins__ if isinstance(__builtins__, dict) else vars(__builtins__)
source = sys.stdin.read()
scope = {"__builtins__": {name: builtins[name] for name in SAFE}}
exec(compile(source, "<program>", "exec"), scope)
value = scope["solution"]()
print(json.dumps(value if isinstance(value, (int, float)) else None))
"""


def _limits() -> None:  # runs in the child, before Python starts
    resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))
    resource.setrlimit(resource.RLIMIT_CPU, (2, 2))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # no file writes
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(source: str, timeout: float = 3.0):
    """solution()'s value, or None if the program fails, hangs or misbehaves in any way."""
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", SANDBOX],
            input=source,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=_limits,
            env={},
            cwd="/",
        )
        return json.loads(done.stdout) if done.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, OSError):
        return None


def arithmetic(text: str):
    """The value of the last '17 + 5 - 20' in text (no eval), or None."""
    found = EXPRESSION.findall(text)
    if not found:
        return None
    tokens = found[-1].split()
    if "*" in tokens:
        return None
    value = int(tokens[0])
    for op, number in zip(tokens[1::2], tokens[2::2], strict=True):
        value = value + int(number) if op == "+" else value - int(number)
    return value


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected(row: dict) -> int:
    return sum(n if op == "+" else -n for op, n in row["steps"])


def detokenize(text: str) -> str:
    return re.sub(r"(?<=\d) (?=\d)", "", text).strip()


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
        outputs += [detokenize(tokenizer.decode(row, skip_special_tokens=True)) for row in new]
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


def score(test: str, rows: list[dict], answers: list[str], cache: dict) -> float:
    right = 0
    for row, answer in zip(rows, answers, strict=True):
        if test == "math":
            value = arithmetic(answer)
        else:
            if answer not in cache:
                cache[answer] = run_program(answer)
            value = cache[answer]
        right += value == expected(row)
    return right / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--tests", required=True, help="folder with test_{math,code,composite}")
    parser.add_argument("--method", action="append", required=True, help="NAME=ADAPTER or NAME=")
    parser.add_argument("--timings", help="JSON {method: training seconds}")
    parser.add_argument("--heatmap", help="a CAT export's cat_coefficients.png to copy beside")
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each test")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--out", default="demo_out/results.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    tokenizer = AutoTokenizer.from_pretrained(args.base, padding_side="left")
    folder = Path(args.tests)
    tests = {t: read_jsonl(folder / f"test_{t}.jsonl")[: args.limit] for t in TESTS}
    train_seconds = json.loads(Path(args.timings).read_text()) if args.timings else {}
    base_state = {k: v.clone() for k, v in load(args.base, None).state_dict().items()}
    results, cache = {}, {}
    for entry in tqdm(args.method, desc="methods", unit="method"):
        name, _, adapter = entry.partition("=")
        started = time.time()
        model = load(args.base, adapter or None)
        result = {"adapter": adapter or None, "update_ratio": update_ratio(base_state, model)}
        for test, rows in tests.items():
            answers = generate(model, tokenizer, [r["prompt"] for r in rows], args.batch, 24)
            result[test] = score(test, rows, answers, cache)
            result[f"{test}_samples"] = answers[:3]
        result["eval_seconds"] = round(time.time() - started, 1)
        result["train_seconds"] = train_seconds.get(name)
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
    header = f"{'method':<12}" + "".join(f"{names[t]:>17}" for t in TESTS)
    print("\n" + header + f"{'|ΔW|/|W|':>10}{'train s':>9}")
    print("-" * len(header) + "-" * 19)
    for name, r in results.items():
        ratio = f"{r['update_ratio']:.3f}" if r["update_ratio"] is not None else "-"
        seconds = f"{r['train_seconds']:.0f}" if r["train_seconds"] is not None else "-"
        cells = "".join(f"{100 * r[t]:>16.1f}%" for t in TESTS)
        print(f"{name:<12}{cells}{ratio:>10}{seconds:>9}")


if __name__ == "__main__":
    main()
