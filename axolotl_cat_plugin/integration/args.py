"""The `cat_merge:` block of an Axolotl YAML, validated when Axolotl validates the config."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..core.config import CatConfig, read_renamed_adapters
from ..core.export.fold import check_export_options
from ..core.fit.graded import load_grader, read_prompts
from ..core.fit.self_mix import SelfMixOptions
from ..core.granularity import (
    DEFAULT_GRANULARITY,
    Parametrization,
    current_name,
    granularity_labels,
    granularity_named,
    granularity_names,
    parse_granularity,
)
from ..core.skills.check import refuse_skill_folder
from ..core.skills.read import preflight

LOG = logging.getLogger(__name__)
LORA_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")


class CatSkill(BaseModel):
    """One entry of `cat_merge.skills` written as a mapping (a plain string is a path)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="Local adapter folder or Hub repo id")
    name: str | None = Field(default=None, description="Default: the folder or repo name")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag, commit)")


_DEFAULT = SelfMixOptions()  # the core's defaults, the one home of them


class SelfMixBlock(BaseModel):
    """`cat_merge.self_mix`: write the fitting mix from the skills themselves
    (core/fit/self_mix.py)."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] | None = Field(
        default=None, description="Default: the shipped generic prompts (chat or plain)"
    )
    pool: int = Field(default=_DEFAULT.pool, ge=1, description="Samples drawn per skill")
    keep: int = Field(
        default=_DEFAULT.keep, ge=1, description="Kept per skill: highest KL(skill || base)"
    )
    max_new_tokens: int = Field(default=_DEFAULT.max_new_tokens, ge=1)
    temperature: float = Field(default=_DEFAULT.temperature, gt=0.0)
    top_p: float = Field(default=_DEFAULT.top_p, gt=0.0, le=1.0)
    seed: int = _DEFAULT.seed
    batch_size: int = Field(
        default=_DEFAULT.batch_size, ge=1, description="Prompts per generate call"
    )
    chat: bool | None = Field(default=None, description="Default: when the tokenizer has one")
    dir: str | None = Field(
        default=None, description="Where the JSONL goes; default output_dir/self_mix"
    )

    @model_validator(mode="after")
    def _usable(self):
        self.to_core().check()  # the core's rules (keep <= pool, ...)
        return self

    def to_core(self) -> SelfMixOptions:
        """The core's SelfMixOptions (dir stays here: where to write is the caller's)."""
        return SelfMixOptions(**self.model_dump(exclude={"dir"}))


class GraderBlock(BaseModel):
    """`cat_merge.grader`: score every static mix and the fitted CAT on the task itself, by the
    user's grader on greedy replies to the user's prompts (core/fit/graded.py)."""

    model_config = ConfigDict(extra="forbid")

    prompts: str = Field(min_length=1, description='JSONL, one {"prompt": ...} per row')
    function: str = Field(
        min_length=1, description="module:function or file.py:function, f(reply, row) -> 0..1"
    )
    max_new_tokens: int = Field(default=32, ge=1, description="Length of each greedy reply")
    batch_size: int = Field(default=8, ge=1, description="Prompts per generate call")

    @model_validator(mode="after")
    def _loads(self):
        # now, not after the fit: the file reads and the function imports
        read_prompts(self.prompts)
        load_grader(self.function)
        return self


# datasets placeholder a config with cat_merge.self_mix gets (Axolotl requires `datasets`);
# the plugin's load_datasets replaces it by the written mix
SELF_MIX_PLACEHOLDER = "cat_merge.self_mix"


class CatMergeConfig(BaseModel):
    """Which skill LoRAs to combine with CAT and how the coefficients are shaped."""

    # enum fields hold their plain names, as the YAML does (Axolotl dumps its config)
    model_config = ConfigDict(extra="forbid", use_enum_values=True)

    skills: list[str | CatSkill] = Field(
        min_length=1, description="The skill LoRAs, all trained on base_model"
    )
    granularity: str = Field(
        default=DEFAULT_GRANULARITY,
        description="; ".join(
            f"{g}: {granularity_named(g).description}" for g in granularity_names()
        ),
        # the choices as the registry holds them when the schema is asked for
        json_schema_extra=lambda schema: schema.update(enum=granularity_names()),
    )
    parametrization: Parametrization = Parametrization.FREE
    init: float = Field(default=1.0, description="Starting coefficient (free only)")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    learning_rate: float | None = Field(
        default=None, gt=0.0, description="Default: the config's learning_rate"
    )
    export_rank: int | None = Field(
        default=None, ge=1, description="Compress the export to this rank with an exact SVD"
    )
    prune_threshold: float | None = Field(
        default=None, ge=0.0, description="Drop a skill from a module where |coefficient| < this"
    )
    objective: Literal["lm", "distill"] = Field(
        default="lm",
        description="lm: the data's next-token loss; distill: per-token KL(teacher || CAT), "
        "each row's teacher the skill its `skill` column names (core/fit/distill.py)",
    )
    self_mix: SelfMixBlock | None = Field(
        default=None, description="Write the mix from the skills themselves (no skill data)"
    )
    grader: GraderBlock | None = Field(
        default=None,
        description="Compare the fit with the static mixes on your task: your grader scores "
        "greedy replies to your prompts (beside the eval loss)",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_adapters(cls, data):
        # `adapters` (before 0.2) reads as `skills`: the core's rule
        return read_renamed_adapters(data) if isinstance(data, dict) else data

    @field_validator("granularity", mode="before")
    @classmethod
    def _renamed_granularity(cls, value):
        # the core's own lookup: `adapter` (before 0.2) reads as `model` with a deprecation
        # warning, a wrong name is refused naming the choices
        return parse_granularity(value)

    @model_validator(mode="after")
    def _skills_are_usable(self):
        # the core's own rules, once, by the core's CatConfig (names, duplicates, init,
        # dropout, granularity and parametrization), then the adapter configs, before any
        # compute (a CatError is a ValueError: pydantic reports it naming the key)
        for skill in self.to_core().skills:
            preflight(skill)
        # the export's own rule, now rather than after the fit (the rank bound: at load)
        check_export_options(self.granularity, None, self.export_rank, self.prune_threshold)
        return self

    def to_core(self) -> CatConfig:
        """The core's CatConfig for this block (the Axolotl-only keys stay here)."""
        skills = [
            entry if isinstance(entry, str) else entry.model_dump(exclude_none=True)
            for entry in self.skills
        ]
        return CatConfig(
            skills=skills,
            granularity=self.granularity,
            parametrization=self.parametrization,
            init=self.init,
            dropout=self.dropout,
        )


