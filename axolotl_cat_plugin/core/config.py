"""`CatConfig`: what to combine and how the coefficients are shaped.

Plain dataclasses (no pydantic) so the core stays free of Axolotl; the Axolotl
integration maps its YAML block onto this one to one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CatError
from .granularity.base import (
    DEFAULT_GRANULARITY,
    Parametrization,
    granularity_named,
    parse_granularity,
)

LOG = logging.getLogger(__name__)

ADAPTERS_RENAMED = (
    "cat_merge.adapters is deprecated and will be removed in a future release: name the "
    "list `skills` (`adapters` also meant the YAML's `adapter:` key and a granularity)"
)


def read_renamed_adapters(block: dict) -> dict:
    """The `cat_merge` block with `adapters` (the skills' name before 0.2) read as `skills`,
    logging the deprecation; the one home of that rule (CatConfig and the Axolotl block).
    Raises CatError when both are given (a `skills: None` counts as not given)."""
    if block.get("adapters") is None:
        return block
    if block.get("skills") is not None:
        raise CatError("cat_merge: give the skill LoRAs as `skills` only, not also as `adapters`")
    LOG.warning(ADAPTERS_RENAMED)
    return {
        ("skills" if key == "adapters" else key): v for key, v in block.items() if key != "skills"
    }


@dataclass(frozen=True)
class SkillSpec:
    """One skill LoRA: a local folder or a Hub repo id, and the name it goes by."""

    path: str
    name: str
    revision: str | None = None

    @classmethod
    def parse(cls, entry: Any, position: int) -> SkillSpec:
        """A skill from a config entry: a path, or {"path", "name", "revision"}. Raises
        CatError naming `cat_merge.skills[position]` and the key at fault."""
        if isinstance(entry, SkillSpec):
            return entry
        if isinstance(entry, (str, Path)):
            entry = {"path": str(entry)}
        if not isinstance(entry, dict):
            raise CatError(
                f"cat_merge.skills[{position}]: expected a path or a mapping with 'path', "
                f"got {type(entry).__name__}"
            )
        unknown = set(entry) - {"path", "name", "revision"}
        if unknown:
            raise CatError(
                f"cat_merge.skills[{position}]: unknown key(s) {sorted(unknown)}; "
                "allowed: path, name, revision"
            )
        path = entry.get("path")
        if not isinstance(path, (str, Path)) or not str(path).strip():
            raise CatError(f"cat_merge.skills[{position}].path: must be a non-empty string")
        name = entry.get("name") or default_skill_name(str(path))
        if not isinstance(name, str):
            raise CatError(f"cat_merge.skills[{position}].name: must be a string")
        revision = entry.get("revision")
        if revision is not None and not isinstance(revision, str):
            raise CatError(f"cat_merge.skills[{position}].revision: must be a string")
        return cls(path=str(path), name=name, revision=revision)


def default_skill_name(path: str) -> str:
    """The folder or repo name: './skills/math' -> 'math', 'org/code-lora' -> 'code-lora'."""
    return Path(path.rstrip("/")).name or path


@dataclass
class CatConfig:
    """How to combine skill LoRAs with CAT.

    skills: the skill LoRAs, as paths, dicts ({"path", "name", "revision"}) or SkillSpecs;
        parsed into SkillSpecs in place. `adapters` is their deprecated name (before 0.2),
        still accepted with a warning.
    granularity: the name of a registered granularity (granularity/, parsed to that name):
        one coefficient per skill per `module` (the paper), per decoder `layer`, for the whole
        `model`, per `rank`-1 component of each skill, or a full R x R `core` per module in
        the skills' joint subspace (granularity/core_space.py; needs parametrization free), or any
        registered with granularity.register_granularity. `adapter` is the deprecated name of
        `model`.
    parametrization: a Parametrization or its name: `free` (c = alpha, starts at `init`) or
        `softmax` (c = softmax of alpha over the skills in each group, starts uniform).
    dropout: dropout on the adapter input, as LoRA's lora_dropout.
    coefficients_from: a previous cat_coefficients.json to start from (resume, re-export).
    """

    skills: list[Any] | None = None
    granularity: str = DEFAULT_GRANULARITY
    parametrization: Parametrization | str = Parametrization.FREE
    init: float = 1.0
    dropout: float = 0.0
    coefficients_from: str | None = None
    adapters: list[Any] | None = field(default=None, repr=False)  # deprecated: `skills`

    def __post_init__(self) -> None:
        if self.adapters is not None:
            renamed = read_renamed_adapters({"skills": self.skills, "adapters": self.adapters})
            self.skills, self.adapters = renamed["skills"], None
        if not isinstance(self.skills, (list, tuple)) or not self.skills:
            raise CatError("cat_merge.skills: list at least one skill LoRA (path or Hub id)")
        self.skills = [SkillSpec.parse(entry, i) for i, entry in enumerate(self.skills)]
        names = [skill.name for skill in self.skills]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise CatError(
                f"cat_merge.skills: duplicate skill name(s) {duplicates}; "
                "give each a distinct 'name'"
            )
        self.granularity = parse_granularity(self.granularity)
        self.parametrization = Parametrization.parse(self.parametrization)
        granularity_named(self.granularity).check_parametrization(self.parametrization)
        if (
            not isinstance(self.init, (int, float))
            or isinstance(self.init, bool)
            or not math.isfinite(self.init)
        ):
            raise CatError(f"cat_merge.init: must be a finite number, got {self.init!r}")
        if self.parametrization is Parametrization.SOFTMAX and self.init != 1.0:
            LOG.warning(
                "cat_merge.init %s is not used with parametrization softmax, which starts "
                "uniform over the skills (c = 1/K)",
                self.init,
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise CatError(f"cat_merge.dropout: must be in [0, 1), got {self.dropout!r}")
