"""Fold learned coefficients into plain LoRA factors, optionally pruned or SVD-compressed.

Folding is exact: B diag(w) A = B (diag(w) A), so the exported lora_A is the
concatenated A with every row scaled by its slot weight w, lora_B is unchanged and the
export's scaling is 1 (lora_alpha = r). Nothing here modifies the model. A layer on MoE expert
parameters (layers/experts.py) folds the same way per expert: its factors are handled stacked,
(E, r, in) and (E, out, r), and written in PEFT's ParamWrapper layout.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass

import torch
from peft import LoraConfig
from tqdm.auto import tqdm

from ..errors import CatError
from ..format import CatRecord
from ..granularity.base import granularity_named
from ..layers.variants import MODULE_KINDS, kind_of
from ..state import (
    ADAPTER,
    cat_layers,
    cat_metadata,
    full_tensor,  # noqa: F401  (its home was here: trainer, ranks and workers import it)
    is_coefficient,
    state_of,
    weighted,
)
from .compress import compress, init_idle_slots, pad_rows

_FACTOR_NAMES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


@dataclass
class FoldedAdapter:
    """A standard PEFT LoRA adapter (config + tensors) and its cat_coefficients.json record."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    record: CatRecord

    @property
    def rank(self) -> int:
        """r of the exported adapter (every module padded to it; lora_alpha = r, scaling 1)."""
        return self.config.r


def scaling_one_config(
    rank: int,
    *,
    target_modules,
    target_parameters,
    fan_in_fan_out: bool,
    modules_to_save,
    **options,
) -> LoraConfig:
    """The one LoraConfig this package builds: rank `rank`, lora_alpha = r (scaling 1), no
    rsLoRA, DoRA or per-module patterns, bias none, causal LM. The CAT model (attach_cat,
    with options such as lora_dropout and init_lora_weights=False) and every export (with
    base_model_name_or_path) are such adapters, so the skills' scalings live in the factors
    and the coefficients, never in the config."""
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=target_modules,
        target_parameters=target_parameters,
        fan_in_fan_out=fan_in_fan_out,
        use_rslora=False,
        use_dora=False,
        rank_pattern={},
        alpha_pattern={},
        bias="none",
        task_type="CAUSAL_LM",
        modules_to_save=modules_to_save,
        **options,
    )


def fold(model, rank: int | None = None, prune_threshold: float | None = None) -> FoldedAdapter:
    """The standard LoRA adapter the model's coefficients describe.

    Collective under FSDP2 and DeepSpeed ZeRO-3 (it gathers sharded factors): every rank must
    call it.
    """
    with gathered(model):
        return _fold(model, rank, prune_threshold)


def check_export_options(
    granularity,
    concatenated_rank,
    rank=None,
    prune_threshold=None,
    names: tuple[str, str] = ("export_rank", "prune_threshold"),
):
    """The export options' one rule, used by fold and, before any training, by the Axolotl
    integration and re-export: rank a whole number in [1, concatenated_rank] (no upper bound
    when concatenated_rank is None, i.e. not known yet), prune_threshold finite >= 0 and not
    with granularity core. names: what the caller calls the two options (the YAML's keys by
    default; the CLI's flags for `axolotl-cat export`). Returns rank as an int (or None);
    raises CatError naming the option. granularity: its name (the strategy says whether
    pruning applies)."""
    rank_name, threshold_name = names
    if rank is not None:
        if (
            not isinstance(rank, numbers.Integral)
            or isinstance(rank, bool)
            or rank < 1
            or (concatenated_rank is not None and rank > concatenated_rank)
        ):
            raise CatError(
                f"{rank_name}: must be a whole number between 1 and the concatenated rank "
                f"{concatenated_rank or 'of the skills'}, got {rank!r}"
            )
        rank = int(rank)
    if prune_threshold is not None and (
        not isinstance(prune_threshold, (int, float))
        or isinstance(prune_threshold, bool)
        or not 0 <= prune_threshold < math.inf
    ):
        raise CatError(f"{threshold_name}: must be a finite number >= 0, got {prune_threshold!r}")
    refusal = granularity_named(granularity).prune_refusal
    if prune_threshold is not None and refusal is not None:
        raise CatError(
            f"{threshold_name}: granularity {granularity} {refusal}; use {rank_name} to shrink "
            "the export"
        )
    return rank


