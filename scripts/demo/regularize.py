"""Two fixes for a fit that follows its mix too far (issue 19, item 4), for the study harnesses.

Both work on any set of trainable parameters (CAT's coefficients or a fresh LoRA) and are used
by scripts/real_model/fit.py and scripts/demo/self_mix_bench.py, so the two worlds measure the
same thing:

- ``StartPenalty``: ``weight * ||theta - theta0||^2 / ||theta0||^2`` over every trainable value,
  added to the objective: a pull back toward the start (the plain sum at init 1.0, the average
  at 0.5), an L2 prior centred on the start instead of 0 (L2-SP, Li et al. 2018,
  arXiv 1802.01483), relative to the start's size so one weight means the same for every
  granularity (a per-module fit has 2 coefficients per module, `core` 1024).
- ``EarlyStopping``: the objective on held-out rows every ``every`` steps (and before the
  first), keeping a copy of the parameters at the best value seen; ``restore`` puts that copy
  back at the end.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class StartPenalty:
    """``weight`` times the squared change of ``params`` from their values at creation,
    relative to the start's squared norm: at weight 1, moving 50% of the start's norm costs
    0.25 in units of the objective (nats per token for the LM loss or the per-token KL).

    params: the trainable tensors (any shapes; compared in fp32); raises ValueError when the
    start is all zeros (nothing to be relative to: a fresh LoRA's B).
    """

    def __init__(self, params: dict[str, torch.Tensor], weight: float):
        self.params = params
        self.start = {name: p.detach().float().clone() for name, p in params.items()}
        self.weight = weight
        self.norm = float(sum((s**2).sum() for s in self.start.values()))
        if self.norm == 0:
            raise ValueError("StartPenalty: the parameters start at zero")

    def __call__(self) -> torch.Tensor:
        """The penalty, a 0-dim fp32 tensor carrying gradients to the parameters."""
        total = sum(((p.float() - self.start[n]) ** 2).sum() for n, p in self.params.items())
        return self.weight * total / self.norm


class EarlyStopping:
    """Keep the parameters at the best held-out objective seen every ``every`` steps.

    evaluate: a function of no arguments returning the held-out objective (lower is better);
    ``history`` lists ``(step, value)``, step 0 being the start.
    """

    def __init__(self, params: dict[str, torch.Tensor], evaluate: Callable[[], float], every: int):
        self.params = params
        self.evaluate = evaluate
        self.every = every
        self.history: list[tuple[int, float]] = []
        self.best_step, self.best_value, self.best = 0, float("inf"), {}
        self.check(0)

    def check(self, step: int) -> None:
        """Evaluate after ``step`` optimizer steps when due (every ``every``, and step 0)."""
        if step % self.every:
            return
        value = self.evaluate()
        self.history.append((step, round(value, 4)))
        if value < self.best_value:
            self.best_step, self.best_value = step, value
            self.best = {name: p.detach().clone() for name, p in self.params.items()}

    def restore(self) -> None:
        """Put the best parameters back (in place)."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.best[name])
