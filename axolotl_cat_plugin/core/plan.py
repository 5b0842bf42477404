"""Which skills touch which base module, validated against the base (attach_cat's plan).

Every refusal here names the skill and the module: a target module the base lacks, factors
whose shapes do not fit it, a layer kind CAT cannot compose, per-expert MoE modules PEFT cannot
convert (experts.py), and saved base-matrix copies that differ from the base
(skill_checks.py). LoRA on MoE expert parameters is planned by experts.plan_parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .errors import CatError
from .experts import convert_per_expert_modules
from .skill_checks import check_base_copies
from .skills import Skill, SkillModule


@dataclass
class ModulePlan:
    """The skills' factors on one base module: blocks of (skill index, factors) in skill order."""

    name: str
    blocks: list[tuple[int, SkillModule]]  # (skill index, factors), in skill order

    @property
    def rank(self) -> int:
        """The concatenated rank of this module: the sum of its skills' ranks."""
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
        check_base_copies(skill, model)
        if skill.fan_in_fan_out != skills[0].fan_in_fan_out:
            raise CatError(
                f"skill {skill.name!r}: fan_in_fan_out={skill.fan_in_fan_out} differs from skill "
                f"{skills[0].name!r}; all skills must be trained on the same base"
            )
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
                    f"{tuple(factors.lora_A.shape)} and lora_B {tuple(factors.lora_B.shape)}, but "
                    f"the base module maps {d_in} -> {d_out} features; was the skill trained on "
                    "another base model?"
                )
            plans.setdefault(module_name, ModulePlan(module_name, [])).blocks.append(
                (index, factors)
            )
    position = {name: i for i, name in enumerate(base_modules)}
    return sorted(plans.values(), key=lambda plan: position[plan.name])


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
            if not any(name == target or name.endswith("." + target) for name in names):
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
