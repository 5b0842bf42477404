"""The state of a CAT model, and the one interface the rest of the package reads it through.

attach.py builds a CAT model: a PeftModel whose adapter `ADAPTER` holds every skill, with
`CatMetadata` on its tuner. Every wrapped layer (and every composed modules_to_save wrapper)
holds its CAT state the way PEFT holds DoRA's magnitude: a submodule in a ModuleDict keyed
by adapter name, `layer.cat_state[ADAPTER]`, a `CatState`. fold, export, baselines, ranks,
the trainer, the CLI and the tests reach layers, coefficients and metadata through the
functions here, never by attribute names of their own.

The slot layout (which coefficient weights which rank slot of the concatenated adapter) is
encoded by `slot_layout` and decoded by `CatState.slot_skills`, both here.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import CatError
from .granularity.base import Parametrization

ADAPTER = "default"
# the ModuleDict every CAT layer carries, and the coefficient parameter in each state; no
# `lora_` in either, so that no trainer's or PEFT's adapter save sweeps them into an adapter
STATE = "cat_state"
COEFFICIENTS = "coefficients"


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
    target_parameters: list[str] | None = None  # LoRA on MoE expert parameters (layers/experts.py)


class CatState(nn.Module):
    """CAT's state on one wrapped layer (or one composed saved module).

    coefficients: the learned alpha, an fp32 nn.Parameter, shape (groups, K) (groups = 1, or
        the largest skill rank with granularity `rank`), or (R, R) for the core M of
        granularity `core`; None on a wrapped layer no skill touches. Several states share
        one Parameter with granularity `layer` or `model`.
    present: bool (groups, K), the skills each group of coefficients holds.
    slot_index: long (R,), the flat index (row * K + skill) of the coefficient weighting each
        rank slot of the concatenated adapter (from `slot_layout`).
    slot_scale: fp32 (R,), the PEFT scaling s_i of the skill owning each slot (0: padding).
    skill_cores: fp32 (K, R, R), granularity `core` only: each skill's plain sum in the
        joint basis (granularity/core_space.py), M = Σ_i c_i C_i for per-skill weights c.
    module_name: the module's name in the base model; skill_names: the K skills in order;
    parametrization: how alpha becomes c (granularity/base.py).
    strategy: what shaped the coefficients: on a wrapped layer the GranularityStrategy
        (granularity/), which the forward's `mix`, the fold and the static mixes ask; on a
        composed saved module its kind (layers/saved_modules.SavedModuleKind), which the
        static mixes ask (`set_static`); None where there are no coefficients.
    """

    def __init__(
        self,
        module_name: str,
        skill_names: tuple[str, ...],
        parametrization: Parametrization | str,
        coefficients: nn.Parameter | None = None,
        present: torch.Tensor | None = None,
        slot_index: torch.Tensor | None = None,
        slot_scale: torch.Tensor | None = None,
        skill_cores: torch.Tensor | None = None,
        strategy=None,
    ):
        super().__init__()
        self.module_name = module_name
        self.skill_names = tuple(skill_names)
        self.parametrization = Parametrization.parse(parametrization)
        self.strategy = strategy
        self.coefficients = coefficients
        for name, value in (
            ("present", present),
            ("slot_index", slot_index),
            ("slot_scale", slot_scale),
            ("skill_cores", skill_cores),
        ):
            self.register_buffer(name, value, persistent=False)

    @property
    def saved_module(self) -> bool:
        """Whether this state composes a whole saved module (modules_to_save; no slots): its
        strategy says so (layers/saved_modules.SavedModuleKind.whole_module)."""
        return bool(getattr(self.strategy, "whole_module", False))

    @property
    def weighted(self) -> bool:
        """Whether a skill touches this layer (it then has coefficients)."""
        return self.coefficients is not None

    def effective(self) -> torch.Tensor:
        """c from alpha (fp32, (groups, K)); absent skills 0 under softmax."""
        return self.parametrization.coefficients(self.coefficients, self.present)

    def slot_weights(self) -> torch.Tensor:
        """w: the weight c·s of every rank slot, fp32, shape (R,)."""
        return self.effective().flatten()[self.slot_index] * self.slot_scale

    def mix(self) -> torch.Tensor:
        """How the rank slots are mixed, fp32: w (R,) (diagonal), or a matrix (R, R) (the
        core M); the granularity decides."""
        return self.strategy.mix(self)

    def slot_skills(self) -> list[tuple[int, int]]:
        """(slot, skill index) of every slot a skill owns, in slot order (decodes slot_index)."""
        skills = len(self.skill_names)
        present = (self.slot_scale != 0).nonzero().flatten().tolist()
        owner = self.slot_index.tolist()
        return [(slot, owner[slot] % skills) for slot in present]


def slot_layout(blocks, num_skills: int, rank: int, rows: int):
    """Encode which coefficient weights each rank slot of one module (see CatState).

    blocks: (skill index, factors with .rank and .scaling) in slot order (plan.ModulePlan);
    rank: R of the concatenated adapter; rows: 1, or (granularity `rank`) a coefficient row
    per component, at least the largest skill rank. Returns slot_index (long (R,)),
    slot_scale (fp32 (R,)) and present (bool (rows, K)).
    """
    slot_index = torch.zeros(rank, dtype=torch.long)
    slot_scale = torch.zeros(rank, dtype=torch.float32)
    present = torch.zeros(rows, num_skills, dtype=torch.bool)
    offset = 0
    for skill_index, factors in blocks:
        for component in range(factors.rank):
            row = component if rows > 1 else 0
            slot_index[offset + component] = row * num_skills + skill_index
            present[row, skill_index] = True
        slot_scale[offset : offset + factors.rank] = factors.scaling
        offset += factors.rank
    return slot_index, slot_scale, present


def set_free_coefficients(state: CatState, weights: torch.Tensor):
    """c = weights (fp32, (K,), on the coefficients' device) in every row of the state's
    coefficients, its parametrization switched to `free` meanwhile (static mixes). Returns
    the callable that switches the parametrization back."""
    state.coefficients.copy_(weights.expand_as(state.coefficients))
    previous, state.parametrization = state.parametrization, Parametrization.FREE

    def restore():
        state.parametrization = previous

    return restore


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank, also when FSDP2 shards it as a DTensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def put_state(module: nn.Module, state: CatState) -> None:
    """Give `module` its CAT state (replacing any), as `module.cat_state[ADAPTER]`."""
    setattr(module, STATE, nn.ModuleDict({ADAPTER: state}))


def keep_frozen_on_set_adapter(module: nn.Module) -> None:
    """Make `module.set_adapter` (a PEFT LoRA layer's or ModulesToSaveWrapper's) freeze all but
    the coefficients again after PEFT's own.

    PEFT's set_adapter marks the active adapter's parameters trainable; it runs on
    set_adapter, enable_adapter_layers and on leaving `disable_adapter()` (as TRL does for
    reference logits). On a CAT model that would silently train every skill's lora_A / lora_B
    and saved module: only the coefficients stay trainable.
    """
    module.set_adapter = types.MethodType(_set_adapter_keeping_frozen, module)


def _set_adapter_keeping_frozen(module: nn.Module, *args, **kwargs) -> None:
    type(module).set_adapter(module, *args, **kwargs)
    for name, param in module.named_parameters():
        if not is_coefficient(name):
            param.requires_grad_(False)


def remove_state(module: nn.Module) -> None:
    """Drop the CAT state (apply_export: the model is a plain LoRA model afterwards)."""
    if hasattr(module, STATE):
        delattr(module, STATE)


def state_of(module: nn.Module) -> CatState:
    """The CatState of a CAT layer. Raises CatError for a module without one."""
    states = getattr(module, STATE, None)
    if states is None or ADAPTER not in states:
        raise CatError(f"{type(module).__name__} has no CAT state")
    return states[ADAPTER]


def _states(model: nn.Module):
    for module in model.modules():
        states = getattr(module, STATE, None)
        if isinstance(states, nn.ModuleDict) and ADAPTER in states:
            yield module, states[ADAPTER]


def cat_layers(model: nn.Module):
    """(module name in the base model, layer) for every wrapped LoRA layer, in model order.

    Layers that no skill touches have zero factors and a state without coefficients.
    """
    for module, state in _states(model):
        if not state.saved_module:
            yield state.module_name, module


def saved_module_wrappers(model: nn.Module):
    """(module name, PEFT ModulesToSaveWrapper) of every composed saved module."""
    for module, state in _states(model):
        if state.saved_module:
            yield state.module_name, module


def weighted_states(model: nn.Module):
    """Every CatState with coefficients, on wrapped layers and composed saved modules alike,
    in model order (the static mixes set each through its `strategy.set_static`)."""
    for _, state in _states(model):
        if state.weighted:
            yield state


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
    """Whether a (dotted) parameter name is a CAT coefficient, `<module>.cat_state.<adapter>.
    coefficients` (on a wrapped layer or a composed saved module alike)."""
    parts = parameter_name.split(".")
    return parts[-1] == COEFFICIENTS and STATE in parts[-3:-1]


def weighted(layer: nn.Module) -> bool:
    """Whether a wrapped layer carries coefficients (False where no skill touches it)."""
    states = getattr(layer, STATE, None)
    return states is not None and ADAPTER in states and states[ADAPTER].weighted


def coefficient_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable coefficients by name (one shared by several layers appears once)."""
    return {name: p for name, p in model.named_parameters() if is_coefficient(name)}
