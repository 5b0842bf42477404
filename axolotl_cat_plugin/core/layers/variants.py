"""The kinds of wrapped layer CAT works on, one class each (PEFT's LoraVariant pattern).

A kind says how a PEFT LoRA layer of its type takes CAT: how the skills' factors are
loaded into it, how it computes the update (a LoraVariant for Linear and Embedding layers,
linear.py and embedding.py; a replaced delta for a ParamWrapper on MoE expert parameters,
experts.py), how its factors read for the fold, under which keys PEFT saves them, how the
folded factors are set back and how CAT is torn down. attach (through the granularities),
fold and apply_export ask `kind_of(layer)`; nothing else asks which kind a layer is.

`MODULE_KINDS` is the second, smaller registry: kinds of *whole module* CAT composes beside
the LoRA layers, today the modules saved in full (`modules_to_save`, saved_modules.py
SavedModuleKind). They are not LoRA layers (PEFT's ModulesToSaveWrapper has no factors, rank
slots or LoraVariant, and get_peft_model wraps it from the config's `modules_to_save`), so
their verbs take the skills and the model: `check(skills, base)`, `modules_to_save(skills)`,
`install(peft_model, skills, config)`, `set_static(state, weights)`, `fold(model)` ->
(tensors, record entries, modules_to_save names) and `teardown(model)`. attach, fold and
apply_export iterate over MODULE_KINDS; the static mixes reach `set_static` through each
state's `strategy`. A new whole-module kind (e.g. PEFT's trainable tokens) is one class and
one entry here.
"""

from __future__ import annotations

import torch
from torch import nn

from ..format import peft_key
from ..state import ADAPTER, CatState, put_state, remove_state
from .embedding import CatEmbeddingVariant, factor_weights, is_embedding, set_factors
from .experts import (
    NESTED,
    install_delta,
    is_parameter_wrapper,
    peft_layout,
    per_expert,
    remove_delta,
)
from .experts import load_factors as load_expert_factors
from .linear import CatLinearVariant
from .saved_modules import SavedModuleKind


