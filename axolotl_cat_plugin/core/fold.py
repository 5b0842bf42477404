"""Fold learned coefficients into plain LoRA factors, optionally pruned or SVD-compressed.

Folding is exact: B diag(w) A = B (diag(w) A), so the exported lora_A is the
concatenated A with every row scaled by its slot weight w, lora_B is unchanged and the
export's scaling is 1 (lora_alpha = r). Nothing here modifies the model. A layer on MoE expert
parameters (experts.py) folds the same way per expert: its factors are handled stacked,
(E, r, in) and (E, out, r), and written in PEFT's ParamWrapper layout.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import zlib
from dataclasses import dataclass

import torch
from peft import LoraConfig
from tqdm.auto import tqdm

from .core_space import skill_weights
from .embedding import factor_weights, is_embedding
from .errors import CatError
from .experts import factor_keys, peft_layout, stacked_factors
from .format import FORMAT_VERSION, peft_key
from .granularity import Granularity
from .saved_modules import fold_saved_modules
from .state import ADAPTER, cat_layers, cat_metadata, is_coefficient, state_of, weighted

_FACTOR_NAMES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


@dataclass
class FoldedAdapter:
    """A standard PEFT LoRA adapter (config + tensors) and the cat_coefficients.json record."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    record: dict

    @property
    def rank(self) -> int:
        """r of the exported adapter (every module padded to it; lora_alpha = r, scaling 1)."""
        return self.config.r


def fold(model, rank: int | None = None, prune_threshold: float | None = None) -> FoldedAdapter:
    """The standard LoRA adapter the model's coefficients describe.

    Collective under FSDP2 and DeepSpeed ZeRO-3 (it gathers sharded factors): every rank must
    call it.
    """
    with gathered(model):
        return _fold(model, rank, prune_threshold)


def check_export_options(granularity, concatenated_rank, rank=None, prune_threshold=None):
    """The export options' one rule, used by fold and, before any training, by the Axolotl
    integration: rank a whole number in [1, concatenated_rank] (no upper bound when
    concatenated_rank is None, i.e. not known yet), prune_threshold finite >= 0 and not with
    granularity core. Returns rank as an int (or None); raises CatError naming the option."""
    if rank is not None:
        if (
            not isinstance(rank, numbers.Integral)
            or isinstance(rank, bool)
            or rank < 1
            or (concatenated_rank is not None and rank > concatenated_rank)
        ):
            raise CatError(
                f"export_rank: must be a whole number between 1 and the concatenated rank "
                f"{concatenated_rank or 'of the skills'}, got {rank!r}"
            )
        rank = int(rank)
    if prune_threshold is not None and (
        not isinstance(prune_threshold, (int, float))
        or isinstance(prune_threshold, bool)
        or not 0 <= prune_threshold < math.inf
    ):
        raise CatError(f"prune_threshold: must be a finite number >= 0, got {prune_threshold!r}")
    if prune_threshold is not None and granularity == Granularity.CORE:
        raise CatError(
            "prune_threshold: granularity core mixes every skill's directions in one core, so "
            "no skill can be dropped from a module; use export_rank to shrink the export"
        )
    return rank


def _fold(model, rank, prune_threshold) -> FoldedAdapter:
    metadata = cat_metadata(model)
    layers = list(cat_layers(model))
    concatenated_rank = layers[0][1].r[ADAPTER]
    embeddings = {name for name, layer in layers if is_embedding(layer)}
    rank = check_export_options(metadata.granularity, concatenated_rank, rank, prune_threshold)

    factors, modules = {}, {}
    for name, layer in tqdm(layers, desc="Folding CAT coefficients", disable=len(layers) < 64):
        lora_A, lora_B, modules[name] = _fold_layer(layer, prune_threshold)
        factors[name] = (lora_A, lora_B)
    if not any(lora_A.shape[-2] for lora_A, _ in factors.values()):
        raise CatError(f"prune_threshold {prune_threshold} removes every skill from every module")
    if rank is not None:
        for name, (lora_A, lora_B) in factors.items():
            lora_A, lora_B, modules[name]["svd_relative_error"] = compress(lora_A, lora_B, rank)
            factors[name] = (lora_A, lora_B)

    exported_rank = rank or max(lora_A.shape[-2] for lora_A, _ in factors.values())
    tensors = {}
    keys = factor_keys(model)  # the ParamWrappers' keys; the others' follow from their names
    for name, (lora_A, lora_B) in factors.items():
        missing = exported_rank - lora_A.shape[-2]
        lora_A, lora_B = _pad_rows(lora_A, missing), _pad_rows(lora_B.mT, missing).mT
        lora_A, lora_B = init_idle_slots(name, lora_A, lora_B, embedding=name in embeddings)
        if name in keys:  # experts stacked (E, r, in), (E, out, r) -> PEFT's (r·E, in), (out, r·E)
            (key_A, key_B), (lora_A, lora_B) = keys[name], peft_layout(lora_A, lora_B)
        else:
            embedding = name in embeddings
            key_A, key_B = peft_key(name, "A", embedding), peft_key(name, "B", embedding)
        tensors[key_A], tensors[key_B] = lora_A.contiguous(), lora_B.contiguous()

    saved_tensors, saved_record, saved_names = fold_saved_modules(model)  # modules_to_save
    tensors.update(saved_tensors)
    config = LoraConfig(
        r=exported_rank,
        lora_alpha=exported_rank,
        target_modules=metadata.target_modules,
        target_parameters=metadata.target_parameters,
        fan_in_fan_out=metadata.fan_in_fan_out,
        use_rslora=False,
        use_dora=False,
        rank_pattern={},
        alpha_pattern={},
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=metadata.base_model,
        modules_to_save=saved_names or None,
    )
    record = {
        "format_version": FORMAT_VERSION,
        "skills": metadata.skills,
        "granularity": metadata.granularity,
        "parametrization": metadata.parametrization,
        "base_model": metadata.base_model,
        "concatenated_rank": concatenated_rank,
        "exported_rank": exported_rank,
        "export_rank": rank,
        "prune_threshold": prune_threshold,
        **metadata.extra,
        "modules": modules,
    }
    if saved_record:
        record["saved_modules"] = saved_record
    return FoldedAdapter(config, tensors, record)


