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
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import SkillSpec
from .errors import CatError
from .moe import expert_parameters_message

LOG = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

# PEFT saves `base_model.model.<module>.lora_A.weight`; some tools keep the adapter name.
_FACTOR_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$"
)
# an embedding LoRA's factors are parameters: `<module>.lora_embedding_A` (r, num_embeddings)
# and `<module>.lora_embedding_B` (embedding_dim, r), maybe with the adapter name after them
_EMBEDDING_FACTOR_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_(?P<which>[AB])(?:\.[^.]+)?$"
)
# PEFT's copy of a base matrix: `<module>.base_layer.weight` of a LoRA-wrapped embedding or
# output layer, or `<module>.weight` of an unwrapped one, written by save_pretrained's default
# save_embedding_layers="auto" (peft/utils/save_and_load.py, get_peft_model_state_dict)
_BASE_COPY_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)(?:\.base_layer)?\.weight$")
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# init_lora_weights values that move the principal part of W into the factors (PEFT warns
# that such adapters must not be combined with others until converted to plain LoRA)
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# LoraConfig options whose adapter is not ΔW = scaling * B A on the targeted Linear layers
_OTHER_COMPUTATIONS = (
    "use_qalora",  # pools the input before lora_A
    "alora_invocation_tokens",  # activated LoRA: only applies after the invocation tokens
    "layer_replication",  # duplicates decoder layers
    "trainable_token_indices",  # trains embedding rows next to the LoRA
    "arrow_config",  # routes between several LoRAs per token
)


@dataclass
class SkillModule:
    """One skill's factors on one wrapped module: ΔW = scaling · lora_B @ lora_A."""

    lora_A: torch.Tensor  # (r, d_in); an embedding's lora_embedding_A: (r, num_embeddings)
    lora_B: torch.Tensor  # (d_out, r); an embedding's lora_embedding_B: (embedding_dim, r)
    scaling: float
    embedding: bool = False  # PEFT's embedding LoRA: ΔE = scaling * (B A)^T on the table

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


