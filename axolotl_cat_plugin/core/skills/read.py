"""Find, read and validate skill LoRAs (local folders or Hub repos).

A skill is read into plain tensors keyed by the wrapped module's name in the base
model, with its scaling resolved per module. Everything a skill can get wrong that
does not need the base model is refused here, before any weight is touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import SkillSpec
from ..errors import CatError
from ..format import CONFIG_FILE, PEFT_PREFIX, base_copy_module, factor_of_key, peft_matches
from .check import check_config, warn_on_zero_update
from .experts import take_parameter_factors
from .locate import is_hub_id, locate

LOG = logging.getLogger(__name__)


@dataclass
class SkillModule:
    """One skill's factors on one wrapped module: ΔW = scaling · lora_B @ lora_A."""

    lora_A: torch.Tensor  # (r, d_in); an embedding's lora_embedding_A: (r, num_embeddings)
    lora_B: torch.Tensor  # (d_out, r); an embedding's lora_embedding_B: (embedding_dim, r)
    scaling: float
    embedding: bool = False  # PEFT's embedding LoRA: ΔE = scaling * (B A)^T on the table

    @property
    def rank(self) -> int:
        """r of these factors on this module (rank_pattern already applied)."""
        return self.lora_A.shape[0]


@dataclass
class Skill:
    """One skill LoRA as read from its folder: PEFT's adapter_config.json (`config`), the
    factors per module (fp32 on the CPU, the dtype they were saved in cast up), what PEFT saved
    beside them, and the sha256 of the weights file (recorded in cat_coefficients.json)."""

    spec: SkillSpec
    folder: Path
    config: dict
    weights_file: Path
    sha256: str
    modules: dict[str, SkillModule]
    # module name -> the copy of the base's weight PEFT saved beside the factors
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict)
    # module name -> {parameter name: tensor} of each module saved in full (modules_to_save)
    saved_modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # (module, ParamWrapper depth) -> {"A", "B"} of LoRA on raw parameters (target_parameters,
    # MoE experts), in PEFT's layout; experts.plan_parameters resolves them against the base
    parameter_factors: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The name the config gave the skill (default: its folder or repo name)."""
        return self.spec.name

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether the base stores weights as (d_in, d_out) (GPT-2's Conv1D), as PEFT's flag."""
        return bool(self.config.get("fan_in_fan_out", False))

    def scaling(self, name: str) -> tuple[int, float]:
        """The rank and scaling PEFT gives this skill on a module or parameter (skill_scaling)."""
        return skill_scaling(self.config, name)

    def record(self) -> dict:
        """What cat_coefficients.json says about this skill."""
        return {
            "name": self.name,
            "source": self.spec.path,
            "revision": self.spec.revision,
            "rank": self.config.get("r"),
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": bool(self.config.get("use_rslora", False)),
            "rank_pattern": self.config.get("rank_pattern") or {},
            "alpha_pattern": self.config.get("alpha_pattern") or {},
            "modules_to_save": sorted(self.saved_modules),
            "weights_sha256": self.sha256,
        }


def skill_scaling(config: dict, module_name: str) -> tuple[int, float]:
    """The rank and scaling PEFT gives this skill on this module.

    The one place that knows LoRA's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with
    rsLoRA, each taken from rank_pattern / alpha_pattern where a pattern matches the module
    (PEFT's own matching rule).
    """
    from peft.utils.other import get_pattern_key

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module_name), config["r"])
    alpha = alpha_pattern.get(
        get_pattern_key(alpha_pattern.keys(), module_name), config["lora_alpha"]
    )
    root = math.sqrt(rank) if config.get("use_rslora") else rank
    return int(rank), float(alpha) / root


def load_skills(specs: list[SkillSpec]) -> list[Skill]:
    """Every skill, in order (load_skill), with a progress bar from four skills on."""
    skills = []
    for spec in tqdm(specs, desc="Reading skill LoRAs", unit="skill", disable=len(specs) < 4):
        skills.append(load_skill(spec))
    return skills


def load_skill(spec: SkillSpec) -> Skill:
    """Read one skill: find its folder (local or the Hub cache, locate.py), read and check its
    adapter_config.json, load its weights (.safetensors, or an older PEFT's .bin) and sort
    the tensors into factors, base copies and saved modules. Raises CatError naming the skill
    and the file, key or module for anything CAT cannot compose exactly (check.py).
    """
    folder, weights_file = locate(spec)
    config = _read_config(spec, folder / CONFIG_FILE)
    check_config(spec, config)
    tensors = _read_weights(spec, weights_file)
    saved_modules, originals = _saved_modules(config, tensors)
    base_copies = {**_base_copies(tensors), **originals}
    parameters = take_parameter_factors(config, tensors) if config.get("target_parameters") else {}
    modules = _factors_by_module(spec, config, tensors, weights_file)
    if not modules and not parameters:
        raise CatError(f"skill {spec.name!r}: {weights_file} holds no LoRA factors")
    LOG.info(
        "skill %r: %d modules, r=%s, lora_alpha=%s%s from %s",
        spec.name,
        len(modules),
        config.get("r"),
        config.get("lora_alpha"),
        ", rsLoRA" if config.get("use_rslora") else "",
        folder,
    )
    warn_on_zero_update(spec, modules, parameters, saved_modules)
    digest = _sha256(weights_file)
    return Skill(
        spec, folder, config, weights_file, digest, modules, base_copies, saved_modules, parameters
    )