class LinearKind:
    """PEFT's LoRA Linear (and Conv1D) layer: lora_A (R, in), lora_B (out, R) as nn.Linear;
    CAT's forward through CatLinearVariant. The base class of the other kinds."""

    # PEFT's embedding factors are parameters, initialised the other way round (export/compress.py)
    embedding = False

    def matches(self, layer) -> bool:
        """Whether `layer` is of this kind (the Linear kind takes any other LoRA layer)."""
        return True

    def variant(self):
        """The LoraVariant computing CAT's forward and merges on this kind."""
        return CatLinearVariant()

    def install(self, layer, state: CatState) -> None:
        """Give the layer its CatState and CAT's computation in place of PEFT's."""
        put_state(layer, state)
        layer.lora_variant[ADAPTER] = self.variant()
        layer.cast_input_dtype_enabled = False  # the variant casts the factors instead

    def factors(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A, B) factor parameters themselves: (R, in), (out, R)."""
        return factor_weights(layer, ADAPTER)

    def load_factors(self, layer, plan, rank: int) -> None:
        """Write the skills' factors concatenated in slot order (plan.blocks), zeros after."""
        lora_A, lora_B = self.factors(layer)
        with torch.no_grad():
            lora_A.zero_()
            lora_B.zero_()
            offset = 0
            for _, factors in plan.blocks:
                lora_A[offset : offset + factors.rank] = factors.lora_A.to(lora_A)
                lora_B[:, offset : offset + factors.rank] = factors.lora_B.to(lora_B)
                offset += factors.rank

    def stacked(self, layer, lora_A: torch.Tensor, lora_B: torch.Tensor):
        """The factors with any experts stacked in front (unchanged here): (R, in), (out, R)."""
        return lora_A, lora_B

    def saved(self, name: str, path: str, lora_A: torch.Tensor, lora_B: torch.Tensor):
        """(key_A, key_B), (lora_A, lora_B) as PEFT saves folded factors (stacked layout in):
        name: the module's CAT name; path: the layer's path in the model."""
        return self.keys(name, path), (lora_A, lora_B)

    def keys(self, name: str, path: str) -> tuple[str, str]:
        """PEFT's keys of the layer's factors (see `saved`)."""
        return peft_key(name, "A", self.embedding), peft_key(name, "B", self.embedding)

    def set_folded(self, layer, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Replace the factors by frozen copies of folded ones (PEFT's saved layout)."""
        layer.lora_A[ADAPTER] = _frozen_linear(lora_A)
        layer.lora_B[ADAPTER] = _frozen_linear(lora_B)

    def teardown(self, layer) -> None:
        """Leave a plain PEFT LoRA layer: PEFT's computation back, no CAT state."""
        layer.lora_variant.pop(ADAPTER, None)
        remove_state(layer)


class EmbeddingKind(LinearKind):
    """PEFT's LoRA Embedding: lora_embedding_A (R, V), lora_embedding_B (D, R) parameters;
    CAT's lookup through CatEmbeddingVariant."""

    embedding = True

    def matches(self, layer) -> bool:
        """PEFT's LoRA Embedding layer."""
        return is_embedding(layer)

    def variant(self):
        """CatEmbeddingVariant."""
        return CatEmbeddingVariant()

    def set_folded(self, layer, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Frozen parameters, as PEFT keeps an embedding's factors."""
        set_factors(layer, lora_A, lora_B, ADAPTER)


class ExpertKind(LinearKind):
    """PEFT's ParamWrapper (LoRA on a parameter, MoE experts stacked): lora_A (R·E, in),
    lora_B (out, R·E), read per expert as (E, R, in), (E, out, R); its delta is replaced."""

    def matches(self, layer) -> bool:
        """PEFT's ParamWrapper."""
        return is_parameter_wrapper(layer)

    def install(self, layer, state: CatState) -> None:
        """The CatState, and CAT's delta in place of PEFT's (no variant hook here)."""
        put_state(layer, state)
        install_delta(layer)
        layer.cast_input_dtype_enabled = False

    def load_factors(self, layer, plan, rank: int) -> None:
        """Per expert, in PEFT's ParamWrapper layout (experts.load_factors)."""
        load_expert_factors(layer, plan, rank)

    def stacked(self, layer, lora_A: torch.Tensor, lora_B: torch.Tensor):
        """(E, R, in), (E, out, R)."""
        return per_expert(lora_A, lora_B, layer.num_experts)

    def keys(self, name: str, path: str) -> tuple[str, str]:
        """`<module>(.base_layer)*.lora_A.weight`, the nesting read off the layer's path."""
        depth = 0
        while path.endswith(NESTED * (depth + 1)):
            depth += 1
        saved = name.rpartition(".")[0] + NESTED * depth
        return peft_key(saved, "A"), peft_key(saved, "B")

    def saved(self, name: str, path: str, lora_A: torch.Tensor, lora_B: torch.Tensor):
        """Stacked (E, r, in), (E, out, r) -> PEFT's (r·E, in), (out, r·E)."""
        return self.keys(name, path), peft_layout(lora_A, lora_B)

    def teardown(self, layer) -> None:
        """PEFT's own delta back, no CAT state."""
        remove_delta(layer)
        remove_state(layer)


KINDS = (ExpertKind(), EmbeddingKind(), LinearKind())  # the first that matches
# kinds of whole module composed beside the LoRA layers, in this order (module docstring)
MODULE_KINDS = (SavedModuleKind(),)


def kind_of(layer) -> LinearKind:
    """The kind of a PEFT LoRA layer (Linear takes whatever the others do not)."""
    return next(kind for kind in KINDS if kind.matches(layer))


def use_cat_variant(layer, state: CatState) -> None:
    """Give a layer its CatState and CAT's computation in place of PEFT's LoRA forward."""
    kind_of(layer).install(layer, state)


def load_factors(layer, plan, rank: int) -> None:
    """Write the skills' factors concatenated in slot order (plan.blocks) into the layer's
    rank-`rank` adapter, zeros after them (per expert on a ParamWrapper)."""
    kind_of(layer).load_factors(layer, plan, rank)


def _frozen_linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    linear.weight = nn.Parameter(weight.clone(), requires_grad=False)
    return linear
