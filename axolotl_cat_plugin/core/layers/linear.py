"""The math of CAT on one wrapped module (LoRA Soups, Prabhakar et al., arXiv 2410.13025).

Skill i brings frozen factors A_i (r_i x d_in), B_i (d_out x r_i) and a scaling s_i.
CAT learns coefficients c and computes

    ΔW = Σ_i c_i s_i B_i A_i = B diag(w) A,   A = [A_1; ...; A_K],  B = [B_1 ... B_K],

where w holds, for every rank slot, c·s of the skill that owns the slot (0 for padding).
So the forward is one A matmul and one B matmul whatever the number of skills:

    y = base(x) + B (w ⊙ A x)

The coefficients and the slot layout live in the layer's CatState (state.py,
`layer.cat_state["default"]`): `coefficients` (fp32, shape (groups, skills)), which entry of
c weights each rank slot, and s per slot; `mix()` gives w. With granularity `core`
(granularity/core_space.py) the coefficients are instead an R x R matrix M that mixes the
rank slots, ΔW = B M A, y = base(x) + B (M (A x)). With granularity `rank`, row g weights
the g-th component of every skill; otherwise there is one row. Several layers share one Parameter
with granularity `layer` or `model`.

We plug into PEFT through its `LoraVariant` hook (the mechanism DoRA uses; PEFT documents it
as private) rather than a LoRA layer of our own: PEFT's `Linear.forward` keeps doing the
parts we must not diverge on (disabled or merged adapters, the base layer's own call), and
`merge_and_unload` folds the coefficients in through `merge_*` below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraVariant
from peft.utils.other import transpose
from torch import nn

from ..state import state_of
from .fused import cat_linear, fused_applicable, mix_slots


def mixed_B(layer, lora_B: torch.Tensor) -> torch.Tensor:
    """B diag(w) or B M: the B factor with the coefficients folded in, fp32, (d_out, R)."""
    mix = state_of(layer).mix().float()
    return lora_B.float() @ mix if mix.dim() == 2 else lora_B.float() * mix


def delta_weight(layer, adapter: str = "default") -> torch.Tensor:
    """ΔW = B diag(w) A (or B M A) in the base weight's layout (transposed for Conv1D bases)."""
    lora_A = layer.lora_A[adapter].weight
    delta = mixed_B(layer, layer.lora_B[adapter].weight) @ lora_A.float()
    return transpose(delta, layer.fan_in_fan_out)


def _owns_output(module, result: torch.Tensor) -> bool:
    """Whether the base output may be updated in place.

    Only the 2-D or 3-D output of a plain `nn.Linear` without forward hooks (a hook could
    keep a reference to it) that is no view (so no other tensor shares its memory, and
    autograd records the update without copying). nn.Linear saves its input and weight for
    backward, never its output, so the gradients stay exact.
    """
    base = module.base_layer
    return (
        type(base) is nn.Linear
        and not base._forward_hooks
        and result._base is None
        and result.dim() in (2, 3)
    )


class DeltaMerges:
    """PEFT's merge_safe / merge_unsafe / unmerge of a CAT variant, from its `delta(module,
    adapter)`: ΔW in the base weight's layout, added or removed in the base weight's dtype."""

    @classmethod
    def merge_safe(cls, module, active_adapter, orig_weight) -> torch.Tensor:
        """W + ΔW as a new tensor (PEFT's safe_merge)."""
        return orig_weight + cls.delta(module, active_adapter).to(orig_weight.dtype)

    @classmethod
    def merge_unsafe(cls, module, active_adapter, orig_weight) -> None:
        """W += ΔW in place."""
        orig_weight.data += cls.delta(module, active_adapter).to(orig_weight.dtype)

    @classmethod
    def unmerge(cls, module, active_adapter, orig_weight) -> torch.Tensor:
        """W - ΔW (undoes merge_*)."""
        return orig_weight - cls.delta(module, active_adapter).to(orig_weight.dtype)


class CatLinearVariant(DeltaMerges, LoraVariant):
    """The CAT computation on one PEFT LoRA Linear layer, through PEFT's LoraVariant hook.

    Installed by attach_cat on every layer a skill touches. PEFT calls `forward` only while
    the adapter is active and unmerged (its Linear.forward handles disabled and merged
    adapters), and `merge_*` / `unmerge` from merge_and_unload: those add or remove
    ΔW = B diag(w) A (or B M A for `core`) in the base weight's dtype and layout.
    """

    # the fused Function (core/layers/fused.py) where it applies; False: always the unfused path
    # (benchmarks and tests compare the two)
    fused = True

    @staticmethod
    def init(module, adapter_name, **kwargs) -> None:
        """Nothing: attach_cat installs the layer's CatState itself (PEFT's hook requires it)."""

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs) -> torch.Tensor:
        """result (..., d_out, the base output) + B·mix(A x); x (..., d_in) in any float
        dtype, the factors cast to it, the coefficients fp32. May update `result` in place
        (see _owns_output)."""
        if CatLinearVariant.fused and fused_applicable(module, active_adapter, x):
            # base + B(w ⊙ A x) (or B M A x) with one input gradient (the base's and the
            # adapter's summed in place) and nothing full-width saved beyond what the base saves
            return cat_linear(
                x,
                result,
                module.base_layer.weight,
                module.lora_A[active_adapter].weight,
                module.lora_B[active_adapter].weight,
                state_of(module).mix(),
                in_place=_owns_output(module, result),
            )
        return CatLinearVariant.unfused_forward(module, active_adapter, x, result)

    @staticmethod
    def unfused_forward(module, active_adapter, x, result) -> torch.Tensor:
        """The adapter added by separate ops, autograd deriving the backward (any base, dropout)."""
        # Compute in the activations' dtype and cast only the small factors: attach_cat turns
        # off PEFT's cast of x to the (fp32) adapter weights, which copied every activation.
        lora_A = module.lora_A[active_adapter].weight.to(x.dtype)
        lora_B = module.lora_B[active_adapter].weight.to(result.dtype)
        hidden = F.linear(module.lora_dropout[active_adapter](x), lora_A)
        # the same mix as the fused Function (fp32, w ⊙ a or M a), then the output's dtype
        hidden = mix_slots(hidden, state_of(module).mix()).to(result.dtype)
        if _owns_output(module, result):
            # add B·hidden into the base output itself: allocating (and page-faulting in) a new
            # full-width tensor per module costs more than the rank-R matmul does
            if result.dim() == 2:
                return result.addmm_(hidden, lora_B.t())
            return result.baddbmm_(hidden, lora_B.t().expand(result.shape[0], -1, -1))
        # addmm adds B·hidden into a copy of the base output in one kernel
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.flatten(0, -2), lora_B.t())
        return flat.view(result.shape)

    delta = staticmethod(delta_weight)  # ΔW for DeltaMerges
