"""CAT on PEFT's LoRA Embedding layer (a LoRA on `embed_tokens` or any nn.Embedding).

PEFT's embedding LoRA (peft/tuners/lora/layer.py, class Embedding) keeps its factors as
parameters: lora_embedding_A (r, num_embeddings) and lora_embedding_B (embedding_dim, r), and
adds `scaling * (B A)^T` to the embedding table:

    y = E[x] + scaling * (A^T[x] @ B^T)      (get_delta_weight: transpose(B @ A) * scaling)

So a skill's update has the same algebra as on a Linear layer with d_in = num_embeddings and
d_out = embedding_dim, and CAT composes it the same way: A = [A_1; ...; A_K] (R, V),
B = [B_1 ... B_K] (D, R), w the slot weights c·s, and

    y = E[x] + (A^T[x] ⊙ w) @ B^T     one embedding lookup of A and one B matmul.

The variant plugs into PEFT's LoraVariant hook of the Embedding layer, as DoRA's
DoraEmbeddingVariant does; the export is the standard lora_embedding_A / lora_embedding_B pair.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Embedding, LoraVariant

from ..state import state_of
from .linear import DeltaMerges


def is_embedding(layer) -> bool:
    """Whether `layer` is PEFT's LoRA Embedding layer."""
    return isinstance(layer, Embedding)


def factor_weights(layer, adapter: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """The (A, B) factor tensors of a PEFT LoRA layer, Linear or Embedding.

    A: (r, d_in) (for an embedding: (r, num_embeddings)); B: (d_out, r) (embedding_dim, r).
    These are the parameters themselves (writing into them changes the layer).
    """
    if is_embedding(layer):
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def factor_names(layer) -> tuple[str, str]:
    """The names PEFT saves the factors under: ('lora_A.weight', 'lora_B.weight') on a Linear,
    ('lora_embedding_A', 'lora_embedding_B') on an Embedding (parameters, no '.weight')."""
    if is_embedding(layer):
        return "lora_embedding_A", "lora_embedding_B"
    return "lora_A.weight", "lora_B.weight"


def set_factors(layer, lora_A: torch.Tensor, lora_B: torch.Tensor, adapter: str = "default"):
    """Replace an Embedding layer's factors by frozen copies of these (for apply_export)."""
    layer.lora_embedding_A[adapter] = torch.nn.Parameter(lora_A.clone(), requires_grad=False)
    layer.lora_embedding_B[adapter] = torch.nn.Parameter(lora_B.clone(), requires_grad=False)


def delta_weight(layer, adapter: str = "default") -> torch.Tensor:
    """ΔE = (B diag(w) A)^T, fp32, shape (num_embeddings, embedding_dim), as the table."""
    lora_A, lora_B = factor_weights(layer, adapter)
    return ((lora_B.float() * state_of(layer).slot_weights()) @ lora_A.float()).t()


class CatEmbeddingVariant(DeltaMerges, LoraVariant):
    """CAT's forward and merges on PEFT's LoRA Embedding layer (see the module docstring)."""

    @staticmethod
    def init(module, adapter_name, **kwargs) -> None:
        """Nothing: attach_cat installs the layer's CatState itself (PEFT's hook requires it)."""

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs) -> torch.Tensor:
        """result (..., D, the base's lookup) + (A^T[x] ⊙ w) B^T; x: token ids (...,)."""
        lora_A, lora_B = factor_weights(module, active_adapter)
        hidden = module._embed(x, lora_A.t()) * state_of(module).slot_weights()  # (..., R), fp32
        update = hidden.to(result.dtype) @ lora_B.t().to(result.dtype)
        embed_scale = module._get_embed_scale()  # Gemma-style scaled embeddings, as PEFT does
        if embed_scale is not None:
            update = update * embed_scale.to(update.dtype)
        return result + update

    delta = staticmethod(delta_weight)  # ΔW for DeltaMerges
