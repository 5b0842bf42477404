"""Static merges of skill LoRAs through PEFT's add_weighted_adapter: the baselines for CAT.

The methods are a small registry (methods.py, like mergekit's): each names PEFT's
combination_type, its paper and what it needs. Before PEFT runs, we refuse what PEFT would
get silently wrong:

- the merged adapter's config is a copy of the first skill's with r, lora_alpha and
  target_modules replaced, so the first skill's use_rslora (scaling sqrt(r) instead of 1,
  huggingface/peft#3449) and layer restrictions (layers_to_transform, ...) would apply to the
  whole merge;
- `linear`, `ties` and `dare_*` stack the skills' factors, so every skill needs the same rank;
- some PEFT versions apply each skill's scaling twice in `svd` (huggingface/peft#3111); we
  detect that on a toy layer and divide the weights by the scaling, which is exact only when a
  skill has one scaling for all its modules.

DoRA, trained biases and the other non-LoRA computations are refused by the same reader that
CAT uses (skills.load_skills); skills with modules_to_save, which CAT composes but merge does
not, are refused here. PEFT's add_weighted_adapter refuses LoRA on MoE expert parameters
(target_parameters): with such skills, `concat` folds the CAT model itself with its
coefficients fixed to the weights (the same Σ_i w_i s_i B_i A_i), and the other methods are
refused.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch import nn

from ..config import CatConfig
from ..errors import CatError
from ..export.write import write_folder
from ..format import CONFIG_FILE, MERGE_RECORD_FILE, WEIGHTS_FILE
from ..skills.check import check_base_copies, refuse_skill_folder, warn_on_foreign_base
from ..skills.experts import expert_form
from ..skills.read import Skill, load_skills
from .methods import (
    SUM_OF_UPDATES,
    check_arguments,
    check_equal_ranks,
    check_first_skill_flags,
    method_named,
)
from .record import SUM_TOLERANCE, difference_from_sum, merge_record

LOG = logging.getLogger(__name__)


def merge_skills(
    base_model: nn.Module,
    skill_entries: list,
    weights: list[float],
    output_dir: str | os.PathLike,
    *,
    method: str,
    density: float | None = None,
    seed: int = 0,
) -> Path:
    """Merge the skill LoRAs with fixed weights and write one standard adapter to output_dir.

    skill_entries: as CatConfig.skills (paths, Hub ids, or {"path", "name", "revision"});
    weights: one per skill (floats, PEFT's add_weighted_adapter weights). Raises CatError for
    what PEFT would merge silently wrong (see the module docstring).
    seed: fixes dare's random drop, so a baseline can be rebuilt exactly.
    """
    chosen = method_named(method)
    specs = CatConfig(skills=skill_entries).skills  # names, duplicates: CAT's own rules
    refuse_skill_folder(output_dir, [{"path": s.path, "name": s.name} for s in specs], "--out")
    check_arguments(chosen, specs, weights, density)
    skills = load_skills(specs)
    for skill in skills:
        if skill.saved_modules:
            raise CatError(
                f"skill {skill.name!r} saved {sorted(skill.saved_modules)} in full "
                "(modules_to_save); merge composes LoRA factors only. Fit CAT, which composes "
                "saved modules with learned coefficients (attach_cat / adapter: cat_merge)"
            )
        check_base_copies(skill, base_model)  # PEFT's loading would write it over the base
    base_name = getattr(getattr(base_model, "config", None), "_name_or_path", None)
    warn_on_foreign_base(skills, base_name)  # the README promises it for merges too
    experts = {skill.name: form for skill in skills if (form := expert_form(skill, base_model))}
    if experts:
        return _merge_experts_with_cat(
            chosen, base_model, skills, skill_entries, weights, output_dir, experts
        )
    check_first_skill_flags(chosen, skills, base_model)
    if chosen.equal_ranks:
        check_equal_ranks(chosen, skills)
    weights = [float(w) for w in weights]
    peft_weights = weights
    if chosen.rebuilds_delta and _peft_scales_svd_merges_twice():
        peft_weights = _undo_double_scaling(skills, weights)

    # PEFT-side names of our own: a user's name could be "merged", or part of "lora_" (PEFT
    # then warns it may reinitialise the weights on load)
    names = [f"skill{index}" for index in range(len(skills))]
    merged = "merged"
    model = PeftModel.from_pretrained(base_model, str(skills[0].folder), adapter_name=names[0])
    for skill, name in zip(skills[1:], names[1:], strict=True):
        model.load_adapter(str(skill.folder), adapter_name=name)
    _check_every_target_has_a_skill(model, names)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.add_weighted_adapter(
                names,
                peft_weights,
                merged,
                combination_type=chosen.combination_type,
                density=density,
            )
    except ValueError as error:  # PEFT's own refusals (mixed target_modules types, ...)
        raise CatError(f"PEFT refused the {chosen.name} merge: {error}") from error
    difference, module = difference_from_sum(model, names, weights, merged)
    if chosen.name == "linear" and difference > SUM_TOLERANCE:
        LOG.warning(
            "merge --method linear: the result is not the weighted sum of the skills' updates "
            "%s (largest relative difference %.3g, on %s): PEFT's linear combines lora_A and "
            "lora_B separately, which adds cross terms B_i A_j between skills whose factors "
            "differ. Use --method concat for the sum of the updates",
            SUM_OF_UPDATES,
            difference,
            module,
        )
    record = merge_record(chosen, skills, weights, density, seed, difference, module)
    model.set_adapter(merged)
    for name in names:
        model.delete_adapter(name)
    written = _save_flat(
        Path(output_dir),
        lambda staging: model.save_pretrained(str(staging), selected_adapters=[merged]),
        merged,
        record,
    )
    LOG.info(
        "merged %d skills (%s) with %s, weights %s, into a rank-%d adapter in %s",
        len(skills),
        ", ".join(skill.name for skill in skills),
        chosen.name,
        weights,
        model.peft_config[merged].r,
        written,
    )
    return written


def _merge_experts_with_cat(
    method, base_model, skills, entries, weights, output_dir, experts
) -> Path:
    """`concat` for skills with LoRA on MoE expert parameters, which PEFT's add_weighted_adapter
    refuses: the CAT model with every coefficient fixed to the skill's weight (baselines'
    static_coefficients), folded into the standard adapter (target_parameters included)."""
    name, form = next(iter(experts.items()))
    if method.name != "concat":
        raise CatError(
            f"skill {name!r} has LoRA on MoE expert weights ({form}); --method {method.name} "
            "goes through PEFT's add_weighted_adapter, which refuses target_parameters. "
            "--method concat composes expert skills (Σ w_i s_i B_i A_i, folded by CAT), and so "
            "does fitting CAT (attach_cat / adapter: cat_merge)"
        )
    from ..attach import attach_cat
    from ..export.fold import fold
    from ..fit.baselines import static_coefficients

    model = attach_cat(base_model, CatConfig(skills=entries))
    with static_coefficients(model, [float(w) for w in weights]):
        folded = fold(model)

    def save(staging: Path) -> None:
        save_file(folded.tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        folded.config.save_pretrained(str(staging))

    record = merge_record(method, skills, weights, None, None, None, None)
    record["computes"] += " (folded by CAT: PEFT's add_weighted_adapter refuses expert LoRA)"
    written = _save_flat(Path(output_dir), save, record=record)
    LOG.info(
        "merged %d skills with concat (folded by CAT: PEFT's merge refuses expert parameters), "
        "weights %s, into a rank-%d adapter in %s",
        len(weights),
        weights,
        folded.rank,
        written,
    )
    return written


def _check_every_target_has_a_skill(model: PeftModel, names: list[str]) -> None:
    """PEFT puts the merged adapter on every module the union of the target_modules names (on
    the layers the first skill allows) and fails with "No matching LoRAs found" on one that no
    skill covers: typically a module only a layer-restricted skill targets, on another layer."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = [model.peft_config[name].target_modules for name in names]
    if all(isinstance(t, str) for t in targets):
        union = "|".join(f"({t})" for t in targets)
    elif not any(isinstance(t, str) for t in targets):
        union = set().union(*targets)
    else:
        return  # a mix of regexes and lists: PEFT refuses it itself, clearly
    merged = replace(model.peft_config[names[0]], target_modules=union)
    uncovered = [
        key
        for key, module in model.base_model.model.named_modules()
        if key
        and not hasattr(module, "lora_A")  # LoRA layers hold at least one skill
        and ".lora_" not in key
        and check_target_module_exists(merged, key)
    ]
    if uncovered:
        raise CatError(
            f"PEFT's add_weighted_adapter would put the merged adapter on {len(uncovered)} "
            f"module(s) no skill has factors on (e.g. {uncovered[0]}), and fails there: a skill "
            "limits itself to some layers (layers_to_transform) on a module type the others do "
            "not target. Leave that skill out, or fit CAT (attach_cat / adapter: cat_merge), "
            "which handles it"
        )


