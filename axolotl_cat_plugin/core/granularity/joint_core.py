"""The granularity `core`: a full R x R core per module in the skills' joint subspace.

The math (the basis, the skills' cores C_i, the least-squares per-skill weights) is
core_space.py's; this class is what the rest of the package asks of the granularity: it
loads the basis as factors and learns M as the coefficients (ΔW = Q_B M Q_Aᵀ), folds to
lora_B = Q_B M, lora_A = Q_Aᵀ, records M and the per-skill weights that best explain it, and
refuses what a joint basis cannot do (softmax, pruning, embeddings, expert parameters).

Torch-free at import; the torch methods import what they need when called.
"""

from __future__ import annotations

from .base import GranularityStrategy


class CoreGranularity(GranularityStrategy):
    """A learned R x R core M per module between orthonormal bases of the skills' factors."""

    name = "core"
    description = "a full R x R core per module in the skills' joint subspace"
    source = (
        "LoRA Soups (arXiv 2410.13025) for CAT; the shared basis follows KnOTS (ICLR 2025) "
        "and Core Space merging (NeurIPS 2025)"
    )
    plot_note = ", least-squares weights of the core"
    parametrizations = ("free",)
    parametrization_refusal = "learns a full matrix per module, which has no softmax form"
    prune_refusal = (
        "mixes every skill's directions in one core, so no skill can be dropped from a module"
    )

    def card_note(self, record) -> str | None:
        """How the per-skill weights of a core are read, and the largest residual."""
        residuals = [e["core_residual"] for e in record.modules.values() if "core_residual" in e]
        return (
            f"With granularity `{self.name}` a module's coefficients are the per-skill weights c "
            "that make Σ c_i s_i B_i A_i closest to the learned update (least squares); what no "
            "such weighting expresses is the core's residual, "
            f"{max(residuals, default=0.0):.3f} of its norm at most over modules "
            f"({sum(residuals) / max(len(residuals), 1):.3f} on average)."
        )

    def refuse(self, plans, parameters) -> None:
        """The joint basis is built for Linear modules only: no embedding LoRA, no LoRA on
        MoE expert parameters."""
        from ..errors import CatError

        embeddings = [plan.name for plan in plans if any(f.embedding for _, f in plan.blocks)]
        if embeddings:
            raise CatError(
                f"granularity {self.name} builds its joint basis for Linear modules only, and "
                f"these skills have embedding LoRAs on {embeddings[0]}; use granularity "
                "module, layer, model or rank with embedding skills"
            )
        if parameters:
            raise CatError(
                f"granularity {self.name} builds its joint basis for Linear modules only, and "
                f"these skills have LoRA on MoE expert parameters ({parameters[0].name}, "
                "target_parameters); use granularity module, layer, model or rank with expert "
                "skills"
            )

    def install(self, layers: dict, plans, skills, config, starting: dict, rank: int) -> None:
        """The joint basis as factors and the core M (started at init · C0, or the record's)
        as the coefficients of every planned module; nothing is shared."""
        for plan in plans:
            self._install(layers[plan.name], plan, skills, config, starting.get(plan.name), rank)

    def _install(self, layer, plan, skills, config, previous, rank) -> None:
        import torch
        from torch import nn

        from ..errors import CatError
        from ..layers.variants import use_cat_variant
        from ..state import ADAPTER, CatState
        from .core_space import core_factors

        device = layer.lora_A[ADAPTER].weight.device
        basis = core_factors(plan.blocks, len(skills), rank)
        with torch.no_grad():
            layer.lora_A[ADAPTER].weight.copy_(basis.lora_A)
            layer.lora_B[ADAPTER].weight.copy_(basis.lora_B)
        core = basis.initial_core * float(config.init)
        if previous and "core" in previous:
            recorded = torch.as_tensor(previous["core"], dtype=torch.float32)
            size = recorded.shape[0] if recorded.dim() == 2 else -1
            if recorded.shape != (size, size) or size > rank:
                raise CatError(
                    f"coefficients_from: module {plan.name} records a core of shape "
                    f"{tuple(recorded.shape)}; these skills give an R x R core with R <= {rank}"
                )
            if size > basis.kept:  # written with a basis wider than the skills' span
                raise CatError(
                    f"coefficients_from: module {plan.name} records a {size} x {size} core, but "
                    f"these skills' factors span only {basis.kept} directions there "
                    "(rank-deficient: an untrained or repeated skill); the record was written "
                    "by an earlier release whose basis left the skills' span. Fit the core again"
                )
            core = torch.zeros_like(core)
            core[:size, :size] = recorded
        present = torch.zeros(1, len(skills), dtype=torch.bool)
        for skill_index, _ in plan.blocks:
            present[0, skill_index] = True
        state = CatState(
            plan.name,
            tuple(skill.name for skill in skills),
            config.parametrization,
            coefficients=nn.Parameter(core.to(device)),
            present=present.to(device),
            skill_cores=basis.skill_cores.to(device),
            strategy=self,
        )
        use_cat_variant(layer, state)

    def read_start(self, modules: dict, path) -> dict[str, dict]:
        """Per module, {"core": the recorded M} (checked against the basis at install)."""
        from ..errors import CatError

        try:
            return {
                name: {"core": entry["core"]} for name, entry in modules.items() if "core" in entry
            }
        except (AttributeError, TypeError) as error:
            raise CatError(
                f"coefficients_from: {path} holds no usable cores ({error!r})"
            ) from error

    def mix(self, state):
        """M itself, fp32 (R, R)."""
        return state.coefficients

    def fold_layer(self, layer, state, prune_threshold):
        """lora_A = Q_Aᵀ, lora_B = Q_B M, cut to the directions the basis kept; the entry
        keeps M itself (for resume and re-export) and the per-skill weights that best
        explain it (core_space.skill_weights)."""
        import torch

        from ..errors import CatError
        from ..state import ADAPTER, full_tensor
        from .core_space import skill_weights

        with torch.no_grad():
            core = full_tensor(state.coefficients).float()
            if not torch.isfinite(core).all():
                raise CatError(
                    f"module {state.module_name}: the learned core is not finite; training "
                    "diverged, refusing to export"
                )
            lora_A = full_tensor(layer.lora_A[ADAPTER].weight).float()
            lora_B = full_tensor(layer.lora_B[ADAPTER].weight).float()
            # the basis has the skills' numerical rank (core_space.span_basis): k_A orthonormal
            # rows of lora_A and k_B columns of lora_B, zeros after them
            rows_A, columns_B = lora_A.abs().sum(1) != 0, lora_B.abs().sum(0) != 0
            used = rows_A | columns_B
            rank = int(used.nonzero().max()) + 1 if used.any() else 0
            present = state.present[0]
            weights, residual = skill_weights(core, full_tensor(state.skill_cores), present)
            lora_B = lora_B @ core
        coefficients = {
            skill: float(weights[index])
            for index, skill in enumerate(state.skill_names)
            if present[index]
        }
        entry = {
            "coefficients": coefficients,
            "core_residual": residual,
            "core": core[:rank, :rank].tolist(),
            "rank": rank,
            # directions of the skills' joint span this module kept, per side (k_A, k_B)
            "kept_directions": {"lora_A": int(rows_A.sum()), "lora_B": int(columns_B.sum())},
        }
        return lora_A[:rank], lora_B[:, :rank], entry

    def skill_values(self, state) -> dict[str, list[float]]:
        """The per-skill least-squares weights of the core, for the skills on the layer."""
        from ..state import full_tensor
        from .core_space import skill_weights

        present = state.present[0]
        alpha = full_tensor(state.coefficients).float()
        c, _ = skill_weights(alpha, full_tensor(state.skill_cores), present)
        return {
            skill: [float(c[index])]
            for index, skill in enumerate(state.skill_names)
            if present[index]
        }

    def set_static(self, state, weights):
        """M = Σ_i weights[i] C_i."""
        import torch

        state.coefficients.copy_(torch.einsum("i,iab->ab", weights, state.skill_cores.float()))
        return lambda: None