@dataclass
class Skill:
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

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def record(self) -> dict:
        """What cat_coefficients.json says about this skill."""
        return {
            "name": self.name,
            "source": self.spec.path,
            "revision": self.spec.revision,
            "rank": self.config.get("r"),
            "alpha": self.config.get("lora_alpha"),
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
    skills = []
    for spec in tqdm(specs, desc="Reading skill LoRAs", unit="skill", disable=len(specs) < 4):
        skills.append(load_skill(spec))
    return skills


def load_skill(spec: SkillSpec) -> Skill:
    folder, weights_file = _locate(spec)
    config = _read_config(spec, folder / CONFIG_NAME)
    _check_config(spec, config)
    tensors = _read_weights(spec, weights_file)
    saved_modules, originals = _saved_modules(config, tensors)
    base_copies = {**_base_copies(tensors), **originals}
    modules = _factors_by_module(spec, config, tensors, weights_file)
    LOG.info(
        "skill %r: %d modules, r=%s, lora_alpha=%s%s from %s",
        spec.name,
        len(modules),
        config.get("r"),
        config.get("lora_alpha"),
        ", rsLoRA" if config.get("use_rslora") else "",
        folder,
    )
    digest = _sha256(weights_file)
    return Skill(spec, folder, config, weights_file, digest, modules, base_copies, saved_modules)


def preflight(spec: SkillSpec) -> None:
    """The checks that need no weights, cheap enough for config validation (before any compute).

    A Hub id is left for load time, when it is downloaded and checked in full.
    """
    if _is_hub_id(spec.path):
        return
    folder, _ = _locate(spec)
    _check_config(spec, _read_config(spec, folder / CONFIG_NAME))


def _is_hub_id(path: str) -> bool:
    looks_local = path.startswith((".", "/", "~")) or not _REPO_ID.match(path)
    return not looks_local and not Path(path).expanduser().exists()


def _locate(spec: SkillSpec) -> tuple[Path, Path]:
    """The local folder holding the skill and its weights file, fetched from the Hub if need be."""
    folder = Path(spec.path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise CatError(f"skill {spec.name!r}: {spec.path} is a file; give the adapter's folder")
        if not (folder / CONFIG_NAME).is_file():
            raise CatError(
                f"skill {spec.name!r}: no {CONFIG_NAME} in {folder}; is this a PEFT adapter folder?"
            )
        for weights_name in (SAFETENSORS_NAME, BIN_NAME):
            if (folder / weights_name).is_file():
                return folder, folder / weights_name
        raise CatError(
            f"skill {spec.name!r}: {folder} has {CONFIG_NAME} but no {SAFETENSORS_NAME} or "
            f"{BIN_NAME}"
        )
    if not _is_hub_id(spec.path):
        raise CatError(f"skill {spec.name!r}: path {spec.path} does not exist")
    return _download(spec)


def _download(spec: SkillSpec) -> tuple[Path, Path]:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(spec.path, filename, revision=spec.revision))

    where = f"Hub repo {spec.path!r}" + (f" at revision {spec.revision!r}" if spec.revision else "")
    try:
        config_file = fetch(CONFIG_NAME)
        try:
            weights_file = fetch(SAFETENSORS_NAME)
        except EntryNotFoundError:
            weights_file = fetch(BIN_NAME)
    except Exception as error:  # noqa: BLE001 - every Hub failure becomes one clear message
        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set (offline mode) and it is not in the local Hub cache"
        else:
            why = "offline, gated, private or misspelled?"
        raise CatError(
            f"skill {spec.name!r}: no local folder {spec.path!r}, and could not download it "
            f"from the {where}: {why} ({type(error).__name__}: {error})"
        ) from error
    return config_file.parent, weights_file


def _read_config(spec: SkillSpec, path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CatError(f"skill {spec.name!r}: {path} is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise CatError(f"skill {spec.name!r}: {path} must hold a JSON object")
    return config


def _check_config(spec: SkillSpec, config: dict) -> None:
    where = f"skill {spec.name!r} ({spec.path})"
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise CatError(
            f"{where}: peft_type is {peft_type!r}; CAT combines LoRA adapters only (peft_type LORA)"
        )
    if config.get("use_dora"):
        raise CatError(
            f"{where}: use_dora is true; DoRA's magnitude vector does not compose linearly, "
            "so CAT would silently change the skill. Use plain LoRA skills."
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise CatError(
            f"{where}: trained biases (bias={config.get('bias')!r}, lora_bias="
            f"{config.get('lora_bias')!r}) are not supported; use bias: none"
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise CatError(
            f"{where}: init_lora_weights is {init!r}, which rewrites the base weights, so the "
            "skill's factors only hold on that modified base. Convert it to a plain LoRA first "
            "(PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...))."
        )
    if config.get("target_parameters"):  # MoE experts: see moe.py
        raise CatError(expert_parameters_message(where, config["target_parameters"]))
    for key in _OTHER_COMPUTATIONS:
        if config.get(key):
            raise CatError(
                f"{where}: {key} is set ({config[key]!r}); that LoRA variant computes something "
                "other than W + scaling * B A, which CAT cannot combine. Use plain LoRA skills."
            )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise CatError(f"{where}: {key} must be a positive number, got {value!r}")


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
        module, _, param = key.removeprefix("base_model.model.").rpartition(".")
        owner, _, inside = module.rpartition(".")
        if inside not in ("modules_to_save", "original_module"):
            owner, inside = module, None
        if not owner or not any(owner == t or owner.endswith(f".{t}") for t in targets):
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
        match = _BASE_COPY_KEY.match(key)
        if not match or any(part.startswith("lora_") for part in key.split(".")):
            continue
        inside = key.removesuffix("weight")  # "<...>.base_layer." or "<module>."
        if not key.endswith(".base_layer.weight") and any(
            other.startswith(inside) for other in tensors if other != key
        ):
            continue
        copies[match["module"]] = tensors.pop(key)
    return copies


def check_base_copies(skill: Skill, model) -> None:
    """Refuse a skill whose saved copy of a base matrix differs from the base's own weight.

    PEFT's save_pretrained writes the embedding and output layers' weights beside the factors
    when a LoRA targets them (save_embedding_layers="auto", peft/utils/save_and_load.py); PEFT's
    loading then writes that copy over the base. Equal to the base, the copy says nothing and is
    ignored. Different, the skill was trained on another matrix (a resized vocabulary, trained
    embeddings) that CAT's W + Σ c s B A would silently drop.

    model: the plain base model (tied weights are read through their module, so a tied lm_head
    is compared with the shared matrix). Raises CatError naming the skill, the key, both shapes
    and what to do. Weights ZeRO-3 partitioned or on the meta device are compared by shape only.
    """
    for module_name, copy in skill.base_copies.items():
        try:
            weight = model.get_submodule(module_name).weight
        except AttributeError:
            raise CatError(
                f"skill {skill.name!r}: its weights hold a copy of {module_name}.weight, but the "
                "base model has no such module; was the skill trained on another architecture?"
            ) from None
        shape = tuple(getattr(weight, "ds_shape", weight.shape))
        if tuple(copy.shape) != shape:
            rows = (
                f"; the skill's vocabulary has {copy.shape[0]} tokens and the base's {shape[0]}"
                if copy.dim() == 2 and len(shape) == 2 and copy.shape[1] == shape[1]
                else ""
            )
            raise CatError(
                f"skill {skill.name!r}: the copy of {module_name}.weight saved with it has shape "
                f"{tuple(copy.shape)}, the base's has {shape}{rows}. The skill was trained on a "
                "resized vocabulary: compose it on that base (the base with its embeddings "
                f"resized to {copy.shape[0]} rows and this matrix loaded, e.g. PEFT's "
                "merge_and_unload of the skill, saved), with skills trained on it"
            )
        if hasattr(weight, "ds_id") or weight.device.type == "meta":
            LOG.info("skill %r: %s.weight compared by shape only", skill.name, module_name)
            continue
        base = weight.detach()
        if torch.equal(copy.to(base.device, base.dtype), base) or torch.equal(
            copy.to(base.device), base.to(copy.dtype)
        ):
            continue
        difference = float((copy.to(base.device).float() - base.float()).abs().max())
        raise CatError(
            f"skill {skill.name!r}: the copy of {module_name}.weight saved with it differs from "
            f"the base's (max |difference| {difference:.3g}, shape {shape}): the skill was trained "
            "on another base, or with that matrix trained too, and PEFT would load the copy over "
            "the base. CAT composes LoRA factors on one base; use the base the skill was trained "
            "on, or a skill saved from this base"
        )


def warn_on_foreign_base(skills: list[Skill], base_name: str | None) -> None:
    """Log a warning for each skill whose base_model_name_or_path is not `base_name`.

    Only a warning: the same base is often saved under several names (a local copy, a Hub id);
    the shapes are checked separately.
    """
    for skill in skills:
        trained_on = skill.config.get("base_model_name_or_path")
        if base_name and trained_on and trained_on != base_name:
            LOG.warning(
                "skill %r was trained on %r, not on %r; its shapes fit, but check that it is the "
                "same base",
                skill.name,
                trained_on,
                base_name,
            )


def _factors_by_module(
    spec: SkillSpec, config: dict, tensors: dict[str, torch.Tensor], path: Path
) -> dict[str, SkillModule]:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    embeddings: set[str] = set()
    for key, tensor in tensors.items():
        match = _FACTOR_KEY.match(key)
        if not match and (match := _EMBEDDING_FACTOR_KEY.match(key)):
            embeddings.add(match["module"])
        if not match:
            raise CatError(
                f"skill {spec.name!r}: unexpected tensor {key!r} in {path}; CAT composes LoRA "
                "factors (lora_A/lora_B, lora_embedding_A/B) and ignores PEFT's copies of base "
                "weights, nothing else (no trained biases, DoRA magnitudes or other adapters)"
            )
        if not torch.isfinite(tensor).all():
            raise CatError(f"skill {spec.name!r}: tensor {key!r} in {path} holds NaN or Inf")
        factors.setdefault(match["module"], {})[match["which"]] = tensor
    if not factors:
        raise CatError(f"skill {spec.name!r}: {path} holds no LoRA factors")

    modules = {}
    for module_name, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise CatError(
                f"skill {spec.name!r}: module {module_name} has no "
                f"lora_{'embedding_' if module_name in embeddings else ''}{missing} in {path}"
            )
        lora_A, lora_B = pair["A"], pair["B"]
        if module_name in embeddings and any(
            _FACTOR_KEY.match(key) and f"{module_name}.lora_" in key for key in tensors
        ):
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
