"""Checks on skills that decide whether CAT can compose them at all.

`check_config` reads only adapter_config.json (cheap enough for config validation);
`check_base_copies` compares what PEFT saved of the base with the base itself;
`warn_on_foreign_base` says when a skill names another base model; `refuse_skill_folder`
keeps every writer out of the skills' own folders.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import SkillSpec
from ..errors import CatError

if TYPE_CHECKING:
    from .read import Skill

LOG = logging.getLogger(__name__)

# init_lora_weights values that move the principal part of W into the factors (PEFT warns
# that such adapters must not be combined with others until converted to plain LoRA)
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")

# Every adapter_config.json key, classified by what it does to the update W + scaling * B A.
# The allow-list: keys that never change that update on the targeted layers, whatever their
# value (metadata, where the LoRA applies, its scaling, training-only settings, inits that
# leave the base alone: those that do not are refused through init_lora_weights).
ANY_VALUE_KEYS = frozenset(
    {
        "task_type",
        "peft_type",  # checked: LORA
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "r",  # checked: a positive number
        "lora_alpha",  # checked: a positive number
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",  # read by read.skill_scaling
        "lora_dropout",  # training only
        "fan_in_fan_out",  # decided by the layer type, as PEFT does (plan.fan_in_fan_out_for)
        "modules_to_save",  # composed (layers/saved_modules.py)
        "target_parameters",  # composed (layers/experts.py)
        "init_lora_weights",  # checked: no base-rewriting init
        "loftq_config",  # used only with init_lora_weights "loftq" (refused)
        "eva_config",  # EVA only chooses lora_A's start; the base stays as it is
        "corda_config",  # used only with init_lora_weights "corda" (refused)
        "lora_ga_config",  # used only with init_lora_weights "lora_ga" (refused)
        "qalora_group_size",  # used only with use_qalora (refused)
        "runtime_config",  # runtime only (ephemeral GPU offload)
        "megatron_core",  # the module path Megatron layers come from; see megatron_config
        "ensure_weight_tying",  # whether PEFT ties adapted copies of tied layers
        "bias",  # checked: "none" (trained biases are refused)
    }
)
# Keys that make the adapter compute something other than W + scaling * B A, or store other
# tensors: refused unless off (None, false, empty), with what each does instead.
VARIANT_KEYS = {
    "use_dora": "DoRA's magnitude vector does not compose linearly",
    "lora_bias": "a trained lora_B bias is not part of B A",
    "use_qalora": "QA-LoRA pools the input before lora_A",
    "alora_invocation_tokens": "activated LoRA applies only after the invocation tokens",
    "layer_replication": "it duplicates decoder layers",
    "trainable_token_indices": "it trains embedding rows next to the LoRA",
    "arrow_config": "Arrow routes between several LoRAs per token",
    "use_bdlora": "BD-LoRA stores block-diagonal lora_A or lora_B as stacked blocks, not the "
    "(r, d_in) and (d_out, r) factors",
    "velora_config": "VeLoRA replaces lora_A's backward pass (a LoRA variant in PEFT's terms)",
    "monteclora_config": "MonteCLoRA samples its factors (variational Monte Carlo)",
    "megatron_config": "its LoRA layers are Megatron's parallel layers",
    "kasa_config": "KaSA (PEFT 0.21) truncates the base weight's r smallest singular "
    "components and puts a learned diagonal between B and A",
}


def _is_off(value) -> bool:
    """None, false and empty containers/strings: a setting that is not in use."""
    return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def check_config(spec: SkillSpec, config: dict) -> None:
    """Refuse an adapter_config.json whose adapter is not a plain LoRA CAT can compose.

    An allow-list: every key must be known to leave the update W + scaling * B A unchanged
    (ANY_VALUE_KEYS), or be off (VARIANT_KEYS, and any key this release does not know).
    Reads nothing but the config. Raises CatError naming the skill, its path, the offending key
    with its value and what to use instead.
    """
    where = f"skill {spec.name!r} ({spec.path})"
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise CatError(
            f"{where}: peft_type is {peft_type!r}; CAT combines LoRA adapters only (peft_type LORA)"
        )
    if config.get("use_dora"):
        raise CatError(
            f"{where}: use_dora is true; DoRA's magnitude vector does not compose linearly, "
            "so CAT would silently change the skill. Use plain LoRA skills."
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        trained = [
            f"{key}={config.get(key)!r}"
            for key, untrained in (("bias", "none"), ("lora_bias", False))
            if config.get(key, untrained) not in (untrained, None)
        ]
        raise CatError(
            f"{where}: trained biases ({', '.join(trained)}) are not supported: CAT composes "
            "the LoRA factors only. Use a skill trained with bias: none and lora_bias: false"
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise CatError(
            f"{where}: init_lora_weights is {init!r}, which rewrites the base weights, so the "
            "skill's factors only hold on that modified base. Convert it to a plain LoRA first "
            "(PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...))."
        )
    for key, value in config.items():
        if key in ANY_VALUE_KEYS or _is_off(value):
            continue
        if key in VARIANT_KEYS:
            raise CatError(
                f"{where}: {key} is set ({_shown(value)}); {VARIANT_KEYS[key]}: that LoRA "
                "variant computes something other than W + scaling * B A, which CAT cannot "
                "combine. Use plain LoRA skills."
            )
        raise CatError(
            f"{where}: adapter_config.json sets {key} = {_shown(value)}, an option this release "
            "does not know to leave the LoRA update W + scaling * B A unchanged; CAT refuses it "
            "rather than compose the skill wrong. Use a plain LoRA skill (or remove the key if "
            "you know it changes nothing)"
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise CatError(f"{where}: {key} must be a positive number, got {value!r}")


def check_base_copies(skill: Skill, model) -> None:
    """Refuse a skill whose saved copy of a base matrix differs from the base's own weight.

    PEFT's save_pretrained writes the embedding and output layers' weights beside the factors
    when a LoRA targets them (save_embedding_layers="auto", peft/utils/save_and_load.py); PEFT's
    loading then writes that copy over the base. Equal to the base, the copy says nothing and is
    ignored. Different, the skill was trained on another matrix (a resized vocabulary, trained
    embeddings) that CAT's W + Σ c s B A would silently drop.

    model: the plain base model (tied weights are read through their module, so a tied lm_head
    is compared with the shared matrix). Raises CatError naming the skill, the key, both shapes
    and what to do. Weights ZeRO-3 partitioned or on the meta device are compared by shape only.
    """
    for module_name, copy in skill.base_copies.items():
        try:
            weight = model.get_submodule(module_name).weight
        except AttributeError:
            raise CatError(
                f"skill {skill.name!r}: its weights hold a copy of {module_name}.weight, but the "
                "base model has no such module; was the skill trained on another architecture?"
            ) from None
        shape = tuple(getattr(weight, "ds_shape", weight.shape))
        if tuple(copy.shape) != shape:
            rows = (
                f"; the skill's vocabulary has {copy.shape[0]} tokens and the base's {shape[0]}"
                if copy.dim() == 2 and len(shape) == 2 and copy.shape[1] == shape[1]
                else ""
            )
            raise CatError(
                f"skill {skill.name!r}: the copy of {module_name}.weight saved with it has shape "
                f"{tuple(copy.shape)}, the base's has {shape}{rows}. The skill was trained on a "
                "resized vocabulary: compose it on that base (the base with its embeddings "
                f"resized to {copy.shape[0]} rows and this matrix loaded, e.g. PEFT's "
                "merge_and_unload of the skill, saved), with skills trained on it"
            )
        if hasattr(weight, "ds_id") or weight.device.type == "meta":
            LOG.info("skill %r: %s.weight compared by shape only", skill.name, module_name)
            continue
        base = weight.detach()
        if torch.equal(copy.to(base.device, base.dtype), base) or torch.equal(
            copy.to(base.device), base.to(copy.dtype)
        ):
            continue
        difference = float((copy.to(base.device).float() - base.float()).abs().max())
        raise CatError(
            f"skill {skill.name!r}: the copy of {module_name}.weight saved with it differs from "
            f"the base's (max |difference| {difference:.3g}, shape {shape}): the skill was trained "
            "on another base, or with that matrix trained too, and PEFT would load the copy over "
            "the base. CAT composes LoRA factors on one base; use the base the skill was trained "
            "on, or a skill saved from this base"
        )


def warn_on_zero_update(spec: SkillSpec, modules, parameters, saved_modules) -> None:
    """Warn, naming the skill, when its LoRA update is exactly zero on every module: lora_A or
    lora_B all zero everywhere (an untrained adapter: PEFT initialises lora_B to zero, and
    saving before any step keeps it so, huggingface/peft#1402) and nothing saved in full."""
    pairs = [(f.lora_A, f.lora_B) for f in modules.values()]
    pairs += [(pair.get("A"), pair.get("B")) for pair in parameters.values()]
    if saved_modules or not pairs:
        return
    if all(A is None or B is None or not A.any() or not B.any() for A, B in pairs):
        LOG.warning(
            "skill %r: its LoRA factors are zero (lora_A or lora_B all zero on every one of its "
            "%d modules), so it changes nothing: an untrained adapter? (huggingface/peft#1402). "
            "Its coefficients cannot learn anything; check that this is the adapter you meant",
            spec.name,
            len(pairs),
        )


def warn_on_foreign_base(skills: list[Skill], base_name: str | None) -> None:
    """Log a warning for each skill whose base_model_name_or_path is not `base_name`.

    Only a warning: the same base is often saved under several names (a local copy, a Hub id);
    the shapes are checked separately.
    """
    for skill in skills:
        trained_on = skill.config.get("base_model_name_or_path")
        if base_name and trained_on and trained_on != base_name:
            LOG.warning(
                "skill %r was trained on %r, not on %r; its shapes fit, but check that it is the "
                "same base",
                skill.name,
                trained_on,
                base_name,
            )


def refuse_skill_folder(output_dir: str | os.PathLike, sources, what: str = "output_dir") -> None:
    """Refuse to write into a skill's own folder (it would overwrite the skill's adapter files).

    sources: the skills' paths as the config gives them (str, or dicts with `path` and maybe
    `name`); Hub ids and paths that do not exist are skipped. Raises CatError naming `what`,
    the folder and the skill.
    """
    target = Path(output_dir).expanduser().resolve()
    for entry in sources:
        path = entry.get("path") or entry.get("source") if isinstance(entry, dict) else entry
        if not isinstance(path, (str, os.PathLike)) or not Path(path).expanduser().is_dir():
            continue
        if Path(path).expanduser().resolve() == target:
            name = entry.get("name", path) if isinstance(entry, dict) else path
            raise CatError(
                f"{what} {output_dir} is the folder of skill {name!r}: writing there would "
                "overwrite the skill's own adapter. Choose another folder"
            )
