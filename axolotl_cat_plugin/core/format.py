"""The export format, torch-free: file names, tensor keys, and the cat_coefficients.json record.

An export folder is a standard PEFT LoRA adapter (CONFIG_FILE + WEIGHTS_FILE, PEFT's key
names, scaling 1) plus our record (COEFFICIENTS_FILE), a model card (CARD_FILE) and a
heatmap (PLOT_FILE). The record is read in one place, `read_record`, which checks that it is
one and that its `format_version` is one this package reads; `axolotl-cat inspect`, re-export,
resuming from a record and the card all go through it. Nothing here imports torch, so the
viewer starts in well under a second.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import CatError
from .granularity.base import current_name

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BIN_WEIGHTS_FILE = "adapter_model.bin"  # older PEFT skills; read, never written
COEFFICIENTS_FILE = "cat_coefficients.json"
# beside a static merge (`axolotl-cat merge`): the method, what it computes, the weights, the
# skills, and how far the result is from the weighted sum of the skills' updates
MERGE_RECORD_FILE = "merge_record.json"
CARD_FILE = "README.md"
PLOT_FILE = "cat_coefficients.png"
STAGING_PREFIX = ".cat-export-"
# in a trainer checkpoint, beside the folded adapter: the raw coefficients resume restores,
# by parameter name; checkpoints written before 0.2 hold them as LEGACY_..., named `*.cat_alpha`
CHECKPOINT_COEFFICIENTS_FILE = "cat_coefficients.safetensors"
LEGACY_CHECKPOINT_COEFFICIENTS_FILE = "cat_alpha.safetensors"
LEGACY_COEFFICIENT_SUFFIX = ".cat_alpha"
# where an earlier export (and its run's checkpoints) is moved before a new run writes: the
# first generation in previous_export/, later ones in previous_export.2/, .3/, ... (never
# overwritten; the highest number is the most recent)
PREVIOUS_EXPORT = "previous_export"
# the order an export is moved in: adapter_config.json last, since it makes a folder loadable
EXPORT_FILES = (WEIGHTS_FILE, COEFFICIENTS_FILE, CARD_FILE, PLOT_FILE, CONFIG_FILE)
# cat_coefficients.json's schema version: readers refuse records from a newer writer.
# 2: a skill's lora_alpha is recorded as `lora_alpha` (PEFT's name), no longer as `alpha`.
FORMAT_VERSION = 2


def peft_matches(name: str, targets) -> bool:
    """PEFT's name-or-suffix rule for a list of targets (target_modules given as a list,
    target_parameters, modules_to_save): `name` equals a target or ends with `.<target>`
    (peft.tuners.tuners_utils.check_target_module_exists; peft.utils.other._set_trainable).
    targets: an iterable of strings (empty targets never match); None matches nothing."""
    return any(
        target and (name == target or name.endswith(f".{target}")) for target in targets or []
    )


# the prefix of every tensor name in a PEFT adapter file (PeftModel -> LoraModel -> the base)
PEFT_PREFIX = "base_model.model."


def peft_key(module_name: str, factor: str, embedding: bool = False) -> str:
    """The tensor name PEFT saves for a factor ('A' or 'B') of a module, e.g.
    peft_key("model.layers.0.self_attn.q_proj", "A") ->
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"; of an Embedding layer
    (embedding=True) a parameter with no `.weight`: "base_model.model.<module>.lora_embedding_A"."""
    if embedding:
        return f"{PEFT_PREFIX}{module_name}.lora_embedding_{factor}"
    return f"{PEFT_PREFIX}{module_name}.lora_{factor}.weight"


# PEFT saves `base_model.model.<module>.lora_A.weight`; some tools keep the adapter name.
_FACTOR_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$"
)
# an embedding LoRA's factors are parameters: `<module>.lora_embedding_A` (r, num_embeddings)
# and `<module>.lora_embedding_B` (embedding_dim, r), maybe with the adapter name after them
_EMBEDDING_FACTOR_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_(?P<which>[AB])(?:\.[^.]+)?$"
)
# PEFT's copy of a base matrix: `<module>.base_layer.weight` of a LoRA-wrapped embedding or
# output layer, or `<module>.weight` of an unwrapped one, written by save_pretrained's default
# save_embedding_layers="auto" (peft/utils/save_and_load.py, get_peft_model_state_dict)
_BASE_COPY_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)(?:\.base_layer)?\.weight$")


def factor_of_key(key: str) -> tuple[str, str, bool] | None:
    """The inverse of peft_key: (module name, 'A' or 'B', embedding?) of a LoRA factor's tensor
    name, also without the `base_model.model.` prefix or with an adapter name after the factor
    (as some tools save); None for anything that is no factor."""
    match = _FACTOR_KEY.match(key)
    if match:
        return match["module"], match["which"], False
    match = _EMBEDDING_FACTOR_KEY.match(key)
    if match:
        return match["module"], match["which"], True
    return None


def base_copy_module(key: str) -> str | None:
    """The module whose base weight a tensor name copies (`<module>.base_layer.weight` or
    `<module>.weight`, PEFT's save of embedding layers), or None (a factor, anything else).
    Whether a bare `<module>.weight` is such a copy depends on the other keys (skills/read.py)."""
    match = _BASE_COPY_KEY.match(key)
    if not match or any(part.startswith("lora_") for part in key.split(".")):
        return None
    return match["module"]


def read_record(folder: str | os.PathLike) -> dict:
    """The cat_coefficients.json of an export folder (read_record_file)."""
    path = Path(folder) / COEFFICIENTS_FILE
    if not path.is_file():
        raise CatError(f"{path} does not exist: {folder} is not a CAT export")
    return read_record_file(path)


def read_record_file(path: str | os.PathLike) -> dict:
    """A cat_coefficients.json, checked: a JSON object with `skills` (list) and `modules`
    (object) whose `format_version` (1 when absent) is at most FORMAT_VERSION. An older
    record is returned in today's terms: a granularity under its old name (`adapter`) as
    `model`, a version-1 skill's `alpha` as `lora_alpha`.

    Raises CatError naming the file for unreadable JSON, a missing part or a newer version.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CatError(f"{path} is not readable JSON ({error})") from error
    if not (
        isinstance(record, dict)
        and isinstance(record.get("skills"), list)
        and isinstance(record.get("modules"), dict)
    ):
        raise CatError(f"{path} is not a CAT coefficient record (no skills and modules)")
    version = record.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CatError(f"{path}: format_version {version!r} is not a version number")
    if version > FORMAT_VERSION:
        raise CatError(
            f"{path} has format_version {version}, newer than the {FORMAT_VERSION} this "
            "axolotl-cat-plugin reads; upgrade axolotl-cat-plugin"
        )
    if "granularity" in record:  # a record written before a granularity was renamed
        record["granularity"] = current_name(record["granularity"])
    if version == 1:  # a skill's lora_alpha was `alpha`
        for skill in record["skills"]:
            if isinstance(skill, dict) and "alpha" in skill:
                skill.setdefault("lora_alpha", skill.pop("alpha"))
    return record


def fit_finished(record: dict) -> bool | None:
    """Whether the fit that wrote this record finished: the record's `fit_finished` (True from
    an Axolotl run's end, False from a save during the fit: a checkpoint, an interrupted run's
    save); a record without it that holds `training` was written at a run's end (before the
    mark existed); None when the record does not say (an export_cat call of the Python API)."""
    if "fit_finished" in record:
        return bool(record["fit_finished"])
    return True if "training" in record else None
