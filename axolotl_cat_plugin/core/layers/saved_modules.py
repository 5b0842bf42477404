"""Skills with `modules_to_save`: full modules trained next to the LoRA, composed with CAT.

A chat skill that added tokens typically trains `embed_tokens` and `lm_head` in full: PEFT
saves each such module's parameters as `base_model.model.<module>.<param>` (the copy in its
ModulesToSaveWrapper, peft/utils/other.py) and, on load, wraps the module again and loads them
into that copy. Skill i's update of a saved module is M_i - M_base, so CAT learns one
coefficient per skill per saved module (fp32, in the wrapper's CatState, free or softmax like
the LoRA coefficients) and computes

    M = M_base + Σ_i c_i (M_i - M_base)

on the copy PEFT's own ModulesToSaveWrapper holds (a torch parametrization of its parameters;
the base module, and a tied embedding, are untouched, as in PEFT). The export carries M in
`modules_to_save`, which PEFT loads; vLLM does not load `modules_to_save`.

Saved modules whose shapes differ from the base's (a resized vocabulary) are refused, naming
both shapes. One coefficient per skill per saved module whatever the granularity.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import CatError
from ..format import PEFT_PREFIX
from ..starting import starting_saved_coefficients
from ..state import (
    ADAPTER,
    CatState,
    keep_frozen_on_set_adapter,
    put_state,
    remove_state,
    saved_module_wrappers,
    set_free_coefficients,
    state_of,
)


def saved_module_names(skills) -> list[str]:
    """The base-model names of every module some skill saved in full, in first-seen order."""
    names: list[str] = []
    for skill in skills:
        for name in skill.saved_modules:
            if name not in names:
                names.append(name)
    return names


class SavedModuleMix(nn.Module):
    """The parametrization M_base -> M_base + Σ_i c_i D_i of one parameter of a saved module.

    deltas: (K, *shape) fp32 buffer, D_i = M_i - M_base (zero for a skill that did not save
    it); c (fp32, (K,)) comes from the wrapper's CatState, shared by the module's parameters
    (weight and bias). The state is held outside this module's children, so the coefficients
    are registered once, on the wrapper.
    """

    def __init__(self, deltas: torch.Tensor, state: CatState):
        super().__init__()
        self.register_buffer("deltas", deltas, persistent=False)
        self._state = [state]  # a list: not a submodule (see the docstring)

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        """M_base + Σ_i c_i D_i, in M_base's dtype and shape (the mix itself in fp32)."""
        c = self._state[0].effective().flatten()
        mixed = torch.tensordot(c, self.deltas.float(), dims=1)
        return base + mixed.to(base.dtype)


