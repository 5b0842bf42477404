"""The CAT engine: torch, peft, transformers and safetensors only, never axolotl.

Read bottom up (docs/layout.md; tests/test_layout.py keeps the import arrows pointing down):
`errors.py`, `config.py`, `format.py` and `granularity/base.py` are the torch-free vocabulary;
`state.py` (+ `starting.py`) the state of a CAT model; `layers/` what a wrapped layer
computes; `skills/` finding, reading, checking and planning the skills; `granularity/` which
modules share a coefficient; `export/` fold, compress, describe and write the one export;
`attach.py` builds the CAT model; `fit/`, `merge/`, `reexport.py` and `distributed.py` use it.

Names are imported on first use (PEP 562), so a torch-free part (format, errors,
export/card.py, export/summary.py) can be used, e.g. by `axolotl-cat inspect`, without
importing torch. The fold itself is `axolotl_cat_plugin.core.export.fold.fold`.
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
    "apply_export": "export.write",
    "export_cat": "export.write",
    "retire_previous_export": "export.write",
    "write_export": "export.write",
    "FoldedAdapter": "export.fold",
    "check_ranks_agree": "distributed",
    "SelfMixOptions": "fit.self_mix",
    "build_self_mix": "fit.self_mix",
    "distill_loss": "fit.distill",
    "DistillLossMixin": "fit.distill",
    "TeacherCollator": "fit.distill",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