def _undo_double_scaling(skills: list[Skill], weights) -> list[float]:
    """Weights that make this PEFT's svd merge compute Σ w_i s_i B_i A_i, as documented."""
    corrected = []
    for skill, weight in zip(skills, weights, strict=True):
        scalings = sorted({round(m.scaling, 12) for m in skill.modules.values()})
        if len(scalings) > 1:
            raise CatError(
                f"this PEFT version's svd merge applies each skill's scaling twice "
                f"(huggingface/peft#3111), and skill {skill.name!r} has different scalings on "
                f"different modules ({scalings}, from rank_pattern/alpha_pattern), so it cannot "
                "be corrected: use --method concat"
            )
        corrected.append(float(weight) / scalings[0])
    return corrected


@functools.cache
def _peft_scales_svd_merges_twice() -> bool:
    """Whether this PEFT's svd merge multiplies a skill's scaling in twice (peft#3111).

    Tried on a toy layer: merging `first` with weight 1 and `second` with weight 0 must give
    back first's own ΔW.
    """

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4, bias=False)

    config = LoraConfig(r=1, lora_alpha=2, target_modules=["proj"], init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_peft_model(Toy(), config, adapter_name="first")
        model.add_adapter("second", config)
        model.add_weighted_adapter(["first", "second"], [1.0, 0.0], "merged", "svd")
    layer = model.base_model.model.proj
    expected, got = layer.get_delta_weight("first"), layer.get_delta_weight("merged")
    twice = not torch.allclose(got, expected, rtol=1e-4, atol=1e-6)
    if twice:
        LOG.info("this PEFT's svd merge scales skills twice (peft#3111); correcting the weights")
    return twice


def _save_flat(output_dir: Path, save, adapter: str = "default", record=None) -> Path:
    """Write a standard adapter directly in output_dir through the one folder writer
    (export.write_folder): `save(staging)` writes it into the staging folder; `record` (a
    dict), when given, becomes merge_record.json beside it.

    PEFT saves an adapter that is not `default` into staging/<adapter>/; we keep only its
    adapter_config.json and weights, moved up; the config comes last, so that the folder is
    loadable only once it is complete.
    """

    def stage(staging: Path) -> None:
        save(staging)
        saved = staging / adapter
        if (saved / CONFIG_FILE).exists():
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                if (saved / name).exists():
                    os.replace(saved / name, staging / name)
        if record is not None:
            (staging / MERGE_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")

    names = (WEIGHTS_FILE, MERGE_RECORD_FILE, CONFIG_FILE)
    return write_folder(output_dir, stage, names, prefix=".cat-merge-")
