"""The largest difference between two CAT exports, and between the pieces they are made of.

One home for the comparison every "N processes fit what one fits" test makes (DDP, FSDP2,
ZeRO-3, with and without Axolotl, on the CPU and on a GPU), and for the workers in
tests/workers/ that compare folded adapters in memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from axolotl_cat_plugin.core.export import write as export


def tensor_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| over equally named tensors; inf if the names or any shape differ."""
    if a.keys() != b.keys():
        return math.inf
    worst = 0.0
    for key, tensor in a.items():
        if tensor.shape != b[key].shape:
            return math.inf
        if tensor.numel():
            worst = max(worst, float((tensor - b[key]).abs().max()))
    return worst


def largest_difference(a, b) -> float:
    """Largest difference between two equally shaped nests of lists / dicts of floats."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max((largest_difference(a[key], b[key]) for key in a), default=0.0)
    if isinstance(a, list):
        assert len(a) == len(b)
        return max((largest_difference(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    return abs(a - b)


def export_difference(a: Path, b: Path) -> tuple[float, float]:
    """Largest difference of two exports' adapter tensors and of their recorded coefficients."""
    tensors = tensor_difference(
        load_file(str(a / export.WEIGHTS_FILE)), load_file(str(b / export.WEIGHTS_FILE))
    )
    modules = [
        json.loads((out / export.COEFFICIENTS_FILE).read_text())["modules"] for out in (a, b)
    ]
    coefficients = [{name: entry["coefficients"] for name, entry in m.items()} for m in modules]
    return tensors, largest_difference(*coefficients)
