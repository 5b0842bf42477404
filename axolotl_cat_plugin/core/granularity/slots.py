"""The granularities that weight rank slots: `module`, `layer`, `model` and `rank`.

Each wrapped module holds the skills' factors concatenated, A = [A_1; ...; A_K] and
B = [B_1 ... B_K], and its update is B diag(w) A with w the weight c·s of every rank slot
(layers/linear.py). What differs is which modules share a coefficient (`group`) and how many
rows of coefficients a group has (`rows`: 1, or one per rank-1 component for `rank`); the slot
layout (state.slot_layout), the start, the fold (B diag(w) A = B (diag(w) A), exact) and the record
entry are the same code for all of them.

Torch-free at import (the config and `axolotl-cat inspect` read the declarations); the torch
methods import what they need when called.
"""

from __future__ import annotations

from .base import GranularityStrategy, layer_index

PAPER = "LoRA Soups, Prabhakar et al., COLING 2025, arXiv 2410.13025 (CAT)"


class SlotGranularity(GranularityStrategy):
    """A granularity whose coefficients c (groups, K) weight the rank slots: w = c·s per slot.

    Subclasses choose `group` (which modules share coefficients) and `rows` (coefficient
    rows per group). Unregistered, it weighs every module on its own with one row (a
    composed modules_to_save wrapper uses it that way).
    """

    def rows(self, plans) -> int:
        """How many rows of coefficients each group has (1: one coefficient per skill)."""
        return 1

    def initial_alpha(self, config, present, previous: dict | None, skills):
        """alpha (fp32, shape of `present`, (rows, K)): the parametrization's start, or where
        `previous` (one module's entry of `read_start`) records a skill, its values."""
        import torch

        parametrization = config.parametrization
        alpha = torch.full(present.shape, parametrization.initial(config.init), dtype=torch.float32)
        for skill_index, skill in enumerate(skills):
            if previous and skill.name in previous:
                values = torch.as_tensor(previous[skill.name], dtype=torch.float32).reshape(-1)
                rows = min(len(values), present.shape[0])
                alpha[:rows, skill_index] = parametrization.inverse(values[:rows])
        return alpha

    def install(self, layers: dict, plans, skills, config, starting: dict, rank: int) -> None:
        """Slot layouts, one shared nn.Parameter per group (the union of its modules' skills
        present), the factors loaded concatenated, and the CAT variant on every layer."""
        from torch import nn

        from ..layers.embedding import factor_weights
        from ..layers.variants import load_factors, use_cat_variant
        from ..state import ADAPTER, CatState, slot_layout

        rows = self.rows(plans)
        layouts = {plan.name: slot_layout(plan.blocks, len(skills), rank, rows) for plan in plans}
        groups = {}
        for plan in plans:
            group, present = self.group(plan.name), layouts[plan.name][2]
            groups[group] = groups[group] | present if group in groups else present
        shared: dict[str, nn.Parameter] = {}
        names = tuple(skill.name for skill in skills)
        for plan in plans:
            layer = layers[plan.name]
            device = factor_weights(layer, ADAPTER)[0].device
            group = self.group(plan.name)
            present = groups[group]
            if group not in shared:
                alpha = self.initial_alpha(config, present, starting.get(plan.name), skills)
                shared[group] = nn.Parameter(alpha.to(device))
            slot_index, slot_scale, _ = layouts[plan.name]
            load_factors(layer, plan, rank)
            state = CatState(
                plan.name,
                names,
                config.parametrization,
                coefficients=shared[group],
                present=present.to(device),
                slot_index=slot_index.to(device),
                slot_scale=slot_scale.to(device),
                strategy=self,
            )
            use_cat_variant(layer, state)

    def read_start(self, modules: dict, path) -> dict[str, dict]:
        """Per module, per skill, the recorded coefficients (a tensor). Modules sharing a
        group each record only the skills they carry: a group starts from the union."""
        import torch

        from ..errors import CatError

        by_group: dict[str, dict] = {}
        try:
            for name, entry in modules.items():
                group = by_group.setdefault(self.group(name), {})
                for skill, value in entry["coefficients"].items():
                    value = torch.as_tensor(value, dtype=torch.float32)
                    if not torch.isfinite(value).all():
                        raise ValueError(f"module {name}, skill {skill!r}: {value.tolist()}")
                    group.setdefault(skill, value)
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CatError(
                f"coefficients_from: {path} holds no usable coefficients ({error!r})"
            ) from error
        return {name: by_group[self.group(name)] for name in modules}

    def mix(self, state):
        """w: the slot weights c·s, fp32 (R,)."""
        return state.slot_weights()

    def fold_layer(self, layer, state, prune_threshold):
        """lora_A with every kept row scaled by its slot weight, lora_B's kept columns; the
        entry records each skill's coefficient (a list per component when rows > 1) and the
        components prune_threshold dropped."""
        import torch

        from ..errors import CatError
        from ..layers.variants import kind_of
        from ..state import full_tensor

        with torch.no_grad():
            alpha = full_tensor(state.coefficients).float()
            c = state.parametrization.coefficients(alpha, state.present)
            if not torch.isfinite(c).all():
                raise CatError(
                    f"module {state.module_name}: coefficients are not finite ({c.tolist()}); "
                    "training diverged, refusing to export"
                )
            slot_c = c.flatten()[state.slot_index]
            kind = kind_of(layer)
            factors = (full_tensor(factor).float() for factor in kind.factors(layer))
            lora_A, lora_B = kind.stacked(layer, *factors)  # (E, R, in), (E, out, R) experts
            keep = state.slot_scale != 0
            if prune_threshold is not None:
                keep &= slot_c.abs() >= prune_threshold
            scaled_A = (slot_c * state.slot_scale)[keep, None] * lora_A[..., keep, :]

            coefficients: dict[str, list[float]] = {}
            pruned: dict[str, list[int]] = {}
            for slot, skill_index in state.slot_skills():
                skill = state.skill_names[skill_index]
                component = len(coefficients.setdefault(skill, []))
                coefficients[skill].append(float(slot_c[slot]))
                if not keep[slot]:
                    pruned.setdefault(skill, []).append(component)

        if state.present.shape[0] == 1:  # one coefficient per skill: report the scalar
            coefficients = {skill: values[0] for skill, values in coefficients.items()}
        entry = {"coefficients": coefficients, "rank": int(keep.sum())}
        if pruned:
            entry["pruned"] = pruned
        return scaled_A, lora_B[..., keep], entry

    def skill_values(self, state) -> dict[str, list[float]]:
        """Each skill's effective coefficients on the layer (an empty list where absent)."""
        from ..state import full_tensor

        c = state.parametrization.coefficients(
            full_tensor(state.coefficients).float(), state.present
        )
        return {
            skill: c[state.present[:, index], index].tolist()
            for index, skill in enumerate(state.skill_names)
        }

    def set_static(self, state, weights):
        """c = weights in every row, the parametrization switched to `free` meanwhile."""
        from ..state import set_free_coefficients

        return set_free_coefficients(state, weights)


