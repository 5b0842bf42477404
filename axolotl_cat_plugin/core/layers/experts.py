"""CAT on LoRAs of MoE expert weights: PEFT's `target_parameters`, and the older per-expert form.

PEFT's ParamWrapper (peft/tuners/lora/layer.py) puts LoRA on one raw parameter P of a module.
For a 3-D P, the experts of a fused MoE layer (Mixtral and Qwen2-MoE in transformers v5:
`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I)), each expert e gets
its own update, a plain LoRA:

    P_e + s · B_e A_e          A_e: (r, in), B_e: (out, r), s = lora_alpha / r (or / sqrt(r))

and the adapter stores every expert's factors in two matrices (ParamWrapper.update_layer,
get_delta_weight): lora_A (r·E, in), expert-major (rows e·r .. e·r + r - 1 are A_e), and
lora_B (out, r·E), rank-major (column k·E + e is column k of B_e). ΔP_e lies in P as
(E, out, in), or as (E, in, out) where the experts module sets `is_transposed`; a 2-D P is
one "expert" with ΔP = s·B A of P's shape (out, in). Several targeted parameters of one
module nest: the first in the module's parameter order is wrapped first, so it is the
innermost wrapper and saved under `<module>.base_layer....lora_A.weight`, the last one under
`<module>.lora_A.weight` (tuners_utils.BaseTuner._inject_parameters).

The older form, per-expert Linear modules an older PEFT saved on transformers v4
(`...block_sparse_moe.experts.N.w1/w2/w3`, `...mlp.experts.N.gate_proj/...`, the router
`...block_sparse_moe.gate`), is what PEFT converts into this one when it loads such a skill on
a base whose experts are fused (peft/utils/transformers_weight_conversion.py: w1 and w3 fused
block-diagonally into gate_up_proj with r and lora_alpha doubled, the router onto its
`gate.weight`). skills/experts.py reads both forms (`convert_per_expert_modules` calls those very
functions) and plans which skill's factors go on which parameter; this module is the CAT layer.

CAT composes either like a Linear module: the skills' per-expert factors are concatenated
along the rank, slot j of the CAT adapter (rank R) belongs to one skill's component and is
weighted by the same w_j = c·s as on a Linear layer (linear.py), for every expert:

    ΔP_e = Σ_j w_j B[:, j, e] A[e, j, :] = B_e diag(w) A_e          (fp32, then P's dtype)

The coefficients c (fp32, the layer's CatState, state.py) come per skill per targeted
parameter (granularity `module`), or are shared per decoder layer / the whole model, or per
rank component, as on Linear layers; granularity `core` is refused. PEFT's ParamWrapper
accepts no LoRA variant, so CAT replaces the wrapper's own get_delta_weight (and, in PEFT >=
0.21, get_delta_factors, which its forward uses instead for one adapter) on the CAT layer:
PEFT's forward, merge, unmerge and merge_and_unload then apply ΔP above. The export is the
standard adapter PEFT itself saves for `target_parameters`: lora_A = (w ⊙ A) per expert,
lora_B = B, scaling 1.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..state import ADAPTER, state_of

# a ParamWrapper's factors are saved under `<module>(.base_layer)*.lora_A.weight`: the number
# of `.base_layer` is the wrapper's depth below the outermost one
NESTED = ".base_layer"


# ---------------------------------------------------------------- PEFT's layout <-> per expert


def per_expert(lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int):
    """PEFT's ParamWrapper factors -> per expert: lora_A (r·E, in) expert-major and lora_B
    (out, r·E) rank-major become (E, r, in) and (E, out, r) (views where possible)."""
    stacked_A = lora_A.reshape(num_experts, -1, lora_A.shape[-1])
    stacked_B = lora_B.reshape(lora_B.shape[0], -1, num_experts).permute(2, 0, 1)
    return stacked_A, stacked_B


def peft_layout(stacked_A: torch.Tensor, stacked_B: torch.Tensor):
    """per_expert's inverse: (E, r, in) and (E, out, r) -> lora_A (r·E, in), lora_B (out, r·E)."""
    lora_A = stacked_A.reshape(-1, stacked_A.shape[-1])
    lora_B = stacked_B.permute(1, 2, 0).reshape(stacked_B.shape[1], -1)
    return lora_A, lora_B


# ---------------------------------------------------------------- the CAT layer


def is_parameter_wrapper(layer) -> bool:
    """Whether `layer` is PEFT's ParamWrapper (LoRA on a raw parameter)."""
    from peft.tuners.lora.layer import ParamWrapper

    return isinstance(layer, ParamWrapper)


