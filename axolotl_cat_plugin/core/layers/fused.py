"""One autograd Function for a CAT-wrapped Linear: base output + adapter, one input gradient.

For a frozen base weight W (d_out x d_in), frozen concatenated factors A (R x d_in) and
B (d_out x R), and a learned fp32 "mix" of the R rank slots,

    y = base(x) + B mix(A x)          mix(a) = w ⊙ a      (w: (R,), the diagonal case)
                                      mix(a) = M a        (M: (R, R), a full mixing matrix)

so ΔW = B diag(w) A or ΔW = B M A. With g the output gradient of token t and a_t = A x_t:

    dx_t = Wᵀ g_t + Aᵀ mixᵀ(Bᵀ g_t)      (computed as ONE tensor: g W, then += mixᵀ(g B) A)
    dw   = Σ_t a_t ⊙ (Bᵀ g_t)             dM = Σ_t (Bᵀ g_t) a_tᵀ

Why a Function: left to autograd, the adapter's input gradient is a fresh full-width
tensor that is then added to the base's (two more passes over d_in x tokens), and the
output gradient is re-read by separate kernels. Here the base's own autograd node is cut
off (its output is passed in detached and updated in place), and this Function saves W,
which the frozen base's matmul would have saved too, the factors and a = A x (R wide,
small); x itself is not kept, as no weight gradient is computed.

The Function never computes gradients for W, the bias, A or B: `fused_applicable` says when
it may be used (all of them frozen, a plain `nn.Linear` base without hooks, no dropout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _mix_dtype(a: torch.Tensor, mix: torch.Tensor) -> torch.dtype:
    """fp32 for activations of 16 bits (and mix fp32); fp64 when testing in fp64."""
    return torch.promote_types(torch.promote_types(a.dtype, mix.dtype), torch.float32)


def mix_slots(a: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """mix(a) in fp32: a ⊙ w for a vector w (R,), a Mᵀ for a matrix M (R, R); a is (..., R)."""
    dtype = _mix_dtype(a, mix)
    a = a.to(dtype)
    return a * mix if mix.dim() == 1 else F.linear(a, mix.to(dtype))


def _mix_transposed(gb: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """mixᵀ applied to the gradient gb = g B (N, R), in fp32: gb ⊙ w, or gb M."""
    gb = gb.to(_mix_dtype(gb, mix))
    return gb * mix if mix.dim() == 1 else gb @ mix


class CatLinearFunction(torch.autograd.Function):
    """y = base_out + B mix(A x), with the base's input gradient summed in (see the module doc).

    forward(x, base_out, weight, lora_A, lora_B, mix, in_place) -> y
        x: (..., d_in), any float dtype; base_out: (..., d_out), the base's output, detached
        (updated in place and returned when `in_place`); weight: (d_out, d_in), the base's;
        lora_A: (R, d_in); lora_B: (d_out, R); mix: fp32 (R,) or (R, R).
        Everything runs in base_out's dtype (x, W and the factors cast to it, as autocast does
        for the base), the mix in fp32; with x in that dtype this is exactly
        CatLinearVariant's unfused path. Only x and mix receive gradients; x's has x's dtype.
    """

    @staticmethod
    def forward(ctx, x, base_out, weight, lora_A, lora_B, mix, in_place):
        """base_out + B mix(A x); saves x, the cast factors and A x (R wide) for backward."""
        dtype = base_out.dtype  # the base's compute dtype (bf16 under autocast)
        with torch.autocast(x.device.type, enabled=False):
            # the same kernels as CatLinearVariant's unfused forward, so the outputs agree bit
            # for bit
            weight, lora_A, lora_B = weight.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
            a = F.linear(x.to(dtype), lora_A)  # (..., R)
            hidden = mix_slots(a, mix).to(dtype)
            if in_place and base_out.is_contiguous() and base_out.dim() in (2, 3):
                if base_out.dim() == 2:
                    base_out.addmm_(hidden, lora_B.t())
                else:
                    base_out.baddbmm_(hidden, lora_B.t().expand(base_out.shape[0], -1, -1))
                ctx.mark_dirty(base_out)
                out = base_out
            else:
                flat = base_out.reshape(-1, base_out.shape[-1])
                out = torch.addmm(flat, hidden.flatten(0, -2), lora_B.t()).view(base_out.shape)
            a = a.flatten(0, -2)
        # x itself is not needed: no weight gradient is computed
        ctx.x_shape = x.shape
        ctx.save_for_backward(weight, lora_A, lora_B, mix, a)
        return out

    @staticmethod
    def backward(ctx, grad):
        """One input gradient g W + ((g B) mix^T) A, and the mix's gradient Σ_t (A x_t) ⊙ (Bᵀ g_t)
        (or its outer-product form for a core); None for everything else (frozen)."""
        weight, lora_A, lora_B, mix, a = ctx.saved_tensors
        need_x, need_mix = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
        grad_mix = grad_x = None
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
            gb = g @ lora_B  # (N, R): Bᵀ g_t for every token
            if need_mix:
                a, gb32 = a.to(mix.dtype), gb.to(mix.dtype)
                grad_mix = (a * gb32).sum(0) if mix.dim() == 1 else gb32.t() @ a
            if need_x:
                ga = _mix_transposed(gb, mix).to(weight.dtype)
                grad_x = g @ weight  # the base's input gradient ...
                grad_x.addmm_(ga, lora_A)  # ... with the adapter's added in place
                grad_x = grad_x.view(ctx.x_shape)  # autograd casts it to x's dtype
        return grad_x, None, None, None, None, grad_mix, None


def fused_applicable(module, active_adapter: str, x: torch.Tensor, weight=None) -> bool:
    """Whether `cat_linear` may replace the unfused path on this PEFT LoRA layer now.

    Needs a plain `nn.Linear` base without forward hooks or pre-hooks (DeepSpeed ZeRO-3
    registers some; a hook may also hold the base's output or expect its backward to run),
    with its weight and bias frozen, frozen factors, and no active dropout (dropout > 0 in
    training mode). Everything else takes the unfused path.
    """
    base = module.base_layer
    if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
        return False
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return False
    dropout = module.lora_dropout[active_adapter]
    if not isinstance(dropout, nn.Identity) and dropout.training and dropout.p > 0:
        return False
    lora_A = module.lora_A[active_adapter].weight
    lora_B = module.lora_B[active_adapter].weight
    return not (lora_A.requires_grad or lora_B.requires_grad) and x.dim() >= 2


def cat_linear(
    x: torch.Tensor,
    base_out: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    mix: torch.Tensor,
    in_place: bool = False,
) -> torch.Tensor:
    """base_out + B mix(A x) through `CatLinearFunction`, cutting base_out's own autograd edge.

    base_out must be F.linear(x, weight[, bias]) of this very x and weight (frozen): its
    input gradient g W is computed here, so the base's autograd node is bypassed (detached).
    `in_place` lets the result reuse base_out's memory (only when no other tensor shares
    it). Shapes and dtypes as in `CatLinearFunction`; raises ValueError for a mix that is
    neither (R,) nor (R, R).
    """
    rank = lora_A.shape[0]
    if mix.shape not in ((rank,), (rank, rank)):
        shape = tuple(mix.shape)
        raise ValueError(f"mix must have shape ({rank},) or ({rank}, {rank}), got {shape}")
    return CatLinearFunction.apply(x, base_out.detach(), weight, lora_A, lora_B, mix, in_place)
