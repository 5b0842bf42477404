"""Granularity `core`: learn the full R x R core of a module in the skills' joint subspace.

For one module with skills i = 1..K (factors A_i (r_i x d_in), B_i (d_out x r_i), scaling
s_i), stack B = [s_1 B_1 ... s_K B_K] (d_out x R_m) and A = [A_1; ...; A_K] (R_m x d_in),
and take orthonormal bases of their column spaces *at their numerical rank* (`span_basis`):
Q_B (d_out x k_B) and Q_A (d_in x k_A), with R_B = Q_Bᵀ B (k_B x R_m) and
R_A = Q_Aᵀ Aᵀ (k_A x R_m), so that B = Q_B R_B and Aᵀ = Q_A R_A. Then

    Σ_i s_i B_i A_i = B A = Q_B (R_B R_Aᵀ) Q_Aᵀ,

so the plain sum of the skills is the core C0 = R_B R_Aᵀ between two orthonormal bases. CAT
with granularity `core` keeps Q_Aᵀ as lora_A and Q_B as lora_B and learns the core M (fp32,
R x R, started at init · C0):

    ΔW = Q_B M Q_Aᵀ,   y = base(x) + Q_B (M (Q_Aᵀ x)).

The update never leaves the span of the skills' own factors; per-module, per-rank and
per-skill weighting are the special cases M = R_B diag(w) R_Aᵀ. The export is the exact
rank-R adapter lora_B = Q_B M, lora_A = Q_Aᵀ (scaling 1).

Why the numerical rank and not a reduced QR: when the skills' factors are rank-deficient (an
untrained skill, lora_B = 0; a skill listed twice; skills fine-tuned from one another), a
reduced QR still returns R_m orthonormal columns, the extra ones pointing anywhere, and a
learned M then moves the update out of the skills' span. With k_B, k_A the numerical ranks,
M acts on the true span only; rows and columns of M beyond them meet zero factors (no effect,
no gradient), and the export keeps max(k_B, k_A) directions (`kept_directions` in the record).

The core of skill i alone is C_i = R_B[:, i] R_A[:, i]ᵀ (its columns only). What a fitted
core says per skill is the least-squares answer to "which weights c make Σ_i c_i C_i closest
to M": c = G⁻¹ b with G_ij = <C_i, C_j>, b_i = <M, C_i> (Frobenius products, which the
orthonormal bases preserve, so this is the same question about the d_out x d_in updates).
At the start c_i = init for every skill; `residual` = ‖M - Σ c_i C_i‖ / ‖M‖ says how much of
the fitted core no per-skill weighting can express.

Sources: LoRA Soups (arXiv 2410.13025) for CAT; the shared QR basis follows KnOTS (ICLR 2025)
and Core Space merging (NeurIPS 2025), which merge in that basis with fixed rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CoreFactors:
    """One module's factors in the joint basis, padded to the adapter's rank R.

    lora_A: (R, d_in), rows Q_Aᵀ then zeros. lora_B: (d_out, R), columns Q_B then zeros.
    skill_cores: (K, R, R) float32, C_i of every skill (zero for skills absent here).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    skill_cores: torch.Tensor

    @property
    def kept(self) -> int:
        """max(k_A, k_B): the directions of the joint span the module keeps (its export rank)."""
        rows = (self.lora_A.abs().sum(1) != 0).sum()
        columns = (self.lora_B.abs().sum(0) != 0).sum()
        return int(max(rows, columns))

    @property
    def initial_core(self) -> torch.Tensor:
        """C0 = Σ_i C_i, the plain sum of the skills, (R, R) float32."""
        return self.skill_cores.sum(0)


# A direction is kept when its singular value, in the stacked factor with unit columns, is
# above this times the number of columns: the factors are float32 at best (eps 1.19e-7), so
# anything below is rounding, not a direction a skill learned
RANK_TOLERANCE = torch.finfo(torch.float32).eps