def lora_layers(model: nn.Module):
    """(name, layer) of every PEFT LoRA layer holding the CAT adapter (Linear, Embedding,
    ParamWrapper); a ParamWrapper is named by its parameter, `<module>.<parameter>`, the name
    its plan and record use."""
    for name, module in model.named_modules():
        if ADAPTER not in getattr(module, "lora_A", {}) and ADAPTER not in getattr(
            module, "lora_embedding_A", {}
        ):
            continue
        if is_parameter_wrapper(module):
            while name.endswith(NESTED):
                name = name.removesuffix(NESTED)
            name = f"{name}.{module.parameter_name}"
        yield name, module


def load_factors(layer, plan, rank: int) -> None:
    """Write the skills' per-expert factors into a ParamWrapper's rank-R adapter (zeros after).

    layer.lora_A[ADAPTER].weight (R·E, in), viewed (E, R, in); lora_B (out, R·E), viewed
    (out, R, E): skill i's slots offset_i .. offset_i + r_i - 1 of every expert.
    """
    experts = layer.num_experts
    lora_A = layer.lora_A[ADAPTER].weight
    lora_B = layer.lora_B[ADAPTER].weight
    with torch.no_grad():
        stacked_A = lora_A.view(experts, rank, lora_A.shape[-1])
        stacked_B = lora_B.view(lora_B.shape[0], rank, experts)
        stacked_A.zero_()
        stacked_B.zero_()
        offset = 0
        for _, factors in plan.blocks:
            end = offset + factors.rank
            stacked_A[:, offset:end] = factors.lora_A.to(lora_A)
            stacked_B[:, offset:end] = factors.lora_B.permute(1, 2, 0).to(lora_B)
            offset = end


def _factor_product(layer):
    """(lhs, rhs), fp32, with ΔP = lhs @ rhs per expert in the parameter's own layout:
    (E, out, R) @ (E, R, in), or (E, in, R) @ (E, R, out) for an `is_transposed` parameter.
    The slot weights w (fp32, c·s) scale B's rank slots."""
    stacked_A, stacked_B = per_expert(
        layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.num_experts
    )
    weighted_B = stacked_B.float() * state_of(layer).slot_weights()
    if layer.get_param().dim() == 3 and not layer._did_swap_in_out_features:
        return stacked_A.float().mT, weighted_B.mT
    return weighted_B, stacked_A.float()


def delta_weight(layer, adapter_name: str, *args, **kwargs) -> torch.Tensor:
    """ParamWrapper.get_delta_weight of a CAT layer: ΔP_e = B_e diag(w) A_e, computed in fp32
    and cast as PEFT casts it (to the parameter's device, and dtype where it is a compute dtype).
    Shape: the parameter's ((E, out, in), (E, in, out) or (out, in))."""
    if adapter_name != ADAPTER:
        return type(layer).get_delta_weight(layer, adapter_name, *args, **kwargs)
    lhs, rhs = _factor_product(layer)
    delta = lhs @ rhs
    param = layer.get_param()
    if param.dim() == 2:
        delta = delta[0]
    if param.dtype in (torch.float16, torch.bfloat16, torch.float32):  # ALLOWED_COMPUTE_DTYPES
        return delta.to(param.device, param.dtype)
    return delta.to(param.device)


def delta_factors(layer, adapter_name: str):
    """ParamWrapper.get_delta_factors (PEFT >= 0.21) of a CAT layer: (lhs, rhs, 1.0) with
    ΔP = lhs @ rhs, in the parameter's dtype as PEFT casts them (its forward folds them into
    P with one baddbmm)."""
    if adapter_name != ADAPTER:
        return type(layer).get_delta_factors(layer, adapter_name)
    lhs, rhs = _factor_product(layer)
    dtype = layer.get_param().dtype
    return lhs.to(dtype), rhs.to(dtype), 1.0


_OVERRIDES = {"get_delta_weight": delta_weight, "get_delta_factors": delta_factors}


def install_delta(layer) -> None:
    """Make a ParamWrapper compute the CAT update for ADAPTER in forward and merges."""
    for name, function in _OVERRIDES.items():
        if hasattr(type(layer), name):  # get_delta_factors: PEFT >= 0.21
            setattr(layer, name, types.MethodType(function, layer))


def remove_delta(layer) -> None:
    """Give a ParamWrapper PEFT's own update back (for apply_export's plain LoRA)."""
    for name in _OVERRIDES:
        layer.__dict__.pop(name, None)


def dropout_outside_parameters(peft_model, p: float) -> None:
    """PEFT's `nn.Dropout(p)` on the adapter input of every LoRA layer but the ParamWrappers.

    ParamWrapper refuses lora_dropout (it adds ΔP to the parameter, there is no adapter input
    to drop), so attach_cat asks PEFT for none and gives the other layers theirs here, as
    LoraLayer.update_layer builds it.
    """
    for _, layer in lora_layers(peft_model):
        if not is_parameter_wrapper(layer) and p > 0:
            layer.lora_dropout[ADAPTER] = nn.Dropout(p=p)
