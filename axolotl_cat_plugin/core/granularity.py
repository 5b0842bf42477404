"""How CAT's coefficients are shaped (granularity) and read (parametrization): their one home.

The config's choices and checks, the CLI, cat_coefficients.json, the model card and
`axolotl-cat inspect` all take the names and descriptions from here. Torch-free: the
parametrizations compute with the methods of the tensors they are given, so the viewer
imports this without torch.

LoRA Soups (arXiv 2410.13025) learns one coefficient per skill per module (`module`); the
others are this package's coarser and finer variants of the same ΔW = Σ_i c_i s_i B_i A_i.
"""

from __future__ import annotations

import logging
import re
from enum import StrEnum

from .errors import CatError

LOG = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_index(module_name: str) -> int | None:
    """The decoder layer of a module (the first `.N.` in its name:
    'model.layers.3.mlp.up_proj' -> 3); None outside the numbered layers (lm_head, ...)."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


class _Choice(StrEnum):
    """A config choice: a StrEnum (a member equals, and serialises as, its name) with a lookup
    that names the config key on a mistake and reads a renamed value with a warning."""

    @classmethod
    def parse(cls, value, key: str | None = None):
        """The member named `value` (a member passes through). A name this option had before
        (_RENAMED) gives its successor and logs a deprecation warning. Raises CatError naming
        `key` (default `cat_merge.<option>`) and the choices for anything else."""
        key = key or f"cat_merge.{cls.__name__.lower()}"
        if isinstance(value, cls):
            return value
        renamed = _RENAMED.get(cls.__name__, {})
        if isinstance(value, str) and value in renamed:
            LOG.warning(
                "%s: %r is deprecated and will be removed in a future release; it means %r now",
                key,
                value,
                renamed[value],
            )
            return cls(renamed[value])
        try:
            return cls(value)
        except (ValueError, TypeError):
            raise CatError(f"{key}: {value!r} is not one of {cls.names()}") from None

    @classmethod
    def names(cls) -> list[str]:
        """The members' names, in order (the config's choices)."""
        return [member.value for member in cls]


class Granularity(_Choice):
    """Which modules share a coefficient, and what one coefficient weights.

    A StrEnum: a member equals (and serialises as) its name, e.g. Granularity.MODULE == "module".
    """

    MODULE = "module"
    LAYER = "layer"
    MODEL = "model"
    RANK = "rank"
    CORE = "core"

    @property
    def description(self) -> str:
        """What is learned, in words (config docs, the model card, inspect)."""
        return _DESCRIPTIONS[self]

    @property
    def per_rank(self) -> bool:
        """Whether coefficients have a row per rank-1 component of the skills."""
        return self is Granularity.RANK

    def group(self, module_name: str) -> str:
        """The key of the coefficients a module shares: the module itself, its decoder layer
        (`layer`: the first `.N.` in its name; a module outside the decoder layers keeps its
        own) or one for the whole model (`model`)."""
        if self is Granularity.MODEL:
            return "model"
        if self is Granularity.LAYER:
            index = layer_index(module_name)
            return module_name if index is None else f"layer {index}"
        return module_name


# old names that still read, per option (a config warns; a record written under an old name
# is read as the new one, see format.read_record_file)
_RENAMED = {"Granularity": {"adapter": "model"}}

_DESCRIPTIONS = {
    Granularity.MODULE: "one coefficient per skill for every LoRA-wrapped module (the paper's)",
    Granularity.LAYER: "one coefficient per skill for every decoder layer",
    Granularity.MODEL: "one coefficient per skill for the whole model",
    Granularity.RANK: "one coefficient for every rank-1 component of every skill on every module",
    Granularity.CORE: "a full R x R core per module in the skills' joint subspace",
}


def current_name(granularity):
    """A granularity name as this release spells it (`adapter` -> `model`); other values as
    given. For records, which are read without a warning."""
    if not isinstance(granularity, str):
        return granularity
    return _RENAMED["Granularity"].get(granularity, granularity)


class Parametrization(_Choice):
    """How the learned parameters alpha become the coefficients c.

    `free`: c = alpha, starting at `init`. `softmax`: c = softmax of alpha over the skills
    present in each group (a convex combination), starting uniform.
    """

    FREE = "free"
    SOFTMAX = "softmax"

    def coefficients(self, alpha, present):
        """c from alpha. alpha: fp32 (groups, K); present: bool (groups, K), the skills a
        group holds. Absent skills get c = 0 under softmax; `free` returns alpha itself."""
        if self is Parametrization.FREE:
            return alpha
        logits = alpha.masked_fill(~present, float("-inf"))
        return logits.softmax(dim=-1).masked_fill(~present, 0.0)

    def inverse(self, c):
        """An alpha with coefficients(alpha) = c (for softmax: where the group's c sum to 1,
        as a softmax fit records them). c: fp32 tensor of any shape."""
        if self is Parametrization.FREE:
            return c
        return c.clamp_min(1e-12).log()

    def initial(self, init: float) -> float:
        """The value every alpha starts at: `init` (free) or 0, i.e. uniform (softmax)."""
        return float(init) if self is Parametrization.FREE else 0.0
