"""The static merge methods `axolotl-cat merge` offers, one small record each behind a registry
(as mergekit's merge methods): PEFT's add_weighted_adapter `combination_type`, the paper, and
what the method needs of the skills. merges.py runs them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import CatError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeMethod:
    """One static merge: PEFT's add_weighted_adapter `combination_type` and what it needs."""

    name: str
    combination_type: str  # PEFT's name for it
    paper: str  # where the method comes from
    equal_ranks: bool = False  # combines the factors themselves: one rank for every skill
    density: bool = False  # prunes (ties) or drops (dare) a fraction of the entries
    rebuilds_delta: bool = False  # SVD of the combined ΔW: the rank can change


_TASK_ARITHMETIC = "Task arithmetic, Ilharco et al., arXiv 2212.04089"
_TIES = "TIES-Merging, Yadav et al., arXiv 2306.01708"
_DARE = "DARE, Yu et al., arXiv 2311.03099"

METHODS = {
    method.name: method
    for method in (
        MergeMethod("linear", "linear", _TASK_ARITHMETIC, equal_ranks=True),
        # the skills' factors side by side with fixed weights: the static sum Σ w_i s_i B_i A_i
        # (CAT learns these weights, per module)
        MergeMethod("concat", "cat", _TASK_ARITHMETIC),
        MergeMethod("ties", "ties", _TIES, equal_ranks=True, density=True),
        MergeMethod("dare_linear", "dare_linear", _DARE, equal_ranks=True, density=True),
        MergeMethod("dare_ties", "dare_ties", f"{_DARE}; {_TIES}", equal_ranks=True, density=True),
        MergeMethod("svd", "svd", _TASK_ARITHMETIC, rebuilds_delta=True),
    )
}
# names that still work, with a deprecation warning: `cat` (PEFT's combination_type) read as
# the learned CAT of this package
RENAMED_METHODS = {"cat": "concat"}


def method_named(name: str) -> MergeMethod:
    """The registered method called `name`; a deprecated name (RENAMED_METHODS) logs a warning
    and gives its successor. Raises CatError listing the methods for an unknown name."""
    if name in RENAMED_METHODS:
        LOG.warning(
            "merge method %r is deprecated and will be removed in a future release: it is "
            "PEFT's fixed-weight concatenation, not the learned CAT; use %r",
            name,
            RENAMED_METHODS[name],
        )
        name = RENAMED_METHODS[name]
    if name not in METHODS:
        raise CatError(f"unknown merge method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]
