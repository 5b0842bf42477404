"""What each wrapped layer kind does at attach: load the skills' factors and take CAT's forward.

A Linear layer takes CatLinearVariant (layer.py) and an Embedding CatEmbeddingVariant
(embedding.py) through PEFT's LoraVariant hook; a ParamWrapper on MoE expert parameters has
its delta replaced instead (experts.py). The granularities (granularity/) build the CatState
and call these; they never ask which kind a layer is.
"""

from __future__ import annotations

import torch

from .embedding import CatEmbeddingVariant, factor_weights, is_embedding
from .experts import install_delta, is_parameter_wrapper
from .experts import load_factors as load_expert_factors
from .layer import CatLinearVariant
from .state import ADAPTER, CatState, put_state


def use_cat_variant(layer, state: CatState) -> None:
    """Give a layer its CatState and the CAT variant in place of PEFT's LoRA forward (a
    ParamWrapper takes no variant: its delta itself is replaced, experts.py)."""
    put_state(layer, state)
    if is_parameter_wrapper(layer):
        install_delta(layer)
    else:
        layer.lora_variant[ADAPTER] = (
            CatEmbeddingVariant() if is_embedding(layer) else CatLinearVariant()
        )
    layer.cast_input_dtype_enabled = False  # the variant casts the factors instead


def load_factors(layer, plan, rank: int) -> None:
    """Write the skills' factors concatenated in slot order (plan.blocks) into the layer's
    rank-`rank` adapter, zeros after them (per expert on a ParamWrapper)."""
    if is_parameter_wrapper(layer):  # per expert, in PEFT's ParamWrapper layout
        load_expert_factors(layer, plan, rank)
        return
    lora_A, lora_B = factor_weights(layer, ADAPTER)
    with torch.no_grad():
        lora_A.zero_()
        lora_B.zero_()
        offset = 0
        for _, factors in plan.blocks:
            lora_A[offset : offset + factors.rank] = factors.lora_A.to(lora_A)
            lora_B[:, offset : offset + factors.rank] = factors.lora_B.to(lora_B)
            offset += factors.rank