class ModuleGranularity(SlotGranularity):
    """One coefficient per skill for every wrapped module: the paper's CAT."""

    name = "module"
    description = "one coefficient per skill for every LoRA-wrapped module (the paper's)"
    source = PAPER


class LayerGranularity(SlotGranularity):
    """One coefficient per skill per decoder layer, shared by the layer's modules."""

    name = "layer"
    description = "one coefficient per skill for every decoder layer"
    source = PAPER + "; coarser sharing of the same coefficients"

    def group(self, module_name: str) -> str:
        """'layer N' for a module of decoder layer N (the first `.N.` in its name); a module
        outside the numbered layers keeps its own."""
        index = layer_index(module_name)
        return module_name if index is None else f"layer {index}"


class ModelGranularity(SlotGranularity):
    """One coefficient per skill for the whole model (a learned PEFT `cat` weighting)."""

    name = "model"
    description = "one coefficient per skill for the whole model"
    source = PAPER + "; PEFT add_weighted_adapter(combination_type='cat') with learned weights"
    shared_across_layers = True

    def group(self, module_name: str) -> str:
        """One group for every module."""
        return "model"


class RankGranularity(SlotGranularity):
    """One coefficient per rank-1 component of every skill on every module."""

    name = "rank"
    description = "one coefficient for every rank-1 component of every skill on every module"
    source = PAPER + "; finer: row g weighs the g-th component of every skill"
    over = "components"
    plot_note = ", mean over components"

    def rows(self, plans) -> int:
        """As many rows as the largest skill rank anywhere."""
        return max(factors.rank for plan in plans for _, factors in plan.blocks)
