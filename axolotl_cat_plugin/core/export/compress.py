"""The exported factors' shape: padded to the adapter's rank, compressed by an exact truncated
SVD, and no rank slot left zero in both factors (so the export can be trained further).

fold.py folds the coefficients in and then uses these on every module's (lora_A, lora_B):
lora_A (..., r, d_in), lora_B (..., d_out, r), stacked experts leading with E.
"""

from __future__ import annotations

import math
import zlib

import torch

# the seed of init_idle_slots (with the module's name): the same export every time
IDLE_SLOT_SEED = 0


def init_idle_slots(name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, embedding=False):
    """Give the rank slots whose lora_A row and lora_B column are both zero PEFT's own
    initialisation, so the export can be trained further (PeftModel.from_pretrained(...,
    is_trainable=True)) without changing what it computes.

    A slot zero in both factors is a saddle no gradient leaves (each factor's gradient is a
    product with the other); PEFT's init keeps the update zero with one factor random
    (LoraLayer.reset_lora_parameters, init_lora_weights=True): a Linear's (or expert's) lora_A
    row kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)), and lora_B zero;
    an embedding's lora_embedding_B column N(0, 1) and lora_embedding_A zero. lora_A: (..., r,
    d_in), lora_B: (..., d_out, r) (stacked experts lead with E). Seeded by IDLE_SLOT_SEED and
    the module's name (crc32), so an export is reproducible and independent of module order.
    Returns new tensors (the inputs are not modified).
    """
    idle = (lora_A.abs().sum(-1) == 0) & (lora_B.abs().sum(-2) == 0)  # (..., r)
    if not idle.any():
        return lora_A, lora_B
    generator = torch.Generator().manual_seed(IDLE_SLOT_SEED * 2**32 + zlib.crc32(name.encode()))
    if embedding:  # PEFT: lora_embedding_A zero, lora_embedding_B normal
        noise = torch.randn(lora_B.mT.shape, generator=generator, dtype=torch.float32)
        lora_B = torch.where(idle[..., None], noise.to(lora_B), lora_B.mT).mT
        return lora_A, lora_B
    bound = 1.0 / math.sqrt(lora_A.shape[-1])  # kaiming_uniform_(a=sqrt(5)) on (r, d_in)
    noise = torch.rand(lora_A.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound
    lora_A = torch.where(idle[..., None], noise.to(lora_A), lora_A)
    return lora_A, lora_B


def compress(lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int):
    """Best rank-`rank` factors of ΔW = B A, and the relative Frobenius error.

    QR of both factors and an SVD of the small r x r core: the d_out x d_in matrix is never
    formed, so an 8B model's modules compress in seconds. Stacked experts, lora_A (E, r, in)
    and lora_B (E, out, r), compress each expert to `rank`; the error is the whole stack's.
    """
    if lora_A.shape[-2] == 0:
        return lora_A, lora_B, 0.0
    q_B, r_B = torch.linalg.qr(lora_B.double())
    q_A, r_A = torch.linalg.qr(lora_A.double().mT)
    u, s, vh = torch.linalg.svd(r_B @ r_A.mT)
    k = min(rank, s.shape[-1])
    root = s[..., :k].sqrt()
    new_B = (q_B @ u[..., :k]) * root[..., None, :]
    new_A = root[..., None] * (vh[..., :k, :] @ q_A.mT)
    total = float(s.square().sum())
    error = math.sqrt(float(s[..., k:].square().sum()) / total) if total > 0 else 0.0
    return new_A.float(), new_B.float(), error


def pad_rows(matrix: torch.Tensor, missing: int) -> torch.Tensor:
    """`missing` zero rows after the last (of every expert, for stacked (E, r, in) factors)."""
    if missing <= 0:
        return matrix
    zeros = matrix.new_zeros(*matrix.shape[:-2], missing, matrix.shape[-1])
    return torch.cat([matrix, zeros], dim=-2)
