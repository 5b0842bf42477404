"""The state of a CAT model, and the one interface the rest of the package reads it through.

attach.py builds a CAT model: a PeftModel whose adapter `ADAPTER` holds every skill, with
`CatMetadata` on its tuner and, on every wrapped layer, `cat_module_name` plus (where a
skill touches the layer) the coefficients `cat_alpha` and their buffers. fold, export,
baselines, ranks, the trainer and the CLI find those layers and that metadata here, never
by attribute names of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .errors import CatError

ADAPTER = "default"
# the name of the coefficient parameter on a wrapped layer; no `lora_` in it, so that no
# trainer's adapter save sweeps it into an adapter file
COEFFICIENTS = "cat_alpha"


@dataclass
class CatMetadata:
    """What the export needs to know beyond the layers' own tensors."""

    skills: list[dict]
    granularity: str
    parametrization: str
    base_model: str | None
    target_modules: list[str] | str
    fan_in_fan_out: bool
    extra: dict = field(default_factory=dict)


def cat_layers(model: nn.Module):
    """(module name in the base model, layer) for every wrapped layer, in model order.

    Layers that no skill touches have no `cat_alpha` and zero factors.
    """
    for module in model.modules():
        if hasattr(module, "cat_module_name"):
            yield module.cat_module_name, module


def has_coefficients(model: nn.Module) -> bool:
    """Whether the model still carries CAT coefficients (False once folded by apply_export)."""
    return any(weighted(layer) for _, layer in cat_layers(model))


def cat_metadata(model: nn.Module) -> CatMetadata:
    """The CatMetadata attach_cat put on the model. Raises CatError on a model without one."""
    for module in model.modules():
        metadata = getattr(module, "cat_metadata", None)
        if isinstance(metadata, CatMetadata):
            return metadata
    raise CatError("this model has no CAT adapter; build it with attach_cat first")


def is_coefficient(parameter_name: str) -> bool:
    """Whether a (dotted) parameter name is a CAT coefficient."""
    return parameter_name.rsplit(".", 1)[-1] == COEFFICIENTS


def weighted(layer: nn.Module) -> bool:
    """Whether a wrapped layer carries coefficients (False where no skill touches it, and
    everywhere once apply_export has folded the model)."""
    return hasattr(layer, COEFFICIENTS)


def coefficient_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable coefficients by name (one shared by several layers appears once)."""
    return {name: p for name, p in model.named_parameters() if is_coefficient(name)}