@dataclass
class CatTrainingArgsMixin:
    """CAT's settings on Axolotl's training arguments, as Axolotl's own plugins carry theirs
    (`integrations/kd`): the plugin names this mixin (get_training_args_mixin) and fills it
    from the validated block (get_training_args); CatTrainer reads `self.args`."""

    cat_learning_rate: float | None = field(
        default=None,
        metadata={"help": "learning rate of the CAT coefficients (cat_merge.learning_rate)"},
    )
    cat_objective: str = field(
        default="lm", metadata={"help": "cat_merge.objective: lm or distill"}
    )


class CatMergeArgs(BaseModel):
    """Mixed into Axolotl's config class by `CatMergePlugin.get_input_args`."""

    cat_merge: CatMergeConfig | None = None
    # `axolotl inference` sets this key; a key no model declares is dropped after validation
    inference: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_cat_merge_usage(cls, data):
        if not isinstance(data, dict):
            return data
        adapter = data.get("adapter")
        block = data.get("cat_merge")
        if adapter == "cat_merge" and not block:
            raise ValueError(
                "adapter: cat_merge needs a `cat_merge:` block listing the skill LoRAs "
                "(cat_merge.skills)"
            )
        if block and adapter != "cat_merge":
            raise ValueError(
                f"a `cat_merge:` block is set but adapter is {adapter!r}; set adapter: cat_merge "
                "or remove the block"
            )
        if isinstance(block, dict) and data.get("output_dir"):  # before any training
            skills = block.get("skills", block.get("adapters"))
            refuse_skill_folder(data["output_dir"], skills if isinstance(skills, list) else [])
        if adapter != "cat_merge":
            return data
        data = _self_mix_usage(data, block if isinstance(block, dict) else {})
        if data.get("load_in_4bit") or data.get("load_in_8bit"):
            # axolotl/loaders/model.py (0.19 and 0.21) builds a BitsAndBytesConfig only for
            # adapter qlora (4-bit) or lora (8-bit): with cat_merge the flag would be ignored
            raise ValueError(
                "adapter: cat_merge cannot take a quantized base from load_in_4bit/load_in_8bit: "
                "Axolotl quantizes the base only for adapter qlora or lora, so the flag would be "
                "silently ignored (a full-precision base). CAT itself fits on a bitsandbytes "
                "4-bit/8-bit base: use the Python API (attach_cat on a model loaded with "
                "transformers' BitsAndBytesConfig, e.g. "
                "scripts/examples/fit_cat_trl.py --load-in-4bit), or remove the flag."
            )
        if data.get("gptq"):
            raise ValueError(
                "adapter: cat_merge does not support a GPTQ-quantized base: PEFT's GPTQ LoRA "
                "layer is not tested with CAT's forward. Load the base in bf16/fp16, or use "
                "the Python API on a bitsandbytes 4-bit/8-bit base."
            )
        named = current_name((block or {}).get("granularity"))
        if data.get("fsdp_config") and granularity_labels(named).shared_across_layers:
            usable = [
                g for g in granularity_names() if not granularity_named(g).shared_across_layers
            ]
            raise ValueError(
                f"cat_merge.granularity: {block['granularity']} shares one coefficient across "
                "every decoder layer, which FSDP cannot shard per layer; use one of "
                f"{', '.join(usable)} with FSDP"
            )
        kernels_on = [key for key in LORA_KERNELS if data.get(key)]
        if kernels_on:
            LOG.warning(
                "cat_merge: turning off %s; the fused LoRA kernels bypass the CAT forward",
                ", ".join(kernels_on),
            )
        return {**data, **{key: False for key in LORA_KERNELS}}


