"""What a server needs to know about a CAT export, said by the card and by `inspect`.

vLLM sizes its LoRA slots by `--max-lora-rank`, which accepts only a few values
(vllm/config/lora.py), and refuses an adapter with `modules_to_save`; PEFT, transformers and
Axolotl load both.
"""

from __future__ import annotations

from ..format import CatRecord

# vLLM's --max-lora-rank accepts only these sizes (vllm/config/lora.py)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that fits `rank`; None above vLLM's largest."""
    return next((size for size in VLLM_MAX_LORA_RANKS if size >= rank), None)


def saved_modules_note(record: CatRecord) -> str:
    """What a server needs to know about an export that carries modules_to_save."""
    names = ", ".join(
        f"`{name}` ("
        + ", ".join(f"{skill} {c:.3g}" for skill, c in entry.get("coefficients", {}).items())
        + ")"
        for name, entry in record.saved_modules.items()
    )
    return (
        f"This adapter also carries full modules ({names}) in `modules_to_save`, composed from "
        "the skills' saved modules: PEFT (and so transformers and Axolotl) loads them, vLLM "
        "does not load `modules_to_save` (it refuses such an adapter): serve it merged into "
        "the base instead."
    )
