"""Skills with LoRA on MoE expert weights: reading both forms PEFT loads, and planning them.

The forms and the math are described in experts.py (the CAT layer on PEFT's ParamWrapper).
Here: taking a skill's ParamWrapper factors out of its tensors, converting the older
per-expert Linear form with PEFT's own conversion (peft/utils/transformers_weight_conversion.py),
resolving which parameter each saved wrapper level means on this base, and the messages for
what cannot be composed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CatError
from ..format import factor_of_key, peft_key, peft_matches
from ..layers.experts import NESTED
from ..state import ADAPTER

LOG = logging.getLogger(__name__)

_PER_EXPERT_MODULE = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<leaf>[^.]+)$")

WHAT_WORKS = (
    "What works: compose the skills that adapt attention and dense layers with CAT, and apply "
    "the expert skill at full strength by merging it into the base first (PEFT "
    "merge_and_unload, saved as the new base), or use a version of the skill trained without "
    "expert targets"
)


@dataclass
class ExpertFactors:
    """One skill's LoRA on one targeted parameter, per expert: ΔP_e = scaling · B_e A_e.

    lora_A: (E, r, in); lora_B: (E, out, r); E = 1 for a 2-D parameter. The skill's dtype.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        """r, the skill's rank on this parameter (per expert)."""
        return self.lora_A.shape[-2]


# ---------------------------------------------------------------- reading skills


def take_parameter_factors(config: dict, tensors: dict[str, torch.Tensor], everything=False):
    """Take the ParamWrapper factors out of a skill's `tensors`, by (module, nesting depth).

    A factor is a ParamWrapper's when its key nests (`.base_layer.lora_A`) or its module is
    not one target_modules selects (PEFT wraps those as Linear or Embedding layers; anything
    else it wrapped is a target parameter's). everything=True takes every factor (keys PEFT's
    conversion of the per-expert form produced). Which parameter a depth means needs the base:
    `plan_parameters` resolves it. Returns {(module, depth): {"A": tensor, "B": tensor}}.
    """
    factors: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for key in list(tensors):
        found = factor_of_key(key)
        if found is None or found[2]:  # no factor, or an embedding's
            continue
        module, which, _ = found
        depth = 0
        while module.endswith(NESTED):
            module, depth = module.removesuffix(NESTED), depth + 1
        if not (everything or depth or not _selected_as_module(config, module)):
            continue
        factors.setdefault((module, depth), {})[which] = tensors.pop(key)
    return factors


def _selected_as_module(config: dict, module: str) -> bool:
    """Whether the skill's target_modules select `module` (PEFT's matching: a list by name or
    name suffix, a string as a full regex; `all-linear` by the target parameters' modules)."""
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        owners = [t.rpartition(".")[0] for t in config.get("target_parameters") or []]
        return not peft_matches(module, owners)
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return peft_matches(module, targets)


def _targets(name: str, target_parameters) -> bool:
    """PEFT's match of `<module>.<parameter>` against target_parameters (name or suffix)."""
    return peft_matches(name, target_parameters)


