"""Where the coefficients start: the config's `init`, or a previous fit's record.

`coefficients_from` (CatConfig) names a cat_coefficients.json: resuming a fit or re-exporting
it (reexport.py). The record is read by the one reader (format.read_record_file) and checked
against this config (same skills in the same order, same granularity and parametrization)
before anything is wrapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import CatConfig
from .errors import CatError
from .format import read_record_file
from .granularity import Granularity

if TYPE_CHECKING:
    from .skills import Skill


def initial_alpha(config: CatConfig, present, previous: dict | None, skills) -> torch.Tensor:
    """alpha (fp32, shape of `present`, (groups, K)): the parametrization's start, or where
    `previous` (one module's entry of starting_coefficients) records a skill, its values."""
    parametrization = config.parametrization
    alpha = torch.full(present.shape, parametrization.initial(config.init), dtype=torch.float32)
    for skill_index, skill in enumerate(skills):
        if previous and skill.name in previous:
            values = torch.as_tensor(previous[skill.name], dtype=torch.float32).reshape(-1)
            rows = min(len(values), present.shape[0])
            alpha[:rows, skill_index] = parametrization.inverse(values[:rows])
    return alpha


def starting_coefficients(config: CatConfig, skills: list[Skill]) -> dict[str, dict]:
    """Per module, per skill, the coefficients a previous cat_coefficients.json recorded."""
    if not config.coefficients_from:
        return {}
    path = Path(config.coefficients_from)
    try:
        record = read_record_file(path)
    except CatError as error:
        raise CatError(f"coefficients_from: {error}") from error
    modules = record["modules"]
    recorded = [
        skill.get("name") if isinstance(skill, dict) else None for skill in record["skills"]
    ]
    wanted = [skill.name for skill in skills]
    if recorded != wanted:
        raise CatError(
            f"coefficients_from: {path} records skills {recorded}, but this config lists {wanted}"
        )
    if record.get("parametrization") not in (None, config.parametrization) or record.get(
        "granularity"
    ) not in (None, config.granularity):
        raise CatError(
            f"coefficients_from: {path} was fitted with granularity {record.get('granularity')!r} "
            f"and parametrization {record.get('parametrization')!r}; this config asks for "
            f"'{config.granularity}' / '{config.parametrization}'"
        )
    if config.granularity is Granularity.CORE:
        try:
            return {
                name: {"core": entry["core"]} for name, entry in modules.items() if "core" in entry
            }
        except (AttributeError, TypeError) as error:
            raise CatError(
                f"coefficients_from: {path} holds no usable cores ({error!r})"
            ) from error
    # modules sharing coefficients (granularity layer / model) each record only the skills
    # they carry: a group starts from the union of what its modules recorded
    by_group: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for name, entry in modules.items():
            group = by_group.setdefault(config.granularity.group(name), {})
            for skill, value in entry["coefficients"].items():
                value = torch.as_tensor(value, dtype=torch.float32)
                if not torch.isfinite(value).all():
                    raise ValueError(f"module {name}, skill {skill!r}: {value.tolist()}")
                group.setdefault(skill, value)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CatError(
            f"coefficients_from: {path} holds no usable coefficients ({error!r})"
        ) from error
    return {name: by_group[config.granularity.group(name)] for name in modules}


def starting_saved_coefficients(config, names) -> dict[str, dict[str, float]]:
    """Per saved module, per skill, the coefficient a previous cat_coefficients.json recorded."""
    if not config.coefficients_from:
        return {}
    record = read_record_file(config.coefficients_from)  # the one record reader
    try:
        saved = record.get("saved_modules") or {}
        return {name: dict(saved[name]["coefficients"]) for name in names if name in saved}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CatError(
            f"coefficients_from: cannot read the saved modules' coefficients in "
            f"{config.coefficients_from} ({error!r})"
        ) from error
