"""The CAT engine: torch, peft, transformers and safetensors only, never axolotl.

Names are imported on first use (PEP 562), so a torch-free part (format, errors, card,
summary) can be used, e.g. by `axolotl-cat inspect`, without importing torch. The function
`fold` is not among them: once anything imports the submodule `core.fold`, Python binds that
name to the module, so import the function from `axolotl_cat_plugin.core.fold`.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "CatConfig": "config",
    "SkillSpec": "config",
    "CatError": "errors",
    "attach_cat": "attach",
    "cat_layers": "state",
    "cat_metadata": "state",
    "has_coefficients": "state",
    "apply_export": "export",
    "export_cat": "export",
    "retire_previous_export": "export",
    "write_export": "export",
    "FoldedAdapter": "fold",
    "check_ranks_agree": "ranks",
    "SelfMixOptions": "self_mix",
    "build_self_mix": "self_mix",
    "distill_loss": "distill",
    "DistillLossMixin": "distill",
    "TeacherCollator": "distill",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
