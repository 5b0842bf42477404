"""The math of CAT on one wrapped module.

Skill i brings frozen factors A_i (r_i x d_in), B_i (d_out x r_i) and a scaling s_i.
CAT learns coefficients c and computes

    ΔW = Σ_i c_i s_i B_i A_i = B diag(w) A,   A = [A_1; ...; A_K],  B = [B_1 ... B_K],

where w holds, for every rank slot, c·s of the skill that owns the slot (0 for padding).
So the forward is one A matmul and one B matmul whatever the number of skills:

    y = base(x) + B (w ⊙ A x)

The coefficients live in `cat_alpha` (fp32, shape (groups, skills)) on the PEFT LoRA layer.
`cat_slot_index` says which entry of c weights each rank slot, and `cat_slot_scale` holds s.
With granularity `rank`, row g of alpha weights the g-th component of every skill;
otherwise there is one row. Several layers may share one `cat_alpha` (granularity
`layer` or `adapter`).

We plug into PEFT through its `LoraVariant` hook (the mechanism DoRA uses; PEFT documents it
as private) rather than a LoRA layer of our own: PEFT's `Linear.forward` keeps doing the
parts we must not diverge on (disabled or merged adapters, input dtype casting), and
`merge_and_unload` folds the coefficients in through `merge_*` below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraVariant
from peft.utils.other import transpose


def effective_coefficients(alpha: torch.Tensor, mask: torch.Tensor, parametrization: str):
    """c from alpha: itself (`free`), or a softmax over the skills present in each group."""
    if parametrization == "free":
        return alpha
    return torch.softmax(alpha.masked_fill(~mask, float("-inf")), dim=-1).masked_fill(~mask, 0.0)


def slot_weights(layer) -> torch.Tensor:
    """w: the weight c·s of every rank slot of the concatenated adapter, fp32, shape (R,)."""
    c = effective_coefficients(layer.cat_alpha, layer.cat_group_mask, layer.cat_parametrization)
    return c.flatten()[layer.cat_slot_index] * layer.cat_slot_scale


def delta_weight(layer, adapter: str = "default") -> torch.Tensor:
    """ΔW = B diag(w) A in the base weight's layout (transposed for Conv1D bases)."""
    lora_A = layer.lora_A[adapter].weight
    lora_B = layer.lora_B[adapter].weight
    delta = (lora_B.float() * slot_weights(layer)) @ lora_A.float()
    return transpose(delta, layer.fan_in_fan_out)


class CatLinearVariant(LoraVariant):
    @staticmethod
    def init(module, adapter_name, **kwargs) -> None:
        # attach_cat installs the coefficients and buffers itself
        pass

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs) -> torch.Tensor:
        lora_A = module.lora_A[active_adapter].weight
        lora_B = module.lora_B[active_adapter].weight
        hidden = F.linear(module.lora_dropout[active_adapter](x), lora_A) * slot_weights(module)
        if hidden.dtype == result.dtype == lora_B.dtype:
            # addmm adds B·hidden into the base output in one kernel: no extra full-width pass
            flat = torch.addmm(
                result.reshape(-1, result.shape[-1]), hidden.flatten(0, -2), lora_B.t()
            )
            return flat.view(result.shape)
        return result + F.linear(hidden.to(lora_B.dtype), lora_B)

    @staticmethod
    def merge_safe(module, active_adapter, orig_weight) -> torch.Tensor:
        return orig_weight + delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter, orig_weight) -> None:
        orig_weight.data += delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter, orig_weight) -> torch.Tensor:
        return orig_weight - delta_weight(module, active_adapter).to(orig_weight.dtype)
