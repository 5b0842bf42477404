"""The static mixes a fitted CAT is compared against, set in place on the CAT model.

Every CAT layer can compute any fixed weighting ΔW = Σ_i w_i s_i B_i A_i of its skills
without reloading anything: the coefficients are overwritten for the duration of a `with`
block and restored after. Evaluating the same split under each mix tells a user whether the
fitted coefficients beat simply adding the skills (issue: "the same comparison for every
user"; the controls follow arXiv 2602.12323).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..errors import CatError
from ..state import cat_layers, state_of, weighted, weighted_states


def static_mixes(skill_names: Sequence[str]) -> dict[str, list[float]]:
    """{label: per-skill weights}: each skill alone, the uniform sum and the average."""
    count = len(skill_names)
    mixes = {
        f"{name} alone": [1.0 if j == i else 0.0 for j in range(count)]
        for i, name in enumerate(skill_names)
    }
    mixes["uniform sum"] = [1.0] * count
    mixes["average"] = [1.0 / count] * count
    return mixes


def is_sharded(model) -> bool:
    """Whether FSDP2 (DTensor) or DeepSpeed ZeRO-3 (ds_id) holds the coefficients in shards."""
    return any(
        hasattr(state_of(layer).coefficients, "full_tensor")
        or hasattr(state_of(layer).coefficients, "ds_id")
        for _, layer in cat_layers(model)
        if weighted(layer)
    )


@contextlib.contextmanager
def static_coefficients(model, weights: Sequence[float]) -> Iterator[None]:
    """Within the block, every CAT layer computes Σ_i weights[i] · s_i B_i A_i.

    weights: one float per skill, in the order of the config's skills. Each state's
    strategy sets them (`set_static`: a layer's granularity, e.g. per-slot layers get
    c = weights, switched to `free` meanwhile, `core` layers M = Σ_i weights[i] C_i; a
    composed saved module's kind, M_base + Σ_i weights[i] (M_i - M_base)). The coefficients
    (fp32) and whatever else was switched are restored on exit, bit for bit.

    Raises CatError when the number of weights is not the number of skills, or when the
    coefficients are sharded (FSDP2, ZeRO-3), where an in-place overwrite is not a local
    operation.
    """
    if is_sharded(model):
        raise CatError("static mixes need whole coefficients; they are sharded (FSDP2/ZeRO-3)")
    saved: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    restores = []
    try:
        with torch.no_grad():
            for state in weighted_states(model):  # CAT layers and composed saved modules
                if len(weights) != len(state.skill_names):
                    raise CatError(
                        f"static_coefficients: {len(weights)} weights for "
                        f"{len(state.skill_names)} skills {list(state.skill_names)}"
                    )
                param = state.coefficients
                saved.setdefault(id(param), (param, param.detach().clone()))
                w = torch.tensor(weights, dtype=torch.float32, device=param.device)
                restores.append(state.strategy.set_static(state, w))
        yield
    finally:
        with torch.no_grad():
            for param, value in saved.values():
                param.copy_(value)
        for restore in restores:
            restore()
