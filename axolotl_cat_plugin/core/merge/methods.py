"""The static merge methods `axolotl-cat merge` offers, one small record each behind a registry
(as mergekit's merge methods): PEFT's add_weighted_adapter `combination_type`, the paper, and
what the method needs of the skills, and the checks of those needs that run before PEFT
(check_*: what PEFT would otherwise merge silently wrong, see run.py). run.py runs them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import CatError

if TYPE_CHECKING:
    from ..skills.read import Skill

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeMethod:
    """One static merge: PEFT's add_weighted_adapter `combination_type` and what it needs."""

    name: str
    combination_type: str  # PEFT's name for it
    paper: str  # where the method comes from
    computes: str  # what the merged adapter's update is, in terms of the skills' factors
    equal_ranks: bool = False  # combines the factors themselves: one rank for every skill
    density: bool = False  # prunes (ties) or drops (dare) a fraction of the entries
    rebuilds_delta: bool = False  # SVD of the combined ΔW: the rank can change


_TASK_ARITHMETIC = "Task arithmetic, Ilharco et al., arXiv 2212.04089"
_TIES = "TIES-Merging, Yadav et al., arXiv 2306.01708"
_DARE = "DARE, Yu et al., arXiv 2311.03099"

# what PEFT's add_weighted_adapter computes (peft/tuners/lora/model.py, 0.20), with
# v_i = w_i s_i (weight times the skill's scaling) and ΔW_i = s_i B_i A_i
_ON_FACTORS = (
    "applied to lora_A and lora_B separately (each skill's A weighted by ±sqrt|v_i|, its B by "
    "sqrt|v_i|), so the update carries cross terms B_i A_j and is not Σ w_i ΔW_i"
)
SUM_OF_UPDATES = "Σ_i w_i s_i B_i A_i"
METHODS = {
    method.name: method
    for method in (
        MergeMethod(
            "linear",
            "linear",
            _TASK_ARITHMETIC,
            "the factors combined: lora_A = Σ_i ±sqrt|v_i| A_i, lora_B = Σ_i sqrt|v_i| B_i, so "
            "ΔW = Σ_i Σ_j sqrt|v_i v_j| B_i A_j (sign on A): the weighted sum of the updates "
            f"{SUM_OF_UPDATES} only where the cross terms B_i A_j (i ≠ j) vanish, e.g. one skill "
            "per module; use concat for the sum",
            equal_ranks=True,
        ),
        # the skills' factors side by side with fixed weights: the static sum Σ w_i s_i B_i A_i
        # (CAT learns these weights, per module)
        MergeMethod(
            "concat",
            "cat",
            _TASK_ARITHMETIC,
            f"the skills' factors side by side: ΔW = {SUM_OF_UPDATES} exactly (rank Σ r_i)",
        ),
        MergeMethod(
            "ties",
            "ties",
            _TIES,
            f"TIES (trim to density, elect signs, disjoint mean) {_ON_FACTORS}",
            equal_ranks=True,
            density=True,
        ),
        MergeMethod(
            "dare_linear",
            "dare_linear",
            _DARE,
            f"DARE (drop entries at 1 - density, rescale), then linear, {_ON_FACTORS}",
            equal_ranks=True,
            density=True,
        ),
        MergeMethod(
            "dare_ties",
            "dare_ties",
            f"{_DARE}; {_TIES}",
            f"DARE, then TIES, {_ON_FACTORS}",
            equal_ranks=True,
            density=True,
        ),
        MergeMethod(
            "svd",
            "svd",
            _TASK_ARITHMETIC,
            f"ΔW = {SUM_OF_UPDATES} formed in full, then its truncated SVD at the largest skill "
            "rank: the best approximation of the sum at that rank",
            rebuilds_delta=True,
        ),
    )
}
# names that still work, with a deprecation warning: `cat` (PEFT's combination_type) read as
# the learned CAT of this package
RENAMED_METHODS = {"cat": "concat"}


