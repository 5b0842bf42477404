"""Before rank 0 exports, every rank must hold the coefficients rank 0 holds.

Data-parallel training keeps replicas identical only as long as every gradient is reduced;
a coefficient left out of the reduction (an unused module, a custom hook) drifts silently,
and rank 0's export would then describe a model the other ranks never trained.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from .errors import CatError
from .export.fold import full_tensor, gathered
from .state import is_coefficient

LOG = logging.getLogger(__name__)


def check_ranks_agree(model: nn.Module, tolerance: float = 0.0) -> float | None:
    """Largest difference between this rank's coefficients and rank 0's (None: one process).

    Every rank must call it (it is a collective). Raises CatError on every rank when any rank
    differs from rank 0 by more than `tolerance`.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    with gathered(model):
        coefficients = [
            full_tensor(p.detach()).float().flatten().clone()
            for name, p in model.named_parameters()
            if is_coefficient(name)
        ]
    mine = torch.cat(coefficients) if coefficients else torch.zeros(0)
    # gloo reduces CPU tensors, nccl CUDA ones: use the device the coefficients live on
    device = coefficients[0].device if coefficients else torch.device("cpu")
    mine = mine.to(device)
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    worst = (mine - reference).abs().max() if mine.numel() else mine.new_zeros(())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    worst = float(worst)
    ranks = dist.get_world_size()
    if not worst <= tolerance:
        raise CatError(
            f"CAT: the coefficients differ between the {ranks} ranks (by up to {worst:.3g}); "
            "not exporting. Every coefficient must take part in the gradient reduction."
        )
    if dist.get_rank() == 0:
        LOG.info("CAT: coefficients identical on all %d ranks (%d values)", ranks, mine.numel())
    return worst