def skill_coefficients(model) -> dict[str, list[float]]:
    """Every effective coefficient of each skill across the model (for logs and model cards)."""
    values: dict[str, list[float]] = {}
    with torch.no_grad(), gathered(model):
        for _, layer in cat_layers(model):
            if not weighted(layer):
                continue
            state = state_of(layer)
            alpha = full_tensor(state.coefficients).float()
            if state.is_core:
                present = state.present[0]
                c, _ = skill_weights(alpha, full_tensor(state.skill_cores), present)
                for skill_index, skill in enumerate(state.skill_names):
                    if present[skill_index]:
                        values.setdefault(skill, []).append(float(c[skill_index]))
                continue
            c = state.parametrization.coefficients(alpha, state.present)
            for skill_index, skill in enumerate(state.skill_names):
                present = state.present[:, skill_index]
                values.setdefault(skill, []).extend(c[present, skill_index].tolist())
    return values


def _fold_layer(layer, prune_threshold):
    """Folded factors of one layer and its record: coefficients per skill, what was pruned."""
    if not weighted(layer):  # wrapped, but no skill touches it
        lora_A, lora_B = stacked_factors(layer, *factor_weights(layer, ADAPTER))
        # torch.zeros, not new_zeros: under FSDP2 the factors are DTensors, and new_zeros
        # would make these DTensors too, which safetensors cannot save
        shape_A, shape_B = (*lora_A.shape[:-2], 0, lora_A.shape[-1]), (*lora_B.shape[:-1], 0)
        empty_A = torch.zeros(shape_A, dtype=torch.float32, device=lora_A.device)
        empty_B = torch.zeros(shape_B, dtype=torch.float32, device=lora_B.device)
        return empty_A, empty_B, {"coefficients": {}, "rank": 0}
    state = state_of(layer)
    if state.is_core:
        return _fold_core_layer(layer, state)
    with torch.no_grad():
        alpha = full_tensor(state.coefficients).float()
        c = state.parametrization.coefficients(alpha, state.present)
        if not torch.isfinite(c).all():
            raise CatError(
                f"module {state.module_name}: coefficients are not finite ({c.tolist()}); "
                "training diverged, refusing to export"
            )
        slot_c = c.flatten()[state.slot_index]
        lora_A, lora_B = (full_tensor(factor).float() for factor in factor_weights(layer, ADAPTER))
        lora_A, lora_B = stacked_factors(layer, lora_A, lora_B)  # (E, R, in), (E, out, R) experts
        keep = state.slot_scale != 0
        if prune_threshold is not None:
            keep &= slot_c.abs() >= prune_threshold
        scaled_A = (slot_c * state.slot_scale)[keep, None] * lora_A[..., keep, :]

        coefficients: dict[str, list[float]] = {}
        pruned: dict[str, list[int]] = {}
        for slot, skill_index in state.slot_skills():
            skill = state.skill_names[skill_index]
            component = len(coefficients.setdefault(skill, []))
            coefficients[skill].append(float(slot_c[slot]))
            if not keep[slot]:
                pruned.setdefault(skill, []).append(component)

    if state.present.shape[0] == 1:  # one coefficient per skill: report the scalar
        coefficients = {skill: values[0] for skill, values in coefficients.items()}
    entry = {"coefficients": coefficients, "rank": int(keep.sum())}
    if pruned:
        entry["pruned"] = pruned
    return scaled_A, lora_B[..., keep], entry


