"""Where the coefficients start: the config's `init`, or a previous fit's record.

`coefficients_from` (CatConfig) names a cat_coefficients.json: resuming a fit or re-exporting
it (reexport.py). The record is read by the one reader (format.read_record_file) and checked
against this config (same skills in the same order, same granularity and parametrization)
before anything is wrapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .config import CatConfig
from .errors import CatError
from .format import read_record_file
from .granularity.base import granularity_named

if TYPE_CHECKING:
    from .skills.read import Skill


def starting_coefficients(config: CatConfig, skills: list[Skill]) -> dict[str, dict]:
    """Per module, per skill, the coefficients a previous cat_coefficients.json recorded."""
    if not config.coefficients_from:
        return {}
    path = Path(config.coefficients_from)
    try:
        record = read_record_file(path)
    except CatError as error:
        raise CatError(f"coefficients_from: {error}") from error
    recorded = [skill.get("name") if isinstance(skill, dict) else None for skill in record.skills]
    wanted = [skill.name for skill in skills]
    if recorded != wanted:
        raise CatError(
            f"coefficients_from: {path} records skills {recorded}, but this config lists {wanted}"
        )
    granularity, parametrization = record.granularity, record.parametrization
    if granularity not in (None, config.granularity) or parametrization not in (
        None,
        config.parametrization,
    ):
        raise CatError(
            f"coefficients_from: {path} was fitted with granularity {granularity!r} "
            f"and parametrization {parametrization!r}; this config asks for "
            f"'{config.granularity}' / '{config.parametrization}'"
        )
    return granularity_named(config.granularity).read_start(record.modules, path)


def starting_saved_coefficients(config, names) -> dict[str, dict[str, float]]:
    """Per saved module, per skill, the coefficient a previous cat_coefficients.json recorded."""
    if not config.coefficients_from:
        return {}
    record = read_record_file(config.coefficients_from)  # the one record reader
    try:
        saved = record.saved_modules
        return {name: dict(saved[name]["coefficients"]) for name in names if name in saved}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CatError(
            f"coefficients_from: cannot read the saved modules' coefficients in "
            f"{config.coefficients_from} ({error!r})"
        ) from error