def preflight(spec: SkillSpec) -> None:
    """The checks that need no weights, cheap enough for config validation (before any compute).

    A Hub id is left for load time, when it is downloaded and checked in full.
    """
    if is_hub_id(spec.path):
        return
    folder, _ = locate(spec)
    check_config(spec, _read_config(spec, folder / CONFIG_FILE))


def _read_config(spec: SkillSpec, path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CatError(f"skill {spec.name!r}: {path} is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise CatError(f"skill {spec.name!r}: {path} must hold a JSON object")
    return config


def _read_weights(spec: SkillSpec, path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            # weights_only: a pickle from a stranger must not run code
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - corrupt or truncated files surface many ways
        raise CatError(
            f"skill {spec.name!r}: could not read {path} ({type(error).__name__}: {error}); "
            "is the file truncated or corrupt?"
        ) from error
    # weights_only still lets a pickle hold lists, numbers or strings: only name -> tensor counts
    if not isinstance(tensors, dict):
        raise CatError(
            f"skill {spec.name!r}: {path} holds a {type(tensors).__name__}, not a mapping of "
            "tensor names to tensors"
        )
    for key, tensor in tensors.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise CatError(
                f"skill {spec.name!r}: entry {key!r} in {path} is a {type(tensor).__name__}, "
                "not a tensor named by a string"
            )
    return tensors


def _saved_modules(config: dict, tensors: dict[str, torch.Tensor]):
    """Take the modules saved in full (modules_to_save) out of `tensors`, by module name.

    PEFT saves the ModulesToSaveWrapper's copy as `base_model.model.<module>.<param>`, the
    module matched by name or name suffix (peft/utils/other.py, _set_trainable). When it also
    saves embedding layers (save_embedding_layers, e.g. after a vocabulary resize), the
    wrapper's insides come too: `<module>.modules_to_save.<param>` (the same copy again) and
    `<module>.original_module.weight` (the base it was trained on). Returns the saved modules
    and those base copies, by module name.
    """
    targets = config.get("modules_to_save") or []
    if isinstance(targets, str):
        targets = [targets]
    saved: dict[str, dict[str, torch.Tensor]] = {}
    originals: dict[str, torch.Tensor] = {}
    for key in list(tensors):
        if any(part.startswith("lora_") or part == "base_layer" for part in key.split(".")):
            continue
        module, _, param = key.removeprefix(PEFT_PREFIX).rpartition(".")
        owner, _, inside = module.rpartition(".")
        if inside not in ("modules_to_save", "original_module"):
            owner, inside = module, None
        if not owner or not peft_matches(owner, targets):
            continue
        tensor = tensors.pop(key)
        if inside is None:
            saved.setdefault(owner, {})[param] = tensor
        elif inside == "original_module" and param == "weight":
            originals[owner] = tensor
    return saved, originals


def _base_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Take PEFT's copies of base matrices out of `tensors` (they are no factors), by module.

    A copy of a LoRA-wrapped module's base weight (`<module>.base_layer.weight`) is taken
    whatever the module; a bare `<module>.weight` only when nothing else in the file lives
    under that module (PEFT's save of an embedding it did not wrap, after a resize).
    """
    copies = {}
    for key in list(tensors):
        module = base_copy_module(key)
        if module is None:
            continue
        inside = key.removesuffix("weight")  # "<...>.base_layer." or "<module>."
        if not key.endswith(".base_layer.weight") and any(
            other.startswith(inside) for other in tensors if other != key
        ):
            continue
        copies[module] = tensors.pop(key)
    return copies


def _factors_by_module(
    spec: SkillSpec, config: dict, tensors: dict[str, torch.Tensor], path: Path
) -> dict[str, SkillModule]:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    embeddings: set[str] = set()
    linear_factors: set[str] = set()
    for key, tensor in tensors.items():
        found = factor_of_key(key)
        if found is None:
            raise CatError(
                f"skill {spec.name!r}: unexpected tensor {key!r} in {path}; CAT composes LoRA "
                "factors (lora_A/lora_B, lora_embedding_A/B) and ignores PEFT's copies of base "
                "weights, nothing else (no trained biases, DoRA magnitudes or other adapters)"
            )
        if not torch.isfinite(tensor).all():
            raise CatError(f"skill {spec.name!r}: tensor {key!r} in {path} holds NaN or Inf")
        module_name, which, embedding = found
        (embeddings if embedding else linear_factors).add(module_name)
        factors.setdefault(module_name, {})[which] = tensor

    modules = {}
    for module_name, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise CatError(
                f"skill {spec.name!r}: module {module_name} has no "
                f"lora_{'embedding_' if module_name in embeddings else ''}{missing} in {path}"
            )
        lora_A, lora_B = pair["A"], pair["B"]
        if module_name in embeddings and module_name in linear_factors:
            raise CatError(
                f"skill {spec.name!r}: module {module_name} has both lora_A/lora_B and "
                f"lora_embedding_A/B factors in {path}; a module is either a Linear or an "
                "Embedding LoRA"
            )
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1]:
            raise CatError(
                f"skill {spec.name!r}: module {module_name} has lora_A {tuple(lora_A.shape)} and "
                f"lora_B {tuple(lora_B.shape)}; expected (r, d_in) and (d_out, r)"
            )
        rank, scaling = skill_scaling(config, module_name)
        if rank != lora_A.shape[0]:
            raise CatError(
                f"skill {spec.name!r}: module {module_name} has rank {lora_A.shape[0]} in {path}, "
                f"but adapter_config.json gives it r={rank}"
            )
        modules[module_name] = SkillModule(lora_A, lora_B, scaling, module_name in embeddings)
    return modules


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