def method_named(name: str) -> MergeMethod:
    """The registered method called `name`; a deprecated name (RENAMED_METHODS) logs a warning
    and gives its successor. Raises CatError listing the methods for an unknown name."""
    if name in RENAMED_METHODS:
        LOG.warning(
            "merge method %r is deprecated and will be removed in a future release: it is "
            "PEFT's fixed-weight concatenation, not the learned CAT; use %r",
            name,
            RENAMED_METHODS[name],
        )
        name = RENAMED_METHODS[name]
    if name not in METHODS:
        raise CatError(f"unknown merge method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


# flags the merged adapter copies from the first skill that decide where it applies
_WHERE_FLAGS = ("layers_to_transform", "layers_pattern", "exclude_modules")


def check_arguments(method: MergeMethod, specs, weights, density) -> None:
    """One weight per skill; a density in (0, 1] for ties/dare and none for the others.
    Raises CatError naming the argument."""
    if len(weights) != len(specs):
        raise CatError(f"{len(specs)} skills but {len(weights)} weights; give one weight per skill")
    if not all(math.isfinite(weight) for weight in weights):
        raise CatError(f"--weights must be finite numbers, got {list(weights)}")
    if method.density:
        if density is None or not 0.0 < density <= 1.0:
            raise CatError(
                f"--method {method.name} needs a density in (0, 1] (the fraction of each "
                f"skill's entries kept), got {density!r}"
            )
    elif density is not None:
        raise CatError(
            f"--density applies to ties and dare only; --method {method.name} does not use it"
        )


def check_first_skill_flags(method: MergeMethod, skills: list[Skill], base_model) -> None:
    """PEFT copies the first skill's config into the merge: refuse a first skill whose rsLoRA
    (huggingface/peft#3449) or layer restriction would then apply to every skill, with advice
    that leads to a merge that works (another order) or to fitting CAT. Raises CatError."""
    first = skills[0]
    if first.config.get("use_rslora"):
        plain = [s.name for s in skills if not s.config.get("use_rslora")]
        hint = (
            f"list a skill without rsLoRA first (e.g. {plain[0]!r})"
            if plain
            else "every skill uses rsLoRA: fit CAT instead (its export has scaling 1)"
        )
        raise CatError(
            f"skill {first.name!r} uses rsLoRA and is listed first: PEFT's {method.name} merge "
            "copies the first skill's use_rslora into the merged adapter, which would then be "
            f"scaled by sqrt(r) instead of 1 (huggingface/peft#3449); {hint}"
        )
    for flag in _WHERE_FLAGS:
        value = first.config.get(flag)
        if value and any(skill.config.get(flag) != value for skill in skills[1:]):
            raise CatError(
                f"skill {first.name!r} is listed first and sets {flag}={value!r}: PEFT's merged "
                "adapter copies it, so the other skills would silently lose every module outside "
                f"it; {_reorder_advice(skills, base_model)}"
            )


def _reorder_advice(skills: list[Skill], base_model) -> str:
    """What to do about a restricted first skill: a skill to list first, where that merge then
    covers every module it targets (see _check_every_target_has_a_skill), or CAT."""
    cat = "fit CAT instead (attach_cat / adapter: cat_merge), which handles restricted skills"
    free = [s for s in skills if not any(s.config.get(flag) for flag in _WHERE_FLAGS)]
    if not free:
        return f"no skill is free of {', '.join(_WHERE_FLAGS)} to list first: {cat}"
    uncovered = _uncovered_by_an_unrestricted_merge(skills, base_model)
    if uncovered:
        return (
            f"listing an unrestricted skill first ({free[0].name!r}) would not help: the merged "
            f"adapter would then cover {uncovered[0]}, which no skill has factors on (only a "
            f"restricted skill targets that module type); {cat}"
        )
    return f"list a skill without that restriction first (e.g. {free[0].name!r})"


def _uncovered_by_an_unrestricted_merge(skills: list[Skill], base_model) -> list[str]:
    """Base modules a merge whose first skill has no layer restriction would target (the union
    of the target_modules, on every layer) but no skill has factors on."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = [skill.config.get("target_modules") for skill in skills]
    if all(isinstance(t, str) for t in targets):
        union = "|".join(f"({t})" for t in targets)
    elif not any(isinstance(t, str) for t in targets):
        union = set().union(*(t or [] for t in targets))
    else:
        return []  # a mix of regexes and lists: PEFT refuses it itself, clearly
    covered = {name for skill in skills for name in skill.modules}
    probe = LoraConfig(target_modules=union)
    return [
        name
        for name, _ in base_model.named_modules()
        if name and name not in covered and check_target_module_exists(probe, name)
    ]


def check_equal_ranks(method: MergeMethod, skills: list[Skill]) -> None:
    """linear/ties/dare combine the factors entry by entry: every skill needs one and the same
    rank on every module. Raises CatError naming each skill's ranks."""
    ranks = {skill.name: sorted({m.rank for m in skill.modules.values()}) for skill in skills}
    if len({rank for values in ranks.values() for rank in values}) > 1:
        described = ", ".join(
            f"{name} r={'/'.join(str(r) for r in values)}" for name, values in ranks.items()
        )
        raise CatError(
            f"--method {method.name} combines the skills' factors entry by entry, so every skill "
            f"needs the same rank on every module; got {described}: use --method concat or svd"
        )