def _fold(model, rank, prune_threshold) -> FoldedAdapter:
    metadata = cat_metadata(model)
    layers = list(cat_layers(model))
    concatenated_rank = layers[0][1].r[ADAPTER]
    kinds = {name: kind_of(layer) for name, layer in layers}
    paths = {id(module): path for path, module in model.named_modules()}
    path_of = {name: paths[id(layer)] for name, layer in layers}
    rank = check_export_options(metadata.granularity, concatenated_rank, rank, prune_threshold)

    factors, modules = {}, {}
    for name, layer in tqdm(layers, desc="Folding CAT coefficients", disable=len(layers) < 64):
        lora_A, lora_B, modules[name] = _fold_layer(layer, prune_threshold)
        factors[name] = (lora_A, lora_B)
    if not any(lora_A.shape[-2] for lora_A, _ in factors.values()):
        raise CatError(
            f"the prune threshold (prune_threshold, --prune-threshold) {prune_threshold} "
            "removes every skill from every module"
        )
    if rank is not None:
        for name, (lora_A, lora_B) in factors.items():
            lora_A, lora_B, modules[name]["svd_relative_error"] = compress(lora_A, lora_B, rank)
            factors[name] = (lora_A, lora_B)

    exported_rank = rank or max(lora_A.shape[-2] for lora_A, _ in factors.values())
    tensors = {}
    for name, (lora_A, lora_B) in factors.items():
        missing = exported_rank - lora_A.shape[-2]
        lora_A, lora_B = pad_rows(lora_A, missing), pad_rows(lora_B.mT, missing).mT
        kind = kinds[name]
        lora_A, lora_B = init_idle_slots(name, lora_A, lora_B, embedding=kind.embedding)
        # in PEFT's saved layout and keys (stacked experts -> (r·E, in), (out, r·E))
        (key_A, key_B), (lora_A, lora_B) = kind.saved(name, path_of[name], lora_A, lora_B)
        tensors[key_A], tensors[key_B] = lora_A.contiguous(), lora_B.contiguous()

    saved_record, saved_names = {}, []  # whole modules composed beside the LoRA layers
    for kind in MODULE_KINDS:
        kind_tensors, kind_record, kind_names = kind.fold(model)
        tensors.update(kind_tensors)
        saved_record.update(kind_record)
        saved_names += kind_names
    config = scaling_one_config(
        exported_rank,
        target_modules=metadata.target_modules,
        target_parameters=metadata.target_parameters,
        fan_in_fan_out=metadata.fan_in_fan_out,
        modules_to_save=saved_names or None,
        base_model_name_or_path=metadata.base_model,
    )
    record = CatRecord(
        skills=metadata.skills,
        modules=modules,
        granularity=metadata.granularity,
        parametrization=metadata.parametrization,
        base_model=metadata.base_model,
        concatenated_rank=concatenated_rank,
        exported_rank=exported_rank,
        export_rank=rank,
        prune_threshold=prune_threshold,
        saved_modules=saved_record,
        extra=dict(metadata.extra),
    )
    return FoldedAdapter(config, tensors, record)


def skill_coefficients(model) -> dict[str, list[float]]:
    """Every effective coefficient of each skill across the model (for logs and model cards)."""
    values: dict[str, list[float]] = {}
    with torch.no_grad(), gathered(model):
        for _, layer in cat_layers(model):
            if not weighted(layer):
                continue
            state = state_of(layer)
            for skill, numbers in state.strategy.skill_values(state).items():
                values.setdefault(skill, []).extend(numbers)
    return values


def _fold_layer(layer, prune_threshold):
    """Folded factors of one layer and its record: coefficients per skill, what was pruned."""
    if not weighted(layer):  # wrapped, but no skill touches it
        kind = kind_of(layer)
        lora_A, lora_B = kind.stacked(layer, *kind.factors(layer))
        # torch.zeros, not new_zeros: under FSDP2 the factors are DTensors, and new_zeros
        # would make these DTensors too, which safetensors cannot save
        shape_A, shape_B = (*lora_A.shape[:-2], 0, lora_A.shape[-1]), (*lora_B.shape[:-1], 0)
        empty_A = torch.zeros(shape_A, dtype=torch.float32, device=lora_A.device)
        empty_B = torch.zeros(shape_B, dtype=torch.float32, device=lora_B.device)
        return empty_A, empty_B, {"coefficients": {}, "rank": 0}
    state = state_of(layer)
    return state.strategy.fold_layer(layer, state, prune_threshold)


def gathered(model):
    """Under DeepSpeed ZeRO-3, the CAT layers' factors and coefficients whole, for reading.

    ZeRO-3 leaves each rank an empty partition outside forward; GatheredParameters
    all-gathers them (collective: every rank must enter) and frees them on exit, so whatever
    outlives the block must be a copy. Without ZeRO-3 it does nothing, and deepspeed is
    imported only when a parameter is already partitioned (it carries `ds_id`).
    """
    params = [
        param
        for _, layer in cat_layers(model)
        for name, param in layer.named_parameters()
        if is_coefficient(name) or any(f".{factor}." in f".{name}." for factor in _FACTOR_NAMES)
    ]
    if not any(hasattr(param, "ds_id") for param in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
