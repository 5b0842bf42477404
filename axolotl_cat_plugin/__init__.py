"""CAT (LoRA Soups) for Axolotl: learn per-module coefficients over frozen skill LoRAs and
export one standard PEFT LoRA adapter.

The core API (`CatConfig`, `attach_cat`, `export_cat`) needs no Axolotl; `CatMergePlugin`
is imported only when asked for, so TRL and plain PEFT users never import Axolotl.
"""

from .core import CatConfig, CatError, attach_cat, export_cat

__all__ = ["CatConfig", "CatError", "CatMergePlugin", "attach_cat", "export_cat"]


def __getattr__(name: str):
    if name == "CatMergePlugin":
        from .integration.plugin import CatMergePlugin

        return CatMergePlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
