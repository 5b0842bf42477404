"""The CAT engine: torch, peft, transformers and safetensors only, never axolotl."""

from .attach import attach_cat, cat_layers, cat_metadata
from .config import CatConfig, SkillSpec
from .errors import CatError
from .export import apply_export, export_cat, retire_previous_export, write_export
from .fold import FoldedAdapter, fold

__all__ = [
    "CatConfig",
    "CatError",
    "FoldedAdapter",
    "SkillSpec",
    "apply_export",
    "attach_cat",
    "cat_layers",
    "cat_metadata",
    "export_cat",
    "fold",
    "retire_previous_export",
    "write_export",
]