def convert_per_expert_modules(skill, model: nn.Module) -> None:
    """Turn a skill's per-expert Linear modules the base lacks into target-parameter factors,
    exactly as PEFT does when it loads such a skill (in place: skill.modules, skill.config,
    skill.parameter_factors).

    PEFT's own functions do it (peft/utils/transformers_weight_conversion.py):
    convert_peft_config_for_transformers retargets the config (w1/w3 -> gate_up_proj with
    r and lora_alpha doubled by rank_pattern / alpha_pattern, w2 -> down_proj, the router
    gate -> gate.weight), convert_peft_adapter_state_dict_for_transformers the factors.
    Raises CatError naming the skill, a module and the form where PEFT cannot convert it;
    returns untouched when the skill has no per-expert module the base lacks.
    """
    names = dict(model.named_modules())
    missing = sorted(name for name in skill.modules if name not in names)
    legacy = [match for name in missing if (match := _PER_EXPERT_MODULE.match(name))]
    if not legacy:
        return  # a module the base lacks for another reason: plan_modules names it
    where = (
        f"skill {skill.name!r}: module {legacy[0].string} is expert {legacy[0]['index']}'s "
        f"{legacy[0]['leaf']} in the per-expert MoE layout an older PEFT/transformers saved"
    )
    config = _converted_config(skill, model, where)
    tensors = {}
    for name in missing:
        factors = skill.modules[name]
        tensors[peft_key(name, "A")] = factors.lora_A
        tensors[peft_key(name, "B")] = factors.lora_B
    from peft.utils.transformers_weight_conversion import (
        convert_peft_adapter_state_dict_for_transformers,
    )

    try:
        converted = convert_peft_adapter_state_dict_for_transformers(
            model, config, tensors, adapter_name=ADAPTER
        )
    except (ValueError, RuntimeError, KeyError) as error:
        raise CatError(
            f"{where}; PEFT cannot convert its factors ({error}). {WHAT_WORKS}."
        ) from error
    unconverted = converted.keys() & tensors.keys()  # no conversion applies: plan_modules names it
    for name in missing:
        if peft_key(name, "A") not in unconverted:
            del skill.modules[name]
    for key in unconverted:
        del converted[key]
    skill.config = {
        **skill.config,
        "target_modules": sorted(config.target_modules),
        "target_parameters": sorted(config.target_parameters),
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
    }
    for key, pair in take_parameter_factors(skill.config, converted, everything=True).items():
        module_name, depth = key
        if module_name in names and wrapped_parameter(skill, names[module_name], *key) is None:
            targeted = targeted_parameters(skill, names[module_name], module_name)
            raise CatError(
                f"{where}; PEFT's conversion puts its factors on {module_name} under "
                f"{module_name + NESTED * depth}, a nested ParamWrapper, but the converted "
                f"skill targets only {targeted} there, "
                "so PEFT's own loading drops them (it warns of missing adapter keys). "
                f"{WHAT_WORKS}."
            )
        skill.parameter_factors.setdefault(key, {}).update(pair)
    LOG.info(
        "skill %r: converted its per-expert MoE modules to LoRA on %s, as PEFT loads it",
        skill.name,
        skill.config["target_parameters"],
    )


def _converted_config(skill, model, where: str):
    """The skill's LoraConfig after PEFT's conversion for this base (a new object)."""
    fused = [
        f"{name}.{param_name}"
        for name, module in model.named_modules()
        if name.endswith(".experts")
        for param_name, param in module.named_parameters(recurse=False)
        if param.dim() == 3
    ]
    try:
        from peft import PeftConfig
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError as error:  # transformers < 5 or a PEFT without the conversion
        raise CatError(
            f"{where}; this PEFT/transformers has no conversion of that layout ({error}). "
            f"{WHAT_WORKS}."
        ) from error
    config = PeftConfig.from_peft_type(**skill.config)
    try:
        convert_peft_config_for_transformers(
            config, model=model, conversions=get_model_conversion_mapping(model)
        )
    except ValueError as error:  # e.g. w1 targeted without w3, which are fused together
        raise CatError(
            f"{where}; PEFT cannot convert it to this base's fused experts ({error}). {WHAT_WORKS}."
        ) from error
    if not config.target_parameters:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        here = (
            f"this base fuses each layer's experts into 3-D parameters (e.g. {fused[0]}), but "
            f"PEFT has no conversion of the per-expert layout for model type {model_type!r}"
            if fused
            else "this base has no such module"
        )
        raise CatError(f"{where}; {here}. {WHAT_WORKS}.")
    return config


def targeted_parameters(skill, module: nn.Module, module_name: str) -> list[str]:
    """The parameters of `module` the skill's target_parameters select, in the module's order:
    the order PEFT wraps them in (tuners_utils.BaseTuner._inject_parameters)."""
    targets = skill.config.get("target_parameters") or []
    return [
        name
        for name, _ in module.named_parameters(recurse=False)
        if _targets(f"{module_name}.{name}", targets)
    ]


def wrapped_parameter(skill, module: nn.Module, module_name: str, depth: int) -> str | None:
    """The parameter whose ParamWrapper lies `depth` levels below the outermost one on
    `module` (the first targeted is innermost), or None where the skill has no such wrapper."""
    targeted = targeted_parameters(skill, module, module_name)
    return targeted[len(targeted) - 1 - depth] if depth < len(targeted) else None


def expert_form(skill, model: nn.Module) -> str | None:
    """What LoRA on MoE expert weights a skill has, in words (None: none), for merges."""
    names = dict(model.named_modules())
    legacy = [n for n in skill.modules if _PER_EXPERT_MODULE.match(n) and n not in names]
    if legacy:
        return f"per-expert MoE modules (e.g. {legacy[0]}), which PEFT loads as target_parameters"
    if skill.parameter_factors or skill.config.get("target_parameters"):
        return f"target_parameters {skill.config.get('target_parameters')!r}"
    return None
