"""Which skills touch which base module, validated against the base (attach_cat's plan).

Every refusal here names the skill and the module: a target module the base lacks, factors
whose shapes do not fit it, a layer kind CAT cannot compose, per-expert MoE modules PEFT cannot
convert (experts.py), and saved base-matrix copies that differ from the base
(check.py). LoRA on MoE expert parameters (layers/experts.py) is planned by plan_parameters.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CatError
from ..format import peft_matches
from ..layers.experts import NESTED, per_expert
from .check import check_base_copies
from .experts import (
    ExpertFactors,
    convert_per_expert_modules,
    targeted_parameters,
    wrapped_parameter,
)
from .read import Skill, SkillModule

LOG = logging.getLogger(__name__)


@dataclass
class ModulePlan:
    """The skills' factors on one base module: blocks of (skill index, factors) in skill order."""

    name: str
    blocks: list[tuple[int, SkillModule]]  # (skill index, factors), in skill order

    @property
    def rank(self) -> int:
        """The concatenated rank of this module: the sum of its skills' ranks."""
        return sum(factors.rank for _, factors in self.blocks)


@dataclass
class ParameterPlan:
    """The skills' factors on one targeted parameter (`<module>.<parameter>`), in skill order."""

    name: str
    blocks: list[tuple[int, ExpertFactors]]

    @property
    def rank(self) -> int:
        """The concatenated rank per expert: the sum of the skills' ranks here."""
        return sum(factors.rank for _, factors in self.blocks)


def target_modules_for(names: list[str]) -> list[str]:
    """PEFT target_modules for these modules: their leaf names, which every server reads.

    A module the leaf names select but no skill touches (a skill limited to some layers)
    carries zero factors, so the adapter stays exactly the union of the skills.
    """
    return sorted({name.rsplit(".", 1)[-1] for name in names})


def plan_modules(model: nn.Module, skills: list[Skill]) -> list[ModulePlan]:
    """Which skills touch which base module, validated against the base's shapes."""
    base_modules = dict(model.named_modules())
    plans: dict[str, ModulePlan] = {}
    for index, skill in enumerate(skills):
        # the older per-expert MoE layout becomes target parameters, as PEFT loads it; before
        # the target check, which would name its modules as missing
        convert_per_expert_modules(skill, model)
        _check_target_modules(skill, base_modules)
        _warn_on_factors_outside_the_config(skill)
        check_base_copies(skill, model)
        _note_fan_in_fan_out(skill, base_modules)
        for module_name, factors in skill.modules.items():
            module = base_modules.get(module_name)
            if module is None:
                raise CatError(
                    f"skill {skill.name!r}: module {module_name} is not in the base model; "
                    "was the skill trained on another architecture?"
                )
            d_in, d_out = _in_out_features(module, skill, module_name)
            if factors.lora_A.shape[1] != d_in or factors.lora_B.shape[0] != d_out:
                raise CatError(
                    f"skill {skill.name!r}: module {module_name} has lora_A "
                    f"{tuple(factors.lora_A.shape)} and lora_B {tuple(factors.lora_B.shape)}, "
                    f"which do not fit the base module: it maps {d_in} -> {d_out} features, so a "
                    f"LoRA on it has lora_A (r, {d_in}) and lora_B ({d_out}, r)"
                    f"{other_base(skill, model)}"
                )
            plans.setdefault(module_name, ModulePlan(module_name, [])).blocks.append(
                (index, factors)
            )
    position = {name: i for i, name in enumerate(base_modules)}
    return sorted(plans.values(), key=lambda plan: position[plan.name])


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 style), whose weight is stored (d_in, d_out)."""
    return type(module).__name__ == "Conv1D"


def fan_in_fan_out_for(model: nn.Module, names: list[str]) -> bool:
    """PEFT's fan_in_fan_out for these wrapped modules, decided by the layer type as PEFT's
    own dispatch does (peft/tuners/lora/layer.py, dispatch_default: Conv1D -> True, Linear ->
    False, whatever the config says, with a warning): True when the modules are Conv1D.

    A skill's saved flag does not change its factors (lora_A is (r, d_in) and lora_B
    (d_out, r) either way; the flag only says how ΔW is laid onto the weight), so skills whose
    flags disagree compose exactly, and the export carries the flag its layers need.
    """
    return any(_is_conv1d(model.get_submodule(name)) for name in names)


def _note_fan_in_fan_out(skill: Skill, base_modules: dict[str, nn.Module]) -> None:
    """Log when a skill's saved fan_in_fan_out is wrong for its layers (older tools wrote the
    wrong flag); PEFT corrects it at load, and so does CAT (fan_in_fan_out_for)."""
    kinds = {_is_conv1d(base_modules[m]) for m in skill.modules if m in base_modules}
    if len(kinds) == 1 and kinds.pop() != skill.fan_in_fan_out:
        LOG.info(
            "skill %r: its adapter_config.json says fan_in_fan_out=%s, which is wrong for its "
            "layers; PEFT corrects it on load, and CAT decides it from the layer type too",
            skill.name,
            skill.fan_in_fan_out,
        )


def other_base(skill: Skill, model: nn.Module) -> str:
    """'; ... another base model?' when the skill's adapter_config.json names a base other than
    the model's own name, else '' (a shape that does not fit is then said to be just that)."""
    trained_on = skill.config.get("base_model_name_or_path")
    base = getattr(getattr(model, "config", None), "_name_or_path", None)
    if trained_on and base and trained_on != base:
        return f"; the skill names base model {trained_on!r}, not {base!r}: was it trained on it?"
    return ""


