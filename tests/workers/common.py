"""What the worker scripts share: their arguments, the tiny world, the rows they train on,
their coefficients and how they end. Imported as `workers.common` with tests/ on sys.path."""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch.distributed as dist
from fixtures import build_world

from axolotl_cat_plugin.core.export.fold import full_tensor, gathered
from axolotl_cat_plugin.core.state import is_coefficient

SEQUENCE_LEN = 16
SKILLS = ("math", "code", "prose")


def argument_parser(description: str, *, steps: int) -> argparse.ArgumentParser:
    """The arguments every worker takes; each adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--base", help="base model folder (default: build a tiny Llama in OUT)")
    parser.add_argument("--skills", nargs="+", help="skill LoRA folders (default: build three)")
    parser.add_argument("--out", required=True, help="where the exports and rank files go")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--per-device-batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def base_and_skills(args, out: Path) -> tuple[Path, list[Path]]:
    """--base and --skills, or the tiny world built in OUT/world when neither is given."""
    if bool(args.base) != bool(args.skills):
        raise SystemExit("give --base and --skills together, or neither (a tiny world is built)")
    if args.base:
        return Path(args.base), [Path(path) for path in args.skills]
    return tiny_world(out)


def tiny_world(out: Path) -> tuple[Path, list[Path]]:
    """The test suite's tiny base and three skills, built by rank 0 while the others wait (for
    a file: the DDP worker has no process group yet at this point)."""
    root = out / "world"
    ready = root / "ready"
    if rank() == 0 and not ready.exists():
        build_world(root)
        ready.write_text("ok\n")
    deadline = time.monotonic() + 300
    while not ready.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{ready} never appeared")
        time.sleep(0.2)
    return root / "base", [root / "skills" / name for name in SKILLS]


def make_rows(count: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`count` distinct fixed-length token rows (BOS first): no padding, so no collation drift
    and every row weighs the same."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < count:
        row = [1] + [rng.randrange(4, vocab_size) for _ in range(SEQUENCE_LEN - 1)]
        if tuple(row) not in seen:
            seen.add(tuple(row))
            rows.append(row)
    return rows


def coefficients(model) -> dict[str, list[float]]:
    """Every coefficient tensor by name, whole and flattened (gathered: collective under FSDP2
    and ZeRO-3; Python floats hold fp32 exactly)."""
    with gathered(model):
        return {
            name: full_tensor(param).detach().float().flatten().tolist()
            for name, param in model.named_parameters()
            if is_coefficient(name)
        }


def write_record(out: Path, record: dict) -> None:
    """This rank's facts as OUT/rank{R}.json (tests/workers/launch.py's `ranks` reads them)."""
    (out / f"rank{record['rank']}.json").write_text(json.dumps(record, indent=1) + "\n")


def close() -> None:
    """Every rank reaches the end before the process group goes."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
