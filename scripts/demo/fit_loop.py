"""The fitting loop of the study harnesses, in one place, so the two worlds fit the same way.

Used by scripts/real_model/fit.py (the real model) and scripts/demo/self_mix_bench.py (the
miniature; scripts/demo/data_curve.py through it): AdamW without weight decay on the given
parameters, transformers' cosine schedule with linear warmup, batches drawn epoch by epoch
from an order shuffled by ``random.Random(seed)``, and the two optional fixes of
``regularize.py`` (the L2-SP pull toward the start, early stopping on a held-out objective).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from regularize import EarlyStopping, StartPenalty
from transformers import get_cosine_schedule_with_warmup


def fit_loop(
    params: dict[str, torch.Tensor],
    batch_loss: Callable[[list[int]], torch.Tensor],
    *,
    rows: int,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    warmup: int = 0,
    penalty: float = 0.0,
    early_stop: tuple[int, Callable[[], float]] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[list[float], EarlyStopping | None]:
    """Train ``params`` for ``steps`` optimizer steps; returns (the objective of every step,
    the EarlyStopping record or None).

    params: {name: trainable tensor} (CAT's fp32 coefficients or a fresh LoRA's factors);
    batch_loss(indices) -> 0-dim loss tensor for the rows at ``indices`` (``batch`` of them,
    out of ``rows``; an epoch's order is reshuffled whenever fewer than ``batch`` are left, so a
    mix smaller than a batch repeats rows within one). penalty: the StartPenalty weight (0:
    none), added to the loss that is minimised, not to the one returned. early_stop: (every N
    steps, a function returning the held-out objective, which leaves the model in train mode);
    the best parameters are put back at the end. on_step(step, loss): called after each step
    (1-based), e.g. to log.
    """
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    pull = StartPenalty(params, penalty) if penalty else None
    stopping = EarlyStopping(params, early_stop[1], early_stop[0]) if early_stop else None
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    for step in range(1, steps + 1):
        while len(order) < batch:
            epoch = list(range(rows))
            rng.shuffle(epoch)
            order += epoch
        chosen, order = order[:batch], order[batch:]
        loss = batch_loss(chosen)
        (loss + pull() if pull else loss).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if on_step:
            on_step(step, losses[-1])
        if stopping:
            stopping.check(step)
    if stopping:
        stopping.restore()
    return losses, stopping
