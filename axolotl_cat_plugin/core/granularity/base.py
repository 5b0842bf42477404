"""What a granularity is, the registry of them, and the parametrizations. Torch-free.

A granularity says which modules share a coefficient and what one coefficient weights. Each
is one `GranularityStrategy` subclass registered under its YAML name (`register_granularity`),
the way mergekit registers its merge methods: the class declares its labels (the config's
description, what the card and `axolotl-cat inspect` count over, the heatmap's note), its
rules (which parametrizations, whether the export may prune, whether FSDP can shard it), and
implements the grouping, the coefficients' shape and start, the per-layer state, the fold
and the record entry. Nothing else in the package branches on a granularity's name.

The declarations and the torch-free methods are what the config, the card, the plot and the
viewer read; the torch methods import what they need when called, so this module and the
built-in strategies import without torch (`axolotl-cat inspect`).

LoRA Soups (arXiv 2410.13025) learns one coefficient per skill per module (`module`); the
others are this package's coarser and finer variants of the same ΔW = Σ_i c_i s_i B_i A_i.
"""

from __future__ import annotations

import logging
import re
from enum import StrEnum
from typing import ClassVar

from ..errors import CatError

LOG = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_index(module_name: str) -> int | None:
    """The decoder layer of a module (the first `.N.` in its name:
    'model.layers.3.mlp.up_proj' -> 3); None outside the numbered layers (lm_head, ...)."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


class GranularityStrategy:
    """One granularity: its labels, its rules, and how it shapes, starts and folds coefficients.

    Subclass it, set `name` (the YAML value), `description` and `source`, implement the torch
    methods (see the built-ins in slots.py and joint_core.py) and register an instance with
    `register_granularity`. A subclass of slots.SlotGranularity that only overrides `group`
    is a new way of sharing one coefficient per skill.
    """

    name: ClassVar[str] = ""
    # what is learned, in words (the config's description, the model card, inspect)
    description: ClassVar[str] = ""
    # where the method comes from (a paper or a link)
    source: ClassVar[str] = ""
    # what the card and `inspect` count a skill's coefficients over
    over: ClassVar[str] = "modules"
    # added to the heatmap's title (how a module's values were reduced to one number)
    plot_note: ClassVar[str] = ""
    # the parametrizations it can be learned with, and why not the others (None: all)
    parametrizations: ClassVar[tuple[str, ...] | None] = None
    parametrization_refusal: ClassVar[str] = "cannot be learned with it"
    # why the export's prune_threshold cannot apply (None: it can)
    prune_refusal: ClassVar[str | None] = None
    # whether one coefficient is shared by every decoder layer (FSDP cannot shard it per layer)
    shared_across_layers: ClassVar[bool] = False
    # False: its states weight a LoRA layer's rank slots (a whole-module kind's are True,
    # state.CatState.saved_module)
    whole_module: ClassVar[bool] = False

    def group(self, module_name: str) -> str:
        """The key of the coefficients a module shares (default: its own)."""
        return module_name

    def check_parametrization(self, parametrization: str) -> None:
        """Raise CatError naming `cat_merge.parametrization` if this granularity cannot be
        learned with `parametrization`."""
        allowed = self.parametrizations
        if allowed is not None and parametrization not in allowed:
            raise CatError(
                f"cat_merge.parametrization: granularity {self.name} "
                f"{self.parametrization_refusal}; use parametrization {' or '.join(allowed)}, "
                f"not '{parametrization}'"
            )

    def card_note(self, record) -> str | None:
        """A paragraph the model card adds under the coefficients table (None: nothing);
        record: the export's format.CatRecord."""
        return None

    def refuse(self, plans, parameters) -> None:
        """Raise CatError for layers this granularity cannot shape (default: none).
        plans: plan.ModulePlan of the wrapped modules; parameters: plan.ParameterPlan of the
        LoRAs on MoE expert parameters."""

    def install(self, layers: dict, plans, skills, config, starting: dict, rank: int) -> None:
        """Give every planned layer its CatState and CAT variant (torch).

        layers: module (or parameter) name -> PEFT LoRA layer; plans: the planned modules
        (plan.ModulePlan / ParameterPlan); skills: the loaded skills in config order; config:
        the CatConfig; starting: per module, what `read_start` returned; rank: R."""
        raise NotImplementedError(f"granularity {self.name} does not implement install")

    def read_start(self, modules: dict, path) -> dict[str, dict]:
        """Per module, the starting values a cat_coefficients.json's `modules` records (what
        `install` receives as `starting`). Raises CatError naming `path` when unusable."""
        raise NotImplementedError(f"granularity {self.name} does not implement read_start")

    def mix(self, state):
        """How a layer's rank slots are mixed in the forward, fp32: w (R,) or a matrix (R, R)."""
        raise NotImplementedError(f"granularity {self.name} does not implement mix")

    def fold_layer(self, layer, state, prune_threshold):
        """(lora_A, lora_B, record entry) of one weighted layer, the coefficients folded in
        (fp32; stacked (E, r, in) / (E, out, r) on expert parameters). Raises CatError on
        non-finite coefficients."""
        raise NotImplementedError(f"granularity {self.name} does not implement fold_layer")

    def skill_values(self, state) -> dict[str, list[float]]:
        """Every effective coefficient of each skill on one weighted layer (logs, cards)."""
        raise NotImplementedError(f"granularity {self.name} does not implement skill_values")

    def set_static(self, state, weights):
        """Overwrite a layer's coefficients so that it computes Σ_i weights[i] s_i B_i A_i
        (weights: fp32 (K,), on the coefficients' device). Returns a callable that restores
        whatever else it changed (the coefficients themselves are restored by the caller)."""
        raise NotImplementedError(f"granularity {self.name} does not implement set_static")


