"""merge_record.json of a static merge: what the method computes, and how far the merged
update is from the weighted sum of the skills' updates Σ_i w_i s_i B_i A_i, measured on
PEFT's own merged adapter (run.py writes it beside the adapter)."""

from __future__ import annotations

import torch

from ..layers.embedding import factor_weights
from .methods import MergeMethod

# above this relative Frobenius difference from Σ w_i ΔW_i, a linear merge is said not to be
# the sum (float32 rounding of the combined factors stays orders of magnitude below)
SUM_TOLERANCE = 1e-4


def merge_record(method: MergeMethod, skills, weights, density, seed, difference, module) -> dict:
    """What merge_record.json says: the method, what it computes, its arguments, the skills,
    and the largest relative Frobenius difference of the merged update from the weighted sum
    Σ w_i s_i B_i A_i over the modules (None where not measured)."""
    return {
        "method": method.name,
        "peft_combination_type": method.combination_type,
        "paper": method.paper,
        "computes": method.computes,
        "weights": [float(w) for w in weights],
        "density": density,
        "seed": seed,
        "skills": [
            {"name": s.name, "source": s.spec.path, "weights_sha256": s.sha256} for s in skills
        ],
        "sum_of_updates": None if difference is None else difference <= SUM_TOLERANCE,
        "relative_difference_from_sum": difference,
        "largest_difference_on": module,
    }


def difference_from_sum(model, names, weights, merged) -> tuple[float, str | None]:
    """max over modules of ‖ΔW_merged - Σ w_i ΔW_i‖_F / ‖Σ w_i ΔW_i‖_F, with every ΔW as PEFT
    computes it (its factors and scaling), and the module where it is largest.

    Never forms a d_out x d_in matrix: ΔW_merged - Σ w_i ΔW_i = X Y with X = [s_m B_m,
    -w_1 s_1 B_1, ...], Y = [A_m; A_1; ...], and ‖X Y‖² = Σ (XᵀX) ∘ (Y Yᵀ); float64.
    """
    largest, where = 0.0, None
    for module_name, layer in model.base_model.model.named_modules():
        if not hasattr(layer, "lora_A") or merged not in layer.scaling:
            continue
        present = [(n, w) for n, w in zip(names, weights, strict=True) if n in layer.scaling]
        if not present:
            continue
        blocks = [(factor_weights(layer, n), w * layer.scaling[n]) for n, w in present]
        merged_A, merged_B = factor_weights(layer, merged)
        total_B = [B.double() * v for (_, B), v in blocks]
        total_A = [A.double() for (A, _), _ in blocks]
        target = _product_norm(total_B, total_A)
        difference = _product_norm(
            [merged_B.double() * layer.scaling[merged], *(-B for B in total_B)],
            [merged_A.double(), *total_A],
        )
        relative = difference / target if target > 0 else difference
        if relative > largest:
            largest, where = relative, module_name
    return largest, where


def _product_norm(columns: list[torch.Tensor], rows: list[torch.Tensor]) -> float:
    """‖[B_1 ... B_n] [A_1; ...; A_n]‖_F, from the small Gram matrices."""
    X, Y = torch.cat(columns, 1), torch.cat(rows, 0)
    return float(((X.t() @ X) * (Y @ Y.t())).sum().clamp(min=0).sqrt())
