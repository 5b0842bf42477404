"""The demo's pretrained base: ship it into the repository, or install it for a demo run.

    python scripts/demo/demo_base.py ship demo_out/base demo_out/world scripts/demo/base
    python scripts/demo/demo_base.py install scripts/demo/base demo_out/world demo_out/base

Pretraining the tiny base (base.yml) takes longer than the rest of the demo, so
scripts/demo/build_base.sh runs it once and `ship` stores the result as bf16 safetensors
(a few MB) with a fingerprint of the pretraining data it saw. `install` refuses a base whose
fingerprint does not match the world that demo_world.py builds now (its facts would not be
the facts the tests ask about), then writes it back as fp32, the dtype every stage trains in.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

FINGERPRINT = "pretraining_data.sha256"


def fingerprint(world: Path) -> str:
    return hashlib.sha256((world / "data" / "generic.jsonl").read_bytes()).hexdigest()


def save(source: Path, destination: Path, dtype: torch.dtype) -> None:
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    tmp = destination.with_name(destination.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    if (source / FINGERPRINT).exists():
        shutil.copy(source / FINGERPRINT, tmp / FINGERPRINT)
    shutil.rmtree(destination, ignore_errors=True)
    tmp.rename(destination)


def ship(trained: Path, world: Path, shipped: Path) -> None:
    save(trained, shipped, torch.bfloat16)
    (shipped / FINGERPRINT).write_text(fingerprint(world) + "\n")
    size = sum(f.stat().st_size for f in shipped.iterdir()) / 2**20
    print(f"wrote {shipped} ({size:.1f} MB, bf16)")


def install(shipped: Path, world: Path, base: Path) -> None:
    if not (shipped / FINGERPRINT).exists():
        sys.exit(f"{shipped} holds no {FINGERPRINT}: rebuild it with scripts/demo/build_base.sh")
    if (shipped / FINGERPRINT).read_text().strip() != fingerprint(world):
        sys.exit(
            f"{shipped} was pretrained on other data than {world}/data/generic.jsonl "
            "(demo_world.py changed?): rebuild it with scripts/demo/build_base.sh, or run "
            "DEMO_PRETRAIN=1 scripts/demo.sh"
        )
    save(shipped, base, torch.float32)
    print(f"wrote {base} (fp32, from the shipped bf16 base in {shipped})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["ship", "install"])
    parser.add_argument("source", type=Path, help="ship: the trained base; install: shipped")
    parser.add_argument("world", type=Path, help="the demo world folder (demo_world.py)")
    parser.add_argument("destination", type=Path)
    args = parser.parse_args()
    action = ship if args.action == "ship" else install
    action(args.source, args.world, args.destination)


if __name__ == "__main__":
    main()