def _fold_core_layer(layer, state):
    """Granularity `core`: lora_A = Q_Aᵀ, lora_B = Q_B M; the record keeps M itself (for
    resume and re-export) and the per-skill weights that best explain it (core_space.py)."""
    with torch.no_grad():
        core = full_tensor(state.coefficients).float()
        if not torch.isfinite(core).all():
            raise CatError(
                f"module {state.module_name}: the learned core is not finite; training "
                "diverged, refusing to export"
            )
        lora_A = full_tensor(layer.lora_A[ADAPTER].weight).float()
        lora_B = full_tensor(layer.lora_B[ADAPTER].weight).float()
        # the basis has the skills' numerical rank (core_space.span_basis): k_A orthonormal
        # rows of lora_A and k_B columns of lora_B, zeros after them
        rows_A, columns_B = lora_A.abs().sum(1) != 0, lora_B.abs().sum(0) != 0
        used = rows_A | columns_B
        rank = int(used.nonzero().max()) + 1 if used.any() else 0
        present = state.present[0]
        weights, residual = skill_weights(core, full_tensor(state.skill_cores), present)
        lora_B = lora_B @ core
    coefficients = {
        skill: float(weights[index])
        for index, skill in enumerate(state.skill_names)
        if present[index]
    }
    entry = {
        "coefficients": coefficients,
        "core_residual": residual,
        "core": core[:rank, :rank].tolist(),
        "rank": rank,
        # directions of the skills' joint span this module kept, per side (k_A, k_B)
        "kept_directions": {"lora_A": int(rows_A.sum()), "lora_B": int(columns_B.sum())},
    }
    return lora_A[:rank], lora_B[:, :rank], entry


# the seed of init_idle_slots (with the module's name): the same export every time
IDLE_SLOT_SEED = 0


def init_idle_slots(name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, embedding=False):
    """Give the rank slots whose lora_A row and lora_B column are both zero PEFT's own
    initialisation, so the export can be trained further (PeftModel.from_pretrained(...,
    is_trainable=True)) without changing what it computes.

    A slot zero in both factors is a saddle no gradient leaves (each factor's gradient is a
    product with the other); PEFT's init keeps the update zero with one factor random
    (LoraLayer.reset_lora_parameters, init_lora_weights=True): a Linear's (or expert's) lora_A
    row kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)), and lora_B zero;
    an embedding's lora_embedding_B column N(0, 1) and lora_embedding_A zero. lora_A: (..., r,
    d_in), lora_B: (..., d_out, r) (stacked experts lead with E). Seeded by IDLE_SLOT_SEED and
    the module's name (crc32), so an export is reproducible and independent of module order.
    Returns new tensors (the inputs are not modified).
    """
    idle = (lora_A.abs().sum(-1) == 0) & (lora_B.abs().sum(-2) == 0)  # (..., r)
    if not idle.any():
        return lora_A, lora_B
    generator = torch.Generator().manual_seed(IDLE_SLOT_SEED * 2**32 + zlib.crc32(name.encode()))
    if embedding:  # PEFT: lora_embedding_A zero, lora_embedding_B normal
        noise = torch.randn(lora_B.mT.shape, generator=generator, dtype=torch.float32)
        lora_B = torch.where(idle[..., None], noise.to(lora_B), lora_B.mT).mT
        return lora_A, lora_B
    bound = 1.0 / math.sqrt(lora_A.shape[-1])  # kaiming_uniform_(a=sqrt(5)) on (r, d_in)
    noise = torch.rand(lora_A.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound
    lora_A = torch.where(idle[..., None], noise.to(lora_A), lora_A)
    return lora_A, lora_B


def compress(lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int):
    """Best rank-`rank` factors of ΔW = B A, and the relative Frobenius error.

    QR of both factors and an SVD of the small r x r core: the d_out x d_in matrix is never
    formed, so an 8B model's modules compress in seconds. Stacked experts, lora_A (E, r, in)
    and lora_B (E, out, r), compress each expert to `rank`; the error is the whole stack's.
    """
    if lora_A.shape[-2] == 0:
        return lora_A, lora_B, 0.0
    q_B, r_B = torch.linalg.qr(lora_B.double())
    q_A, r_A = torch.linalg.qr(lora_A.double().mT)
    u, s, vh = torch.linalg.svd(r_B @ r_A.mT)
    k = min(rank, s.shape[-1])
    root = s[..., :k].sqrt()
    new_B = (q_B @ u[..., :k]) * root[..., None, :]
    new_A = root[..., None] * (vh[..., :k, :] @ q_A.mT)
    total = float(s.square().sum())
    error = math.sqrt(float(s[..., k:].square().sum()) / total) if total > 0 else 0.0
    return new_A.float(), new_B.float(), error


def _pad_rows(matrix: torch.Tensor, missing: int) -> torch.Tensor:
    """`missing` zero rows after the last (of every expert, for stacked (E, r, in) factors)."""
    if missing <= 0:
        return matrix
    zeros = matrix.new_zeros(*matrix.shape[:-2], missing, matrix.shape[-1])
    return torch.cat([matrix, zeros], dim=-2)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank, also when FSDP2 shards it as a DTensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


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
