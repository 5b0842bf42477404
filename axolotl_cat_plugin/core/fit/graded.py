"""A task metric for the comparison with static merges: greedy replies to the user's prompts,
scored by the user's own grader.

The eval loss on rows of the skills' own data can point the wrong way: on SmolLM2-135M
(docs/real_model.md) every fit lowered it while the composite task got worse, and the variant
with the lowest held-out loss was never the best on the task. A user who can say what a good
reply is (a function) gets that instead: each static mix and the fitted CAT answer the same
prompts, greedy, with the coefficients set in place (baselines.static_coefficients), and the
grader scores every reply. Source: issue 19, item 6.

The prompts file is JSONL, one row per prompt: ``{"prompt": str, ...}``; every other field
(an expected answer, a label) is passed to the grader untouched. The grader is
``module:function`` (an importable module) or ``path/to/file.py:function``, called as
``function(reply: str, row: dict) -> float | bool`` with a score in [0, 1].
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import CatError

Grader = Callable[[str, dict], "float | bool"]


def load_grader(spec: str) -> Grader:
    """The function ``spec`` names: ``module:function`` or ``path/to/file.py:function``.

    Raises CatError naming the spec when it has no ``:``, the module or file cannot be
    imported, or the name is not a callable in it.
    """
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise CatError(f"grader {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if source.endswith(".py"):
            path = Path(source)
            if not path.is_file():
                raise CatError(f"grader {spec!r}: no file {path}")
            module_spec = importlib.util.spec_from_file_location(f"cat_grader_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(source)
    except CatError:
        raise
    except Exception as error:  # the user's module: any import error, named
        raise CatError(f"grader {spec!r}: importing {source} failed: {error}") from error
    function = getattr(module, name, None)
    if not callable(function):
        raise CatError(f"grader {spec!r}: {source} has no function {name!r}")
    return function


def read_prompts(path) -> list[dict]:
    """The rows of a JSONL prompts file, each a dict with a non-empty string ``prompt``.

    Raises CatError naming the file (and line) when it is missing, empty, or a row is not
    JSON or has no prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise CatError(f"grader prompts: no file {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise CatError(f"{path}:{number}: not JSON ({error})") from error
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise CatError(f'{path}:{number}: each row needs a non-empty string "prompt"')
        rows.append(row)
    if not rows:
        raise CatError(f"grader prompts: {path} has no rows")
    return rows


def user_turn(tokenizer, prompt: str) -> str:
    """``prompt`` as one user turn through the tokenizer's chat template, ending with the
    generation prompt (the assistant's turn opened)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


@torch.no_grad()
def greedy_replies(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 8
) -> list[str]:
    """Greedy replies (decoded, special tokens skipped, stripped) to ``prompts``, in order,
    each prompt sent as one user turn (user_turn) when the tokenizer has a chat template.

    Batches are left-padded; a reply ends at the first EOS. The model's mode and the
    tokenizer's padding side are left as found.
    """
    chat = bool(getattr(tokenizer, "chat_template", None))
    fed = [user_turn(tokenizer, p) if chat else p for p in prompts]
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    replies = []
    try:
        for start in range(0, len(fed), batch_size):
            encoded = tokenizer(
                fed[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=not chat,
            ).to(device)
            out = model.generate(
                **encoded,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            new = out[:, encoded["input_ids"].shape[1] :]
            replies += [
                tokenizer.decode(row, skip_special_tokens=True).strip() for row in new.tolist()
            ]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


def graded_score(
    model,
    tokenizer,
    rows: Sequence[dict],
    grader: Grader,
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> float:
    """Mean grader score over ``rows`` (read_prompts) of the model's greedy replies, in [0, 1].

    Raises CatError when the grader returns something that is not a number in [0, 1].
    """
    prompts = [row["prompt"] for row in rows]
    replies = greedy_replies(model, tokenizer, prompts, max_new_tokens, batch_size)
    total = 0.0
    for reply, row in zip(replies, rows, strict=True):
        score = grader(reply, row)
        if isinstance(score, bool):
            score = float(score)
        if not isinstance(score, (int, float)) or not math.isfinite(score) or not 0 <= score <= 1:
            raise CatError(f"the grader returned {score!r} for {row['prompt']!r}; expected 0..1")
        total += score
    return total / len(rows)
