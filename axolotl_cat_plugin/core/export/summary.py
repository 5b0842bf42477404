"""Read a cat_coefficients.json record into the tables people look at.

One place for the summaries the model card, the heatmap and `axolotl-cat inspect` show, so
the three always agree. Pure functions of the typed record (format.CatRecord, as `read_record`
returns it and the fold builds it): no torch, no I/O.

A module's coefficient of a skill is a number (granularity module, layer, model) or a list
with one number per rank-1 component (granularity rank). Statistics over skills use every
number; per-module views (per-layer table, heatmap) first average a module's components so
each module counts once.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..format import CatRecord
from ..granularity.base import granularity_labels, layer_index

OTHER = "other"  # column for modules outside the numbered decoder layers (lm_head, ...)


@dataclass(frozen=True)
class Stats:
    """Mean, min and max of a skill's coefficients, and how many there are."""

    mean: float
    min: float
    max: float
    count: int

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        """The stats of a non-empty list of coefficients."""
        return cls(sum(values) / len(values), min(values), max(values), len(values))


def skill_names(record: CatRecord) -> list[str]:
    """The skills' names in a cat_coefficients.json record, in the config's order."""
    return [skill["name"] for skill in record.skills]


def module_values(entry: dict) -> dict[str, list[float]]:
    """Every coefficient of each skill on one module, as a list (one item unless `rank`)."""
    return {
        skill: [float(v) for v in value] if isinstance(value, list) else [float(value)]
        for skill, value in entry.get("coefficients", {}).items()
    }


def module_type(module_name: str) -> str:
    """The module's own name ('model.layers.3.mlp.up_proj' -> 'up_proj'), a heatmap panel."""
    return module_name.rsplit(".", 1)[-1]


def skill_stats(record: CatRecord) -> dict[str, Stats]:
    """Per skill, mean/min/max over the modules it touches (over components for `rank`)."""
    values: dict[str, list[float]] = {}
    for entry in record.modules.values():
        for skill, numbers in module_values(entry).items():
            values.setdefault(skill, []).extend(numbers)
    return {skill: Stats.of(values[skill]) for skill in skill_names(record) if skill in values}


def layer_table(record: CatRecord) -> tuple[list[int | str], dict[int | str, dict[str, float]]]:
    """Rows (decoder layers in order, then OTHER if any) and, per row, each skill's mean
    coefficient over that layer's modules."""
    per_row: dict[int | str, dict[str, list[float]]] = {}
    for name, entry in record.modules.items():
        index = layer_index(name)
        row = per_row.setdefault(OTHER if index is None else index, {})
        for skill, numbers in module_values(entry).items():
            row.setdefault(skill, []).append(sum(numbers) / len(numbers))
    rows = sorted(key for key in per_row if key != OTHER) + ([OTHER] if OTHER in per_row else [])
    means = {row: {skill: sum(v) / len(v) for skill, v in per_row[row].items()} for row in rows}
    return rows, means


def module_type_grids(
    record: CatRecord,
) -> tuple[list[int | str], dict[str, dict[tuple[str, int | str], float]]]:
    """Columns (layers as in layer_table) and, per module type (q_proj, ...), the coefficient
    of (skill, layer), averaged over components and over modules sharing that cell."""
    cells: dict[str, dict[tuple[str, int | str], list[float]]] = {}
    columns: set[int | str] = set()
    for name, entry in record.modules.items():
        index = layer_index(name)
        column = OTHER if index is None else index
        grid = cells.setdefault(module_type(name), {})
        for skill, numbers in module_values(entry).items():
            grid.setdefault((skill, column), []).append(sum(numbers) / len(numbers))
            columns.add(column)
    ordered = sorted(c for c in columns if c != OTHER) + ([OTHER] if OTHER in columns else [])
    grids = {
        kind: {key: sum(v) / len(v) for key, v in grid.items()}
        for kind, grid in cells.items()
        if grid
    }
    return ordered, grids


def pruned(record: CatRecord) -> str:
    """What the export's prune_threshold removed: skill blocks (components for `rank`)."""
    entries = [e.get("pruned", {}) for e in record.modules.values()]
    if granularity_labels(record.granularity).over == "components":
        count = sum(len(components) for entry in entries for components in entry.values())
        return f"{count} components"
    return f"{sum(len(entry) for entry in entries)} skill blocks"


def max_svd_error(record: CatRecord) -> float | None:
    """The largest relative Frobenius error of an SVD export (export_rank) over the modules;
    None when the export was not compressed."""
    errors = [
        entry["svd_relative_error"]
        for entry in record.modules.values()
        if "svd_relative_error" in entry
    ]
    return max(errors) if errors else None


def core_residuals(record: CatRecord) -> tuple[Stats, str] | None:
    """Granularity core: the stats of the modules' core_residual (the share of a learned core
    no per-skill weighting explains, core_space.skill_weights) and the module where it is
    largest; None for a record without residuals."""
    residuals = {
        name: float(entry["core_residual"])
        for name, entry in record.modules.items()
        if entry.get("core_residual") is not None and entry.get("coefficients")
    }
    if not residuals:
        return None
    return Stats.of(list(residuals.values())), max(residuals, key=residuals.get)
