"""`axolotl-cat inspect`: a CAT export folder as tables in the terminal (rich).

The numbers are the model card's (core.export.summary); only the presentation differs.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .core.export.serving import saved_modules_note, vllm_max_lora_rank
from .core.export.summary import (
    core_residuals,
    layer_table,
    max_svd_error,
    pruned,
    skill_names,
    skill_stats,
)
from .core.format import CONFIG_FILE, CatRecord, read_record
from .core.granularity.base import granularity_labels


def show_export(folder: str | Path, console: Console) -> None:
    """Print an export folder's overview, skills, coefficients and per-layer table.

    Raises CatError when the folder holds no readable cat_coefficients.json (read_record).
    """
    folder = Path(folder)
    record = read_record(folder)
    config_path = folder / CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    console.print(_overview(folder, record, config))
    if not config:
        console.print(f"[yellow]warning: {config_path} is missing: PEFT cannot load this folder")
    console.print(_skills(record))
    console.print(_coefficients(record))
    console.print(_layers(record))


def _overview(folder: Path, record: CatRecord, config: dict) -> Table:
    rank = config.get("r", record.exported_rank)
    table = Table(title=f"CAT export {folder}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("base model", str(record.base_model))
    table.add_row(
        "exported rank",
        f"{rank} (concatenated {record.concatenated_rank}; "
        f"vLLM --max-lora-rank {vllm_max_lora_rank(int(rank or 1)) or 'too large'})",
    )
    if record.saved_modules:
        table.add_row("modules_to_save", saved_modules_note(record))
    table.add_row("granularity", str(record.granularity))
    table.add_row("parametrization", str(record.parametrization))
    if record.prune_threshold is not None:
        table.add_row(
            "pruned",
            f"{pruned(record)} with |coefficient| < {record.prune_threshold}",
        )
    error = max_svd_error(record)
    if error is not None:
        table.add_row("SVD", f"rank {record.export_rank}, largest relative error {error:.2e}")
    residuals = core_residuals(record)
    if residuals is not None:
        stats, largest = residuals
        table.add_row(
            "core residual",
            f"mean {stats.mean:.3g}, largest {stats.max:.3g} ({largest}): the share of the "
            "learned core no per-skill weighting explains",
        )
    training = record.training or {}
    if training:
        table.add_row(
            "fitted", f"{training.get('steps')} steps, lr {training.get('learning_rate')}"
        )
    finished = record.fit_finished
    table.add_row(
        "fit",
        {
            True: "finished",
            False: "[yellow]not finished: written during the fit (a checkpoint, or the run "
            "was interrupted)",
            None: "not recorded (an export_cat call)",
        }[finished],
    )
    return table


def _skills(record: CatRecord) -> Table:
    table = Table(title="Skills", title_justify="left")
    for column in ("skill", "source", "revision", "r", "lora_alpha", "rsLoRA"):
        table.add_column(column)
    for skill in record.skills:
        table.add_row(
            str(skill.get("name")),
            str(skill.get("source")),
            str(skill.get("revision") or ""),
            str(skill.get("rank")),
            str(skill.get("lora_alpha")),
            "yes" if skill.get("use_rslora") else "no",
        )
    return table


def _coefficients(record: CatRecord) -> Table:
    over = granularity_labels(record.granularity).over
    table = Table(title=f"Coefficients (over {over})", title_justify="left")
    table.add_column("skill")
    for column in ("mean", "min", "max", over):
        table.add_column(column, justify="right")
    for name, stats in skill_stats(record).items():
        table.add_row(
            name, f"{stats.mean:.4f}", f"{stats.min:.4f}", f"{stats.max:.4f}", str(stats.count)
        )
    return table


def _layers(record: CatRecord) -> Table:
    rows, means = layer_table(record)
    names = skill_names(record)
    table = Table(title="Mean coefficient per layer", title_justify="left")
    table.add_column("layer", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(
            str(row), *(f"{means[row][n]:.3f}" if n in means[row] else "—" for n in names)
        )
    return table
