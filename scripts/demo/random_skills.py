"""The `cat_random` control: random LoRAs shaped like the real skills.

    python scripts/demo/random_skills.py --seed 0 demo_out/skill-manual=demo_out/random-manual ...

For every skill and module, lora_A and lora_B are Gaussian with exactly the real factors'
shapes and Frobenius norms, and adapter_config.json is the skill's own (same r, lora_alpha,
targets). CAT fitted over these tells what learning coefficients over *any* LoRAs of that
size achieves ("merging is only regularisation", arXiv 2602.12323).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def randomize(source: Path, target: Path, generator: torch.Generator) -> None:
    tensors = load_file(str(source / "adapter_model.safetensors"))
    shaped = {}
    for key, tensor in sorted(tensors.items()):
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        shaped[key] = (noise * (tensor.float().norm() / noise.norm())).to(tensor.dtype)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "adapter_config.json", target / "adapter_config.json")
    save_file(shaped, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pairs", nargs="+", metavar="SKILL=OUT")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(args.seed)
    for pair in args.pairs:
        source, _, target = pair.partition("=")
        randomize(Path(source), Path(target), generator)
        print(f"wrote {target} (random, shaped like {source})")


if __name__ == "__main__":
    main()
