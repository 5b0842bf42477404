"""Granularities: which modules share a coefficient and what one coefficient weights.

One class per granularity behind a registry (base.py); the built-ins are registered here:
`module` (the paper's), `layer`, `model`, `rank` (slots.py) and `core` (joint_core.py, its
math in core_space.py). A new one is a GranularityStrategy subclass passed to
`register_granularity`, in or outside this package. Torch-free: the config, the card and
`axolotl-cat inspect` import it without torch.
"""

from __future__ import annotations

from .base import (
    DEFAULT_GRANULARITY,
    GranularityStrategy,
    Parametrization,
    current_name,
    granularity_labels,
    granularity_named,
    granularity_names,
    layer_index,
    parse_granularity,
    register_granularity,
)
from .joint_core import CoreGranularity
from .slots import (
    LayerGranularity,
    ModelGranularity,
    ModuleGranularity,
    RankGranularity,
    SlotGranularity,
)

for _strategy in (
    ModuleGranularity,
    LayerGranularity,
    ModelGranularity,
    RankGranularity,
    CoreGranularity,
):
    register_granularity(_strategy())

__all__ = [
    "DEFAULT_GRANULARITY",
    "CoreGranularity",
    "GranularityStrategy",
    "LayerGranularity",
    "ModelGranularity",
    "ModuleGranularity",
    "Parametrization",
    "RankGranularity",
    "SlotGranularity",
    "current_name",
    "granularity_labels",
    "granularity_named",
    "granularity_names",
    "layer_index",
    "parse_granularity",
    "register_granularity",
]