def _warn_on_factors_outside_the_config(skill: Skill) -> None:
    """Warn about factors on modules the skill's own config does not target (its
    target_modules, layers_to_transform / layers_pattern, exclude_modules, by PEFT's matching):
    PEFT ignores them when it loads the skill; CAT composes every factor in the file."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    keys = ("target_modules", "layers_to_transform", "layers_pattern", "exclude_modules")
    where = {key: skill.config.get(key) for key in keys}
    if not where["target_modules"] or where["target_modules"] == "all-linear":
        return  # PEFT resolves these against the model; nothing to compare names with
    try:
        probe = LoraConfig(**{key: value for key, value in where.items() if value is not None})
        outside = [m for m in skill.modules if not check_target_module_exists(probe, m)]
    except (TypeError, ValueError):
        return  # a combination PEFT itself refuses: its own loading says so
    if outside:
        LOG.warning(
            "skill %r: its weights hold factors on %d module(s) its adapter_config.json does "
            "not target (e.g. %s); PEFT ignores them when it loads the skill, CAT composes them",
            skill.name,
            len(outside),
            outside[0],
        )


def _check_target_modules(skill: Skill, base_modules: dict[str, nn.Module]) -> None:
    targets = skill.config.get("target_modules")
    names = [name for name in base_modules if name]
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as error:
            raise CatError(
                f"skill {skill.name!r}: target_modules {targets!r} from its adapter_config.json "
                f"is not a valid regular expression ({error})"
            ) from error
        if not any(pattern.fullmatch(name) for name in names):
            raise CatError(
                f"skill {skill.name!r}: target_modules regex {targets!r} matches no module of "
                "the base model"
            )
    elif isinstance(targets, list):
        for target in targets:
            if not any(peft_matches(name, [target]) for name in names):
                raise CatError(
                    f"skill {skill.name!r}: target module {target!r} from its adapter_config.json "
                    "is not in the base model"
                )


def _in_out_features(module: nn.Module, skill: Skill, module_name: str) -> tuple[int, int]:
    embedding = skill.modules[module_name].embedding
    if isinstance(module, nn.Embedding):
        if not embedding:
            raise CatError(
                f"skill {skill.name!r}: module {module_name} is an Embedding, but the skill has "
                "lora_A/lora_B factors on it, not PEFT's lora_embedding_A/B; was it trained on "
                "another architecture?"
            )
        return module.num_embeddings, module.embedding_dim
    if embedding:
        raise CatError(
            f"skill {skill.name!r}: module {module_name} is a {type(module).__name__}, but the "
            "skill has embedding factors (lora_embedding_A/B) on it; was it trained on another "
            "architecture?"
        )
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 style layer, weight (d_in, d_out)
        return module.weight.shape[0], module.weight.shape[1]
    raise CatError(
        f"skill {skill.name!r}: module {module_name} is a {type(module).__name__}; "
        "CAT composes LoRAs on Linear and Embedding layers only"
    )


# ---------------------------------------------------------------- MoE expert parameters


def plan_parameters(model: nn.Module, skills) -> list[ParameterPlan]:
    """Which skills put LoRA on which base parameter, validated against the base's shapes.

    Resolves each saved wrapper depth to its parameter by PEFT's nesting (module docstring).
    Raises CatError naming the skill, the saved module, the parameter and both shapes.
    """
    plans: dict[str, ParameterPlan] = {}
    order: dict[str, tuple[int, int]] = {}
    positions = {name: index for index, (name, _) in enumerate(model.named_modules())}
    for index, skill in enumerate(skills):
        targets = skill.config.get("target_parameters") or []
        for (module_name, depth), pair in sorted(skill.parameter_factors.items()):
            saved = module_name + NESTED * depth
            if module_name not in positions:
                raise CatError(
                    f"skill {skill.name!r}: it has LoRA factors on parameters of {saved} "
                    f"(target_parameters {targets!r}), but the base model has no module "
                    f"{module_name}; was it trained on another architecture?"
                )
            module = model.get_submodule(module_name)
            parameter = wrapped_parameter(skill, module, module_name, depth)
            if parameter is None:
                targeted = targeted_parameters(skill, module, module_name)
                raise CatError(
                    f"skill {skill.name!r}: it saved LoRA factors under {saved}, the ParamWrapper "
                    f"{depth} level(s) below the outermost, but its target_parameters "
                    f"{targets!r} select {len(targeted)} parameter(s) of {module_name} "
                    f"({targeted}); PEFT's own loading finds no wrapper for these factors "
                    "either. Use a skill saved by PEFT on this base"
                )
            name = f"{module_name}.{parameter}"
            factors = _expert_factors(skill, module, name, parameter, pair, model)
            plans.setdefault(name, ParameterPlan(name, [])).blocks.append((index, factors))
            own = [param_name for param_name, _ in module.named_parameters(recurse=False)]
            order[name] = (positions[module_name], own.index(parameter))
    return sorted(plans.values(), key=lambda plan: order[plan.name])


def _expert_factors(skill, module, name: str, parameter: str, pair, model):
    """One skill's factors on `name` per expert, checked against the parameter's shape."""
    if set(pair) != {"A", "B"}:
        missing = ({"A", "B"} - set(pair)).pop()
        raise CatError(f"skill {skill.name!r}: parameter {name} has no lora_{missing}")
    param = module.get_parameter(parameter)
    shape = tuple(getattr(param, "ds_shape", param.shape))
    if len(shape) not in (2, 3):
        raise CatError(
            f"skill {skill.name!r}: parameter {name} has shape {shape}; PEFT's ParamWrapper "
            "adapts 2-D and 3-D (experts) parameters only"
        )
    experts, d_out, d_in = _experts_out_in(module, shape)
    rank, scaling = skill.scaling(name)
    lora_A, lora_B = pair["A"], pair["B"]
    if lora_A.shape != (rank * experts, d_in) or lora_B.shape != (d_out, rank * experts):
        raise CatError(
            f"skill {skill.name!r}: parameter {name} {shape} takes lora_A "
            f"{(rank * experts, d_in)} and lora_B {(d_out, rank * experts)} at r={rank} for "
            f"{experts} expert(s), but the skill has {tuple(lora_A.shape)} and "
            f"{tuple(lora_B.shape)}, which do not fit{other_base(skill, model)}"
        )
    if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
        raise CatError(f"skill {skill.name!r}: the factors on parameter {name} hold NaN or Inf")
    stacked_A, stacked_B = per_expert(lora_A, lora_B, experts)
    return ExpertFactors(stacked_A, stacked_B, scaling)


def _experts_out_in(module, shape) -> tuple[int, int, int]:
    """(E, out, in) of a parameter as ParamWrapper._get_in_out_features / update_layer read it."""
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if getattr(module, "is_transposed", False):  # stored (E, in, out)
        return shape[0], shape[2], shape[1]
    return shape[0], shape[1], shape[2]


def target_parameters_for(plans: list[ParameterPlan]) -> list[str]:
    """PEFT target_parameters for these parameters: `<module leaf>.<parameter>`, which PEFT
    matches by suffix on every layer (untouched ones carry zero factors, as for modules)."""
    return sorted({".".join(plan.name.split(".")[-2:]) for plan in plans})
