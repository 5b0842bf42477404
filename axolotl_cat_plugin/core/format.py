"""The export format, torch-free: file names, tensor keys, and the cat_coefficients.json record.

An export folder is a standard PEFT LoRA adapter (CONFIG_FILE + WEIGHTS_FILE, PEFT's key
names, scaling 1) plus our record (COEFFICIENTS_FILE), a model card (CARD_FILE) and a
heatmap (PLOT_FILE). The record has one typed home, `CatRecord`: the fold builds it, the
writer writes its `to_json()`, and it is read in one place, `read_record` (`CatRecord.from_dict`
checks that it is one, naming the missing key and the file, and that its `format_version` is
one this package reads); `axolotl-cat inspect`, re-export, resuming from a record and the
card all go through it. Nothing here imports torch, so the viewer starts in well under a
second.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
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


# the record's keys this package names (the rest, e.g. `training`, `baselines`,
# `fit_finished`, are CatRecord.extra), and the two every record holds
_REQUIRED = {"skills": (list, "a list"), "modules": (dict, "an object")}
_FIELDS = (
    "granularity",
    "parametrization",
    "base_model",
    "concatenated_rank",
    "exported_rank",
    "export_rank",
    "prune_threshold",
)


@dataclass
class CatRecord:
    """cat_coefficients.json: what a CAT export was fitted from and what it learned.

    skills: one dict per skill, in the config's order (name, source, revision, rank,
        lora_alpha, use_rslora, weights_sha256, ...; skills/read.py Skill.record).
    modules: per wrapped module, its entry: `coefficients` ({skill: c}, c a float, or a list
        of floats per rank-1 component for granularity `rank`), `rank`, and what the
        granularity and the export add (`pruned`, `svd_relative_error`, `core`, ...).
    granularity, parametrization: their names; base_model: the base's name or path;
    concatenated_rank: R of the CAT model; exported_rank: r of the export; export_rank /
        prune_threshold: the export options (None when not given). All None when an older
        record lacks them.
    saved_modules: per module saved in full (modules_to_save), {"coefficients": {skill: c}};
        empty (and not written) when there are none.
    extra: every other key, in order (the Axolotl plugin's `fit_finished`, `training`,
        `baselines`; CatMetadata.extra); format_version: the schema version (FORMAT_VERSION
        when written; as read, 1 when absent).

    The JSON object (`to_dict`) lists format_version, skills, the named fields, extra,
    modules and saved_modules, in that order. Torch-free.
    """

    skills: list[dict]
    modules: dict[str, dict]
    granularity: str | None = None
    parametrization: str | None = None
    base_model: str | None = None
    concatenated_rank: int | None = None
    exported_rank: int | None = None
    export_rank: int | None = None
    prune_threshold: float | None = None
    saved_modules: dict[str, dict] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def fit_finished(self) -> bool | None:
        """Whether the fit that wrote this record finished: its `fit_finished` (True from an
        Axolotl run's end, False from a save during the fit: a checkpoint, an interrupted
        run's save); a record without it that holds `training` was written at a run's end
        (before the mark existed); None when the record does not say (an export_cat call of
        the Python API)."""
        if "fit_finished" in self.extra:
            return bool(self.extra["fit_finished"])
        return True if "training" in self.extra else None

    @property
    def training(self) -> dict | None:
        """The Axolotl run's `training` entry (datasets, steps, learning_rate, ...), or None
        (an export_cat call, or not a dict)."""
        training = self.extra.get("training")
        return training if isinstance(training, dict) else None

    @property
    def baselines(self) -> dict | None:
        """The plugin's comparison with static mixes (`baselines`: methods, metric, ...), or
        None when the run measured none."""
        baselines = self.extra.get("baselines")
        return baselines if isinstance(baselines, dict) else None

    def to_dict(self) -> dict:
        """The record as its JSON object (the order in the class docstring)."""
        record = {"format_version": self.format_version, "skills": self.skills}
        record |= {name: getattr(self, name) for name in _FIELDS}
        record |= {key: value for key, value in self.extra.items() if key not in record}
        record["modules"] = self.modules
        if self.saved_modules:
            record["saved_modules"] = self.saved_modules
        return record

    def to_json(self) -> str:
        """The text of cat_coefficients.json: to_dict() indented by 2, ending in a newline."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, record, path: str | os.PathLike) -> CatRecord:
        """A record read from `path` (named in errors), checked: a JSON object with `skills`
        (list) and `modules` (object) whose `format_version` (1 when absent) is at most
        FORMAT_VERSION. An older record is returned in today's terms: a granularity under its
        old name (`adapter`) as `model`, a version-1 skill's `alpha` as `lora_alpha`.

        Raises CatError naming the file and the missing or malformed key, or the version.
        """
        if not isinstance(record, dict):
            raise CatError(f"{path} is not a CAT coefficient record (not a JSON object)")
        for key, (kind, described) in _REQUIRED.items():
            if key not in record:
                raise CatError(f"{path} is not a CAT coefficient record: it has no `{key}`")
            if not isinstance(record[key], kind):
                raise CatError(
                    f"{path} is not a CAT coefficient record: its `{key}` is not {described} "
                    f"(a {type(record[key]).__name__})"
                )
        version = record.get("format_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CatError(f"{path}: format_version {version!r} is not a version number")
        if version > FORMAT_VERSION:
            raise CatError(
                f"{path} has format_version {version}, newer than the {FORMAT_VERSION} this "
                "axolotl-cat-plugin reads; upgrade axolotl-cat-plugin"
            )
        skills = record["skills"]
        if version == 1:  # a skill's lora_alpha was `alpha`
            for skill in skills:
                if isinstance(skill, dict) and "alpha" in skill:
                    skill.setdefault("lora_alpha", skill.pop("alpha"))
        named = {"format_version", "skills", "modules", "saved_modules", *_FIELDS}
        typed = cls(
            skills=skills,
            modules=record["modules"],
            saved_modules=record.get("saved_modules") or {},
            extra={key: value for key, value in record.items() if key not in named},
            format_version=version,
            **{name: record.get(name) for name in _FIELDS},
        )
        typed.granularity = current_name(typed.granularity)  # a record from before a rename
        return typed


def read_record(folder: str | os.PathLike) -> CatRecord:
    """The cat_coefficients.json of an export folder (read_record_file). Raises CatError
    naming the file when the folder has none."""
    path = Path(folder) / COEFFICIENTS_FILE
    if not path.is_file():
        raise CatError(f"{path} does not exist: {folder} is not a CAT export")
    return read_record_file(path)


def read_record_file(path: str | os.PathLike) -> CatRecord:
    """A cat_coefficients.json, checked and in today's terms (CatRecord.from_dict).

    Raises CatError naming the file for unreadable JSON, a missing key or a newer version.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CatError(f"{path} is not readable JSON ({error})") from error
    return CatRecord.from_dict(record, path)
