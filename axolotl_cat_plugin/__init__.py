"""CAT (LoRA Soups) for Axolotl: learn per-module coefficients over frozen skill LoRAs and
export one standard PEFT LoRA adapter.

The core API (`CatConfig`, `attach_cat`, `export_cat`) needs no Axolotl; `CatMergePlugin`
is imported only when asked for, so TRL and plain PEFT users never import Axolotl. Every
name is imported on first use, so `axolotl-cat inspect` starts without torch.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "CatConfig": ".core.config",
    "CatError": ".core.errors",
    "attach_cat": ".core.attach",
    "export_cat": ".core.export.write",
    "CatMergePlugin": ".integration.plugin",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
