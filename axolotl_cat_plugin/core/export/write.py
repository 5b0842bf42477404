"""Compose a CAT export and write it as a standard PEFT LoRA folder (names in format.py).

The folder holds adapter_config.json, adapter_model.safetensors (PEFT's key names),
cat_coefficients.json, and, when given, a model card and a coefficient plot. PEFT, vLLM
and `axolotl merge-lora` read it without this package.

Writing is crash-safe: everything is written to a temporary folder first; then the old
adapter_config.json goes, the other files are moved in, and the new adapter_config.json
comes last. A loader needs adapter_config.json, so at any instant the folder holds either
a complete export or none, never a mix.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..format import (
    CARD_FILE,
    CHECKPOINT_COEFFICIENTS_FILE,
    COEFFICIENTS_FILE,
    CONFIG_FILE,
    EXPORT_FILES,
    PLOT_FILE,
    PREVIOUS_EXPORT,
    STAGING_PREFIX,
    WEIGHTS_FILE,
)
from ..layers.variants import MODULE_KINDS, kind_of
from ..skills.check import refuse_skill_folder
from ..state import ADAPTER, cat_layers
from .card import model_card
from .fold import FoldedAdapter, fold
from .plot import coefficient_heatmap

LOG = logging.getLogger(__name__)


@dataclass
class Export:
    """Everything an export folder holds, in memory: the folded adapter (config, tensors,
    record), the model card and the heatmap PNG (None when not made)."""

    folded: FoldedAdapter
    card: str | None = None
    plot: bytes | None = None


def compose(
    model: nn.Module,
    *,
    rank: int | None = None,
    prune_threshold: float | None = None,
    extra: dict | None = None,
    hub_model_id: str | None = None,
    card: bool = True,
) -> Export:
    """The one composer of an export: fold -> record (+ extra) -> heatmap -> model card.

    extra: keys added to the record's `extra` (CatRecord: written before `modules`; the
    plugin's `fit_finished`, `training` and `baselines`). card=False skips the heatmap and
    the card (checkpoints). Collective under FSDP2 and ZeRO-3 (folding gathers sharded
    factors): every rank must call it.
    Raises CatError for a bad rank / prune_threshold or non-finite coefficients (fold).
    """
    folded = fold(model, rank=rank, prune_threshold=prune_threshold)
    folded.record.extra.update(extra or {})
    if not card:
        return Export(folded)
    plot = coefficient_heatmap(folded.record)
    text = model_card(
        folded.record,
        config=folded.config.to_dict(),
        hub_model_id=hub_model_id,
        plot_file=PLOT_FILE if plot is not None else None,
    )
    return Export(folded, text, plot)


def export_cat(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    rank: int | None = None,
    prune_threshold: float | None = None,
) -> Path:
    """Fold the model's CAT coefficients and write one standard LoRA adapter to output_dir,
    with its model card and coefficient plot (compose, then write)."""
    return write(compose(model, rank=rank, prune_threshold=prune_threshold), output_dir)


def write(
    export: Export,
    output_dir: str | os.PathLike,
    coefficients: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a composed export to output_dir, atomically (write_export). coefficients: a
    trainer checkpoint's raw coefficients by parameter name (fp32), written beside it as
    CHECKPOINT_COEFFICIENTS_FILE in the same atomic write."""
    return write_export(
        export.folded, output_dir, card=export.card, plot=export.plot, coefficients=coefficients
    )