def _self_mix_usage(data: dict, block: dict) -> dict:
    """self_mix writes the datasets (a placeholder entry until then); distill needs each row
    whole (no sample packing) and its teacher column kept by the Trainer."""
    if block.get("self_mix") is not None:
        datasets = data.get("datasets") or []
        placeholder = [{"path": SELF_MIX_PLACEHOLDER, "type": "completion"}]
        if any(not isinstance(d, dict) or d.get("path") != SELF_MIX_PLACEHOLDER for d in datasets):
            raise ValueError(
                "cat_merge.self_mix writes the fitting mix itself; remove `datasets` (or remove "
                "self_mix to fit on your datasets)"
            )
        data = {**data, "datasets": placeholder}
    if block.get("objective") == "distill":
        if data.get("sample_packing"):
            raise ValueError(
                "cat_merge.objective: distill needs each row's own teacher; set "
                "sample_packing: false"
            )
        if data.get("fsdp_config") or _zero3(data.get("deepspeed")):
            raise ValueError(
                "cat_merge.objective: distill sets the coefficients in place for the teacher, "
                "which needs them whole; FSDP and DeepSpeed ZeRO-3 shard them. Use DDP or "
                "ZeRO-1/2, or objective: lm"
            )
        data = {**data, "remove_unused_columns": False}  # keep the teacher column
    return data


def _zero3(deepspeed) -> bool:
    """Whether a `deepspeed:` value (a JSON path or a dict) sets ZeRO stage 3."""
    if isinstance(deepspeed, str):
        try:
            with open(deepspeed, encoding="utf-8") as handle:
                deepspeed = json.load(handle)
        except (OSError, ValueError):
            return "zero3" in deepspeed
    return (
        isinstance(deepspeed, dict) and (deepspeed.get("zero_optimization") or {}).get("stage") == 3
    )