_REGISTRY: dict[str, GranularityStrategy] = {}

# the paper's (slots.ModuleGranularity): the config's default and an old record's
DEFAULT_GRANULARITY = "module"

# old names that still read (a config warns; a record written under an old name is read as
# the new one, see format.CatRecord.from_dict)
_RENAMED = {"adapter": "model"}


def register_granularity(strategy: GranularityStrategy) -> GranularityStrategy:
    """Make `strategy` available as `granularity: <strategy.name>` (the config, attach_cat,
    the export, the card). Returns it. Raises CatError for a missing name, or a name taken
    by another class."""
    name = strategy.name
    if not isinstance(name, str) or not name:
        raise CatError(f"{type(strategy).__name__}: a granularity needs a name")
    known = _REGISTRY.get(name)
    if known is not None and type(known) is not type(strategy):
        raise CatError(f"granularity {name!r} is already registered by {type(known).__name__}")
    _REGISTRY[name] = strategy
    return strategy


def granularity_names() -> list[str]:
    """The registered granularities' names, in registration order (the config's choices)."""
    return list(_REGISTRY)


def current_name(granularity):
    """A granularity name as this release spells it (`adapter` -> `model`); other values as
    given. For records, which are read without a warning."""
    if not isinstance(granularity, str):
        return granularity
    return _RENAMED.get(granularity, granularity)


def parse_granularity(value, key: str = "cat_merge.granularity") -> str:
    """The registered name `value` means (a strategy passes through as its name). A name it
    had before (`adapter`) gives its successor with a deprecation warning. Raises CatError
    naming `key` and the choices for anything else."""
    if isinstance(value, GranularityStrategy):
        value = value.name
    if isinstance(value, str) and value in _RENAMED:
        LOG.warning(
            "%s: %r is deprecated and will be removed in a future release; it means %r now",
            key,
            value,
            _RENAMED[value],
        )
        value = _RENAMED[value]
    if not isinstance(value, str) or value not in _REGISTRY:
        raise CatError(f"{key}: {value!r} is not one of {granularity_names()}")
    return str(value)


def granularity_named(name) -> GranularityStrategy:
    """The registered strategy called `name` (old names read). Raises CatError for others."""
    return _REGISTRY[parse_granularity(current_name(name))]


def granularity_labels(name) -> GranularityStrategy:
    """The strategy whose labels describe a record written with granularity `name`: the
    registered one, or the defaults for a name this process does not know (a record written
    with a granularity registered elsewhere)."""
    name = current_name(name)
    return _REGISTRY.get(name) if isinstance(name, str) and name in _REGISTRY else _UNKNOWN


_UNKNOWN = GranularityStrategy()


class Parametrization(StrEnum):
    """How the learned parameters alpha become the coefficients c.

    `free`: c = alpha, starting at `init`. `softmax`: c = softmax of alpha over the skills
    present in each group (a convex combination), starting uniform. A StrEnum: a member
    equals (and serialises as) its name.
    """

    FREE = "free"
    SOFTMAX = "softmax"

    @classmethod
    def parse(cls, value, key: str = "cat_merge.parametrization"):
        """The member named `value` (a member passes through). Raises CatError naming `key`
        and the choices for anything else."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except (ValueError, TypeError):
            raise CatError(f"{key}: {value!r} is not one of {cls.names()}") from None

    @classmethod
    def names(cls) -> list[str]:
        """The members' names, in order (the config's choices)."""
        return [member.value for member in cls]

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