class SavedModuleKind:
    """Modules saved in full (`modules_to_save`) composed by CAT: M = M_base + Σ_i c_i D_i on
    PEFT's ModulesToSaveWrapper copy (the module docstring). A whole-module kind (variants.py
    MODULE_KINDS): its verbs take the skills, the PeftModel or the model, not one layer."""

    # the states it installs compose whole modules, not rank slots (CatState.saved_module)
    whole_module = True

    def modules_to_save(self, skills) -> list[str]:
        """The names get_peft_model must wrap (the LoraConfig's modules_to_save), in order."""
        return saved_module_names(skills)

    def check(self, skills, model: nn.Module) -> None:
        """Refuse saved modules the base lacks, of other shapes, or that another skill
        LoRA-targets. Raises CatError naming the skill, the module, both shapes and the fix.
        """
        lora_targets = {name: skill.name for skill in skills for name in skill.modules}
        for skill in skills:
            for name, params in skill.saved_modules.items():
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    raise CatError(
                        f"skill {skill.name!r}: it saved module {name} in full (modules_to_save), "
                        "but the base model has no such module; was it trained on another "
                        "architecture?"
                    ) from None
                if name in lora_targets:
                    raise CatError(
                        f"skill {skill.name!r} saved {name} in full (modules_to_save) and skill "
                        f"{lora_targets[name]!r} has LoRA factors on it; PEFT cannot hold both "
                        "on one module. Compose them in two steps, or use skills that agree"
                    )
                own = dict(module.named_parameters(recurse=False))
                for param_name, tensor in params.items():
                    base = own.get(param_name)
                    if base is None:
                        raise CatError(
                            f"skill {skill.name!r}: saved module {name} holds {param_name!r}, "
                            f"which the base's {type(module).__name__} does not have"
                        )
                    if tuple(tensor.shape) != tuple(base.shape):
                        rows = (
                            f" (a vocabulary of {tensor.shape[0]} tokens, the base has "
                            f"{base.shape[0]})"
                            if tensor.dim() == 2 and tensor.shape[1:] == base.shape[1:]
                            else ""
                        )
                        raise CatError(
                            f"skill {skill.name!r}: its saved {name}.{param_name} has shape "
                            f"{tuple(tensor.shape)}, the base's {tuple(base.shape)}{rows}. CAT "
                            "composes saved modules of the base's shapes: compose on the base the "
                            "skill was trained on (with its resized vocabulary), with skills "
                            "trained on it"
                        )

    def install(self, peft_model, skills, config) -> None:
        """Put the CAT mix on the copies PEFT's ModulesToSaveWrapper made of every saved
        module: a CatState per wrapper (fp32 coefficients (1, K), this kind its `strategy`)
        and a SavedModuleMix parametrization per parameter. attach_cat passes
        `modules_to_save(skills)` to get_peft_model first."""
        names = saved_module_names(skills)
        starting = starting_saved_coefficients(config, names)
        parametrization = config.parametrization  # a Parametrization (CatConfig parses it)
        model = peft_model.base_model.model
        for name in names:
            wrapper = model.get_submodule(name)
            copy = wrapper.modules_to_save[ADAPTER]
            present = torch.tensor([[name in skill.saved_modules for skill in skills]])
            alpha = torch.full(present.shape, parametrization.initial(config.init))
            for index, skill in enumerate(skills):
                if skill.name in starting.get(name, {}):
                    value = torch.tensor(float(starting[name][skill.name]))
                    alpha[0, index] = parametrization.inverse(value)
            device = next(copy.parameters()).device
            state = CatState(
                name,
                tuple(skill.name for skill in skills),
                parametrization,
                coefficients=nn.Parameter(alpha.to(device)),
                present=present.to(device),
                strategy=self,  # the static mixes ask it (set_static), as a granularity's
            )
            put_state(wrapper, state)
            for param_name, param in list(copy.named_parameters(recurse=False)):
                deltas = torch.zeros((len(skills), *param.shape), dtype=torch.float32)
                for index, skill in enumerate(skills):
                    saved = skill.saved_modules.get(name, {}).get(param_name)
                    if saved is not None:
                        deltas[index] = saved.float() - param.detach().float().cpu()
                parametrize.register_parametrization(
                    copy, param_name, SavedModuleMix(deltas.to(device), state)
                )
            keep_frozen_on_set_adapter(wrapper)

    def set_static(self, state: CatState, weights: torch.Tensor):
        """c = weights (fp32 (K,)): M = M_base + Σ_i weights[i] D_i (static mixes; the
        parametrization `free` meanwhile). Returns the callable that switches it back."""
        return set_free_coefficients(state, weights)

    def fold(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
        """The export's tensors of the composed saved modules (PEFT's keys, fp32), the
        record's `saved_modules` entries ({module: {"coefficients": {skill: c}}}), and the
        module names for the adapter config's modules_to_save (PEFT matches them by suffix).
        Raises CatError naming the module for a non-finite composed parameter."""
        tensors, record, names = {}, {}, []
        with torch.no_grad():
            for name, wrapper in saved_module_wrappers(model):
                copy = wrapper.modules_to_save[ADAPTER]
                for param_name in list(copy.parametrizations):
                    value = getattr(copy, param_name).detach().float().cpu().contiguous()
                    if not torch.isfinite(value).all():
                        raise CatError(
                            f"saved module {name}: the composed {param_name} is not finite"
                        )
                    tensors[f"{PEFT_PREFIX}{name}.{param_name}"] = value
                state = state_of(wrapper)
                c = state.effective().flatten().tolist()
                present = state.present.flatten().tolist()
                record[name] = {
                    "coefficients": {
                        skill: value
                        for skill, value, here in zip(state.skill_names, c, present, strict=True)
                        if here
                    }
                }
                names.append(name)
        return tensors, record, names

    def teardown(self, model: nn.Module) -> None:
        """Leave each saved module's copy holding M as a plain frozen parameter, no CAT state
        (apply_export)."""
        for _, wrapper in list(saved_module_wrappers(model)):
            copy = wrapper.modules_to_save[ADAPTER]
            for param_name in list(copy.parametrizations):
                parametrize.remove_parametrizations(copy, param_name, leave_parametrized=True)
            for param in copy.parameters():
                param.requires_grad_(False)
            remove_state(wrapper)