def write_export(
    folded: FoldedAdapter,
    output_dir: str | os.PathLike,
    *,
    card: str | None = None,
    plot: bytes | None = None,
    coefficients: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write an export folder through write_folder. card / plot: README.md and
    cat_coefficients.png, written when given; coefficients: see `write`.

    Returns output_dir. Raises CatError for a skill's own folder and OSError when the folder
    cannot be written; an interrupted write leaves the previous export or none, never a mix.
    """
    refuse_skill_folder(output_dir, folded.record.skills)  # nothing written yet

    def stage(staging: Path) -> None:
        save_file(folded.tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / COEFFICIENTS_FILE).write_text(folded.record.to_json())
        if card is not None:
            (staging / CARD_FILE).write_text(card)
        if plot is not None:
            (staging / PLOT_FILE).write_bytes(plot)
        if coefficients is not None:
            save_file(
                coefficients,
                str(staging / CHECKPOINT_COEFFICIENTS_FILE),
                metadata={"format": "pt"},
            )
        folded.config.save_pretrained(str(staging))

    names = EXPORT_FILES + ((CHECKPOINT_COEFFICIENTS_FILE,) if coefficients is not None else ())
    # a user's own README.md stays when we write no card
    write_folder(output_dir, stage, names, keep=(CARD_FILE,))
    LOG.info("CAT: wrote a rank-%d LoRA adapter to %s", folded.rank, output_dir)
    return Path(output_dir)


def write_folder(
    output_dir: str | os.PathLike,
    stage,
    names,
    *,
    keep=(),
    prefix: str = STAGING_PREFIX,
) -> Path:
    """The one writer of every folder this package writes (an export, a checkpoint's adapter
    and coefficients, a static merge), crash-safe (see the module docstring).

    stage(staging): writes the files into a temporary folder inside output_dir. They are
    fsynced; then output_dir's adapter_config.json goes, `names` are moved in (in order,
    adapter_config.json last), and a name that was not staged is removed from output_dir
    unless listed in `keep`. A staging folder left by a killed write (`prefix`*) is removed
    first. Returns output_dir; raises OSError when the folder cannot be written.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(f"{prefix}*"):  # left by a killed write
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=output_dir))
    try:
        stage(staging)
        for path in staging.iterdir():
            if path.is_file():
                _fsync(path)
        (output_dir / CONFIG_FILE).unlink(missing_ok=True)
        for name in [*(n for n in names if n != CONFIG_FILE), CONFIG_FILE]:
            if (staging / name).exists():
                os.replace(staging / name, output_dir / name)
            elif name not in keep:
                (output_dir / name).unlink(missing_ok=True)
        _fsync(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def previous_generation(output_dir: str | os.PathLike) -> Path:
    """The folder the next earlier export of output_dir goes to: previous_export/ when free,
    else previous_export.N/ with N one above the highest used (N >= 2). Nothing is created."""
    output_dir = Path(output_dir)
    first = output_dir / PREVIOUS_EXPORT
    if not first.exists():
        return first
    used = [
        int(path.name.rsplit(".", 1)[1])
        for path in output_dir.glob(f"{PREVIOUS_EXPORT}.*")
        if path.name.rsplit(".", 1)[1].isdigit()
    ]
    return output_dir / f"{PREVIOUS_EXPORT}.{max([1, *used]) + 1}"


def run_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The Trainer's checkpoint-N folders in output_dir, by step."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def retire_previous_export(output_dir: str | os.PathLike, *, checkpoints: bool = False):
    """Move an export already in output_dir (and, with checkpoints=True, the checkpoint-N
    folders of the run that wrote it) to a new generation folder, previous_export/ or
    previous_export.N/ (previous_generation), before a new run writes anything.

    Trainers write into output_dir while they run (Axolotl pre-saves its adapter config),
    which would otherwise sit beside the old export's weights: a mix of old and new; and an
    old run's checkpoints would be rotated or resumed from as if they were the new run's.
    Earlier generations are kept. Returns the folder, or None when there was nothing to move.
    """
    output_dir = Path(output_dir)
    old_checkpoints = run_checkpoints(output_dir) if checkpoints else []
    if not (output_dir / COEFFICIENTS_FILE).exists() and not old_checkpoints:
        return None
    previous = previous_generation(output_dir)
    previous.mkdir()
    for name in (CONFIG_FILE, *EXPORT_FILES):  # the config first: what is left never loads
        if (output_dir / name).exists():
            os.replace(output_dir / name, previous / name)
    for folder in old_checkpoints:
        os.replace(folder, previous / folder.name)
    LOG.warning(
        "CAT: %s held %s; moved to %s (earlier ones are kept)",
        output_dir,
        " and ".join(
            part
            for part, there in (
                ("an export", (previous / COEFFICIENTS_FILE).exists()),
                (f"{len(old_checkpoints)} checkpoint folder(s) of an earlier run", old_checkpoints),
            )
            if there
        ),
        previous,
    )
    return previous


def apply_export(
    model: nn.Module, export: Export | FoldedAdapter, *, written_to: str | os.PathLike | None = None
) -> None:
    """Turn a CAT model, in place, into the plain LoRA model that `export` describes.

    written_to: the folder this export was just written to. The model's save_pretrained then
    leaves that folder as it is (one writer per folder: a trainer's final save must not
    rewrite it non-atomically) and writes the same export, through write_export, anywhere
    else. Without it, PEFT's own save_pretrained / push_to_hub write the adapter.
    """
    folded = export.folded if isinstance(export, Export) else export
    peft_model = next(m for m in model.modules() if hasattr(m, "peft_config"))
    paths = {id(module): path for path, module in model.named_modules()}
    for name, layer in list(cat_layers(model)):
        kind = kind_of(layer)
        lora_A, lora_B = kind.factors(layer)
        key_A, key_B = kind.keys(name, paths[id(layer)])
        new_A = folded.tensors[key_A].to(lora_A.device, lora_A.dtype)
        new_B = folded.tensors[key_B].to(lora_B.device, lora_B.dtype)
        kind.set_folded(layer, new_A, new_B)
        layer.r[ADAPTER] = folded.rank
        layer.lora_alpha[ADAPTER] = folded.rank
        layer.scaling[ADAPTER] = 1.0
        kind.teardown(layer)  # the model is a plain LoRA model now, no CAT layer is left
    for kind in MODULE_KINDS:  # e.g. the copies hold the composed modules_to_save
        kind.teardown(model)
    peft_model.peft_config[ADAPTER] = folded.config
    peft_model.__dict__.pop("save_pretrained", None)  # PEFT's own save now writes the export
    if written_to is not None:
        export = export if isinstance(export, Export) else Export(folded)
        peft_model.save_pretrained = types.MethodType(
            functools.partial(_save_written, export=export, folder=Path(written_to)), peft_model
        )


def _save_written(self, save_directory, *args, export: Export, folder: Path, **kwargs) -> None:
    """save_pretrained of a model whose export was written to `folder` already."""
    if Path(save_directory).resolve() == folder.resolve() and (folder / CONFIG_FILE).exists():
        LOG.info("CAT: %s already holds this export; leaving it as written", folder)
        return
    if kwargs.get("is_main_process", True):
        write(export, save_directory)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
