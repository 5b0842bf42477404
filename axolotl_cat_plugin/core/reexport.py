"""Export a finished CAT fit again (smaller, pruned) from its cat_coefficients.json alone.

The record names the skills, the granularity and the parametrization, and holds every
coefficient: rebuilding the CAT model from them and folding again needs no training.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .attach import attach_cat
from .config import CatConfig
from .errors import CatError
from .export.fold import check_export_options
from .export.write import export_cat
from .format import COEFFICIENTS_FILE, CatRecord, read_record
from .granularity.base import DEFAULT_GRANULARITY
from .state import cat_metadata

LOG = logging.getLogger(__name__)


def reexport(
    run_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    rank: int | None = None,
    prune_threshold: float | None = None,
    base_model: str | None = None,
    option_names: tuple[str, str] = ("rank", "prune_threshold"),
) -> Path:
    """Rebuild the CAT model of run_dir's fit on the base (fp32, CPU) and export it again.

    output_dir may be run_dir itself: the record is read before anything is written, and the
    write replaces the export atomically. option_names: what errors call `rank` and
    `prune_threshold` (the CLI passes its flags, --rank and --prune-threshold). Raises
    CatError for a bad option (naming it), a record without a base, changed skill weights.
    """
    from transformers import AutoModelForCausalLM

    record = read_record(run_dir)
    base = base_model or record.base_model
    if not base:
        raise CatError(
            f"{Path(run_dir) / COEFFICIENTS_FILE} names no base model; pass it (--base BASE)"
        )
    config = CatConfig(
        skills=[_adapter(skill) for skill in record.skills],
        granularity=record.granularity or DEFAULT_GRANULARITY,
        parametrization=record.parametrization or "free",
        coefficients_from=str(Path(run_dir) / COEFFICIENTS_FILE),
    )
    LOG.info("loading %s (fp32, CPU) to rebuild the fit of %s", base, run_dir)
    model = attach_cat(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    metadata = cat_metadata(model)
    _check_same_skill_weights(record, metadata.skills)
    if "training" in record.extra:  # how the coefficients were fitted is still true now
        metadata.extra["training"] = record.extra["training"]
    if record.fit_finished is not None:  # and so is whether that fit finished
        metadata.extra["fit_finished"] = record.fit_finished
    concatenated_rank = model.peft_config["default"].r
    check_export_options(
        metadata.granularity, concatenated_rank, rank, prune_threshold, names=option_names
    )
    return export_cat(model, output_dir, rank=rank, prune_threshold=prune_threshold)


def _adapter(skill: dict) -> dict:
    adapter = {"path": skill["source"], "name": skill["name"]}
    if skill.get("revision"):
        adapter["revision"] = skill["revision"]
    return adapter


def _check_same_skill_weights(record: CatRecord, loaded: list[dict]) -> None:
    """Coefficients fitted on other weights would fold into a different adapter, silently."""
    for fitted, now in zip(record.skills, loaded, strict=True):
        was = fitted.get("weights_sha256")
        if was and was != now["weights_sha256"]:
            raise CatError(
                f"skill {now['name']!r}: the weights at {now['source']} are not the ones the "
                f"coefficients were fitted on (sha256 {now['weights_sha256'][:12]}..., recorded "
                f"{was[:12]}...); re-fit instead of re-exporting"
            )
