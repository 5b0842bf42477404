"""The CAT engine: torch, peft, transformers and safetensors only, never axolotl."""

from .attach import attach_cat, cat_layers, cat_metadata, has_coefficients
from .config import CatConfig, SkillSpec
from .errors import CatError
from .export import apply_export, export_cat, retire_previous_export, write_export
from .fold import FoldedAdapter, fold
from .ranks import check_ranks_agree

__all__ = [
    "CatConfig",
    "CatError",
    "FoldedAdapter",
    "SkillSpec",
    "apply_export",
    "attach_cat",
    "cat_layers",
    "cat_metadata",
    "check_ranks_agree",
    "export_cat",
    "fold",
    "has_coefficients",
    "retire_previous_export",
    "write_export",
]