def span_basis(matrix: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the column space of `matrix` at its numerical rank.

    matrix: (d, n) float64. The numerical rank k: each column scaled to unit norm (zero
    columns dropped), so a skill's overall scale does not decide whether its directions count,
    then the singular values above n · RANK_TOLERANCE counted. At full rank (k = min(d, n))
    the basis is the reduced QR's Q, as in earlier releases, so a recorded core still means what it
    meant; below it, the k leading left singular vectors of the unit-column matrix. Returns Q
    (d, k) float64 with QᵀQ = I (k = 0 for a zero matrix).
    """
    norms = matrix.norm(dim=0)
    unit = matrix[:, norms > 0] / norms[norms > 0]
    if unit.shape[1] == 0:
        return matrix.new_zeros(matrix.shape[0], 0)
    u, s, _ = torch.linalg.svd(unit, full_matrices=False)
    keep = int((s > matrix.shape[1] * RANK_TOLERANCE).sum())
    if keep == min(matrix.shape):
        return torch.linalg.qr(matrix)[0]
    return u[:, :keep]


def core_factors(blocks, num_skills: int, rank: int) -> CoreFactors:
    """The joint basis and the skills' cores of one module.

    blocks: [(skill index, SkillModule)] in skill order (factors lora_A (r_i, d_in),
    lora_B (d_out, r_i), scaling s_i). rank: the adapter's rank R >= Σ r_i.
    Computed in float64; the bases come out float32. The bases have the factors' numerical
    rank (span_basis), so lora_A has k_A non-zero rows and lora_B k_B non-zero columns.
    """
    lora_A = torch.cat([factors.lora_A.double() for _, factors in blocks])
    lora_B = torch.cat([factors.lora_B.double() * factors.scaling for _, factors in blocks], 1)
    q_B = span_basis(lora_B)  # (d_out, k_B)
    q_A = span_basis(lora_A.t())  # (d_in, k_A)
    r_B, r_A = q_B.t() @ lora_B, q_A.t() @ lora_A.t()  # (k_B, R_m), (k_A, R_m)
    d_out, d_in = lora_B.shape[0], lora_A.shape[1]
    padded_A = torch.zeros(rank, d_in, dtype=torch.float64)
    padded_B = torch.zeros(d_out, rank, dtype=torch.float64)
    padded_A[: q_A.shape[1]] = q_A.t()
    padded_B[:, : q_B.shape[1]] = q_B
    cores = torch.zeros(num_skills, rank, rank, dtype=torch.float64)
    offset = 0
    for skill_index, factors in blocks:
        columns = slice(offset, offset + factors.rank)
        cores[skill_index, : r_B.shape[0], : r_A.shape[0]] = r_B[:, columns] @ r_A[:, columns].t()
        offset += factors.rank
    return CoreFactors(padded_A.float(), padded_B.float(), cores.float())


def skill_weights(core: torch.Tensor, skill_cores: torch.Tensor, present: torch.Tensor):
    """Per-skill weights that best explain a core, and what they leave unexplained.

    core: (R, R). skill_cores: (K, R, R). present: (K,) bool, the skills on this module.
    Returns (c, residual): c (K,) float64 with 0 for absent skills, and
    ‖core - Σ c_i C_i‖ / ‖core‖ (0 for a zero core). Least squares in float64; a rank-
    deficient Gram matrix (two identical skills) takes the minimum-norm solution.
    """
    core = core.detach().double().cpu()
    present = present.cpu()
    cores = skill_cores.detach().double().cpu()[present]
    gram = torch.einsum("iab,jab->ij", cores, cores)
    products = torch.einsum("iab,ab->i", cores, core)
    solution = torch.linalg.lstsq(gram, products[:, None], driver="gelsd").solution[:, 0]
    weights = torch.zeros(skill_cores.shape[0], dtype=torch.float64)
    weights[present] = solution
    norm = core.norm()
    rest = core - torch.einsum("i,iab->ab", solution, cores)
    residual = float(rest.norm() / norm) if norm > 0 else 0.0
    return weights, residual
