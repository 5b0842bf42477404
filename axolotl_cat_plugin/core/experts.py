"""CAT on LoRAs of MoE expert weights: PEFT's `target_parameters`, and the older per-expert form.

PEFT's ParamWrapper (peft/tuners/lora/layer.py) puts LoRA on one raw parameter P of a module.
For a 3-D P, the experts of a fused MoE layer (Mixtral and Qwen2-MoE in transformers v5:
`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I)), each expert e gets
its own update, a plain LoRA:

    P_e + s · B_e A_e          A_e: (r, in), B_e: (out, r), s = lora_alpha / r (or / sqrt(r))

and the adapter stores every expert's factors in two matrices (ParamWrapper.update_layer,
get_delta_weight): lora_A (r·E, in), expert-major (rows e·r .. e·r + r - 1 are A_e), and
lora_B (out, r·E), rank-major (column k·E + e is column k of B_e). ΔP_e lies in P as
(E, out, in), or as (E, in, out) where the experts module sets `is_transposed`; a 2-D P is
one "expert" with ΔP = s·B A of P's shape (out, in). Several targeted parameters of one
module nest: the first in the module's parameter order is wrapped first, so it is the
innermost wrapper and saved under `<module>.base_layer....lora_A.weight`, the last one under
`<module>.lora_A.weight` (tuners_utils.BaseTuner._inject_parameters).

The older form, per-expert Linear modules an older PEFT saved on transformers v4
(`...block_sparse_moe.experts.N.w1/w2/w3`, `...mlp.experts.N.gate_proj/...`, the router
`...block_sparse_moe.gate`), is what PEFT converts into this one when it loads such a skill on
a base whose experts are fused (peft/utils/transformers_weight_conversion.py: w1 and w3 fused
block-diagonally into gate_up_proj with r and lora_alpha doubled, the router onto its
`gate.weight`). `convert_per_expert_modules` calls those very functions.

CAT composes either like a Linear module: the skills' per-expert factors are concatenated
along the rank, slot j of the CAT adapter (rank R) belongs to one skill's component and is
weighted by the same w_j = c·s as on a Linear layer (layer.py), for every expert:

    ΔP_e = Σ_j w_j B[:, j, e] A[e, j, :] = B_e diag(w) A_e          (fp32, then P's dtype)

The coefficients c (fp32, the layer's CatState, state.py) come per skill per targeted
parameter (granularity `module`), or are shared per decoder layer / the whole model, or per
rank component, as on Linear layers; granularity `core` is refused. PEFT's ParamWrapper
accepts no LoRA variant, so CAT replaces the wrapper's own get_delta_weight (and, in PEFT >=
0.21, get_delta_factors, which its forward uses instead for one adapter) on the CAT layer:
PEFT's forward, merge, unmerge and merge_and_unload then apply ΔP above. The export is the
standard adapter PEFT itself saves for `target_parameters`: lora_A = (w ⊙ A) per expert,
lora_B = B, scaling 1.
"""

from __future__ import annotations

import logging
import re
import types
from dataclasses import dataclass

import torch
from torch import nn

from .errors import CatError
from .format import factor_of_key, peft_key
from .state import ADAPTER, cat_layers, state_of

LOG = logging.getLogger(__name__)

_PER_EXPERT_MODULE = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<leaf>[^.]+)$")
# a ParamWrapper's factors are saved under `<module>(.base_layer)*.lora_A.weight`: the number
# of `.base_layer` is the wrapper's depth below the outermost one
_NESTED = ".base_layer"

WHAT_WORKS = (
    "What works: compose the skills that adapt attention and dense layers with CAT, and apply "
    "the expert skill at full strength by merging it into the base first (PEFT "
    "merge_and_unload, saved as the new base), or use a version of the skill trained without "
    "expert targets"
)


@dataclass
class ExpertFactors:
    """One skill's LoRA on one targeted parameter, per expert: ΔP_e = scaling · B_e A_e.

    lora_A: (E, r, in); lora_B: (E, out, r); E = 1 for a 2-D parameter. The skill's dtype.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        """r, the skill's rank on this parameter (per expert)."""
        return self.lora_A.shape[-2]


@dataclass
class ParameterPlan:
    """The skills' factors on one targeted parameter (`<module>.<parameter>`), in skill order."""

    name: str
    blocks: list[tuple[int, ExpertFactors]]

    @property
    def rank(self) -> int:
        """The concatenated rank per expert: the sum of the skills' ranks here."""
        return sum(factors.rank for _, factors in self.blocks)


# ---------------------------------------------------------------- PEFT's layout <-> per expert


def per_expert(lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int):
    """PEFT's ParamWrapper factors -> per expert: lora_A (r·E, in) expert-major and lora_B
    (out, r·E) rank-major become (E, r, in) and (E, out, r) (views where possible)."""
    stacked_A = lora_A.reshape(num_experts, -1, lora_A.shape[-1])
    stacked_B = lora_B.reshape(lora_B.shape[0], -1, num_experts).permute(2, 0, 1)
    return stacked_A, stacked_B


def peft_layout(stacked_A: torch.Tensor, stacked_B: torch.Tensor):
    """per_expert's inverse: (E, r, in) and (E, out, r) -> lora_A (r·E, in), lora_B (out, r·E)."""
    lora_A = stacked_A.reshape(-1, stacked_A.shape[-1])
    lora_B = stacked_B.permute(1, 2, 0).reshape(stacked_B.shape[1], -1)
    return lora_A, lora_B


# ---------------------------------------------------------------- reading skills


def take_parameter_factors(config: dict, tensors: dict[str, torch.Tensor], everything=False):
    """Take the ParamWrapper factors out of a skill's `tensors`, by (module, nesting depth).

    A factor is a ParamWrapper's when its key nests (`.base_layer.lora_A`) or its module is
    not one target_modules selects (PEFT wraps those as Linear or Embedding layers; anything
    else it wrapped is a target parameter's). everything=True takes every factor (keys PEFT's
    conversion of the per-expert form produced). Which parameter a depth means needs the base:
    `plan_parameters` resolves it. Returns {(module, depth): {"A": tensor, "B": tensor}}.
    """
    factors: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for key in list(tensors):
        found = factor_of_key(key)
        if found is None or found[2]:  # no factor, or an embedding's
            continue
        module, which, _ = found
        depth = 0
        while module.endswith(_NESTED):
            module, depth = module.removesuffix(_NESTED), depth + 1
        if not (everything or depth or not _selected_as_module(config, module)):
            continue
        factors.setdefault((module, depth), {})[which] = tensors.pop(key)
    return factors


def _selected_as_module(config: dict, module: str) -> bool:
    """Whether the skill's target_modules select `module` (PEFT's matching: a list by name or
    name suffix, a string as a full regex; `all-linear` by the target parameters' modules)."""
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        owners = [t.rpartition(".")[0] for t in config.get("target_parameters") or []]
        return not any(o and (module == o or module.endswith(f".{o}")) for o in owners)
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in targets or [])


def _targets(name: str, target_parameters) -> bool:
    """PEFT's match of `<module>.<parameter>` against target_parameters (name or suffix)."""
    return any(name == t or name.endswith(f".{t}") for t in target_parameters or [])


def convert_per_expert_modules(skill, model: nn.Module) -> None:
    """Turn a skill's per-expert Linear modules the base lacks into target-parameter factors,
    exactly as PEFT does when it loads such a skill (in place: skill.modules, skill.config,
    skill.parameter_factors).

    PEFT's own functions do it (peft/utils/transformers_weight_conversion.py):
    convert_peft_config_for_transformers retargets the config (w1/w3 -> gate_up_proj with
    r and lora_alpha doubled by rank_pattern / alpha_pattern, w2 -> down_proj, the router
    gate -> gate.weight), convert_peft_adapter_state_dict_for_transformers the factors.
    Raises CatError naming the skill, a module and the form where PEFT cannot convert it;
    returns untouched when the skill has no per-expert module the base lacks.
    """
    names = dict(model.named_modules())
    missing = sorted(name for name in skill.modules if name not in names)
    legacy = [match for name in missing if (match := _PER_EXPERT_MODULE.match(name))]
    if not legacy:
        return  # a module the base lacks for another reason: plan_modules names it
    where = (
        f"skill {skill.name!r}: module {legacy[0].string} is expert {legacy[0]['index']}'s "
        f"{legacy[0]['leaf']} in the per-expert MoE layout an older PEFT/transformers saved"
    )
    config = _converted_config(skill, model, where)
    tensors = {}
    for name in missing:
        factors = skill.modules[name]
        tensors[peft_key(name, "A")] = factors.lora_A
        tensors[peft_key(name, "B")] = factors.lora_B
    from peft.utils.transformers_weight_conversion import (
        convert_peft_adapter_state_dict_for_transformers,
    )

    try:
        converted = convert_peft_adapter_state_dict_for_transformers(
            model, config, tensors, adapter_name=ADAPTER
        )
    except (ValueError, RuntimeError, KeyError) as error:
        raise CatError(
            f"{where}; PEFT cannot convert its factors ({error}). {WHAT_WORKS}."
        ) from error
    unconverted = converted.keys() & tensors.keys()  # no conversion applies: plan_modules names it
    for name in missing:
        if peft_key(name, "A") not in unconverted:
            del skill.modules[name]
    for key in unconverted:
        del converted[key]
    skill.config = {
        **skill.config,
        "target_modules": sorted(config.target_modules),
        "target_parameters": sorted(config.target_parameters),
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
    }
    for key, pair in take_parameter_factors(skill.config, converted, everything=True).items():
        module_name, depth = key
        if module_name in names and _wrapped_parameter(skill, names[module_name], *key) is None:
            raise CatError(
                f"{where}; PEFT's conversion puts its factors on {module_name} under "
                f"{module_name + _NESTED * depth}, a nested ParamWrapper, but the converted "
                f"skill targets only {_targeted(skill, names[module_name], module_name)} there, "
                "so PEFT's own loading drops them (it warns of missing adapter keys). "
                f"{WHAT_WORKS}."
            )
        skill.parameter_factors.setdefault(key, {}).update(pair)
    LOG.info(
        "skill %r: converted its per-expert MoE modules to LoRA on %s, as PEFT loads it",
        skill.name,
        skill.config["target_parameters"],
    )


def _converted_config(skill, model, where: str):
    """The skill's LoraConfig after PEFT's conversion for this base (a new object)."""
    fused = [
        f"{name}.{param_name}"
        for name, module in model.named_modules()
        if name.endswith(".experts")
        for param_name, param in module.named_parameters(recurse=False)
        if param.dim() == 3
    ]
    try:
        from peft import PeftConfig
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError as error:  # transformers < 5 or a PEFT without the conversion
        raise CatError(
            f"{where}; this PEFT/transformers has no conversion of that layout ({error}). "
            f"{WHAT_WORKS}."
        ) from error
    config = PeftConfig.from_peft_type(**skill.config)
    try:
        convert_peft_config_for_transformers(
            config, model=model, conversions=get_model_conversion_mapping(model)
        )
    except ValueError as error:  # e.g. w1 targeted without w3, which are fused together
        raise CatError(
            f"{where}; PEFT cannot convert it to this base's fused experts ({error}). {WHAT_WORKS}."
        ) from error
    if not config.target_parameters:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        here = (
            f"this base fuses each layer's experts into 3-D parameters (e.g. {fused[0]}), but "
            f"PEFT has no conversion of the per-expert layout for model type {model_type!r}"
            if fused
            else "this base has no such module"
        )
        raise CatError(f"{where}; {here}. {WHAT_WORKS}.")
    return config


# ---------------------------------------------------------------- planning against the base


def plan_parameters(model: nn.Module, skills) -> list[ParameterPlan]:
    """Which skills put LoRA on which base parameter, validated against the base's shapes.

    Resolves each saved wrapper depth to its parameter by PEFT's nesting (module docstring).
    Raises CatError naming the skill, the saved module, the parameter and both shapes.
    """
    plans: dict[str, ParameterPlan] = {}
    order: dict[str, tuple[int, int]] = {}
    positions = {name: index for index, (name, _) in enumerate(model.named_modules())}
    for index, skill in enumerate(skills):
        targets = skill.config.get("target_parameters") or []
        for (module_name, depth), pair in sorted(skill.parameter_factors.items()):
            saved = module_name + _NESTED * depth
            if module_name not in positions:
                raise CatError(
                    f"skill {skill.name!r}: it has LoRA factors on parameters of {saved} "
                    f"(target_parameters {targets!r}), but the base model has no module "
                    f"{module_name}; was it trained on another architecture?"
                )
            module = model.get_submodule(module_name)
            parameter = _wrapped_parameter(skill, module, module_name, depth)
            if parameter is None:
                targeted = _targeted(skill, module, module_name)
                raise CatError(
                    f"skill {skill.name!r}: it saved LoRA factors under {saved}, the ParamWrapper "
                    f"{depth} level(s) below the outermost, but its target_parameters "
                    f"{targets!r} select {len(targeted)} parameter(s) of {module_name} "
                    f"({targeted}); PEFT's own loading finds no wrapper for these factors "
                    "either. Use a skill saved by PEFT on this base"
                )
            name = f"{module_name}.{parameter}"
            factors = _expert_factors(skill, module, name, parameter, pair)
            plans.setdefault(name, ParameterPlan(name, [])).blocks.append((index, factors))
            own = [param_name for param_name, _ in module.named_parameters(recurse=False)]
            order[name] = (positions[module_name], own.index(parameter))
    return sorted(plans.values(), key=lambda plan: order[plan.name])


def _targeted(skill, module: nn.Module, module_name: str) -> list[str]:
    """The parameters of `module` the skill's target_parameters select, in the module's order:
    the order PEFT wraps them in (tuners_utils.BaseTuner._inject_parameters)."""
    targets = skill.config.get("target_parameters") or []
    return [
        name
        for name, _ in module.named_parameters(recurse=False)
        if _targets(f"{module_name}.{name}", targets)
    ]


def _wrapped_parameter(skill, module: nn.Module, module_name: str, depth: int) -> str | None:
    """The parameter whose ParamWrapper lies `depth` levels below the outermost one on
    `module` (the first targeted is innermost), or None where the skill has no such wrapper."""
    targeted = _targeted(skill, module, module_name)
    return targeted[len(targeted) - 1 - depth] if depth < len(targeted) else None


def _expert_factors(skill, module, name: str, parameter: str, pair):
    """One skill's factors on `name` per expert, checked against the parameter's shape."""
    if set(pair) != {"A", "B"}:
        missing = ({"A", "B"} - set(pair)).pop()
        raise CatError(f"skill {skill.name!r}: parameter {name} has no lora_{missing}")
    param = module.get_parameter(parameter)
    shape = tuple(getattr(param, "ds_shape", param.shape))
    if len(shape) not in (2, 3):
        raise CatError(
            f"skill {skill.name!r}: parameter {name} has shape {shape}; PEFT's ParamWrapper "
            "adapts 2-D and 3-D (experts) parameters only"
        )
    experts, d_out, d_in = _experts_out_in(module, shape)
    rank, scaling = skill.scaling(name)
    lora_A, lora_B = pair["A"], pair["B"]
    if lora_A.shape != (rank * experts, d_in) or lora_B.shape != (d_out, rank * experts):
        raise CatError(
            f"skill {skill.name!r}: parameter {name} {shape} takes lora_A "
            f"{(rank * experts, d_in)} and lora_B {(d_out, rank * experts)} at r={rank} for "
            f"{experts} expert(s), but the skill has {tuple(lora_A.shape)} and "
            f"{tuple(lora_B.shape)}; was the skill trained on another base model?"
        )
    if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
        raise CatError(f"skill {skill.name!r}: the factors on parameter {name} hold NaN or Inf")
    stacked_A, stacked_B = per_expert(lora_A, lora_B, experts)
    return ExpertFactors(stacked_A, stacked_B, scaling)


def _experts_out_in(module, shape) -> tuple[int, int, int]:
    """(E, out, in) of a parameter as ParamWrapper._get_in_out_features / update_layer read it."""
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if getattr(module, "is_transposed", False):  # stored (E, in, out)
        return shape[0], shape[2], shape[1]
    return shape[0], shape[1], shape[2]


def target_parameters_for(plans: list[ParameterPlan]) -> list[str]:
    """PEFT target_parameters for these parameters: `<module leaf>.<parameter>`, which PEFT
    matches by suffix on every layer (untouched ones carry zero factors, as for modules)."""
    return sorted({".".join(plan.name.split(".")[-2:]) for plan in plans})


def refuse_core(plans: list[ParameterPlan]) -> None:
    """Granularity `core` builds its joint basis for Linear modules only."""
    if plans:
        raise CatError(
            "granularity core builds its joint basis for Linear modules only, and these skills "
            f"have LoRA on MoE expert parameters ({plans[0].name}, target_parameters); use "
            "granularity module, layer, model or rank with expert skills"
        )


# ---------------------------------------------------------------- the CAT layer


def is_parameter_wrapper(layer) -> bool:
    """Whether `layer` is PEFT's ParamWrapper (LoRA on a raw parameter)."""
    from peft.tuners.lora.layer import ParamWrapper

    return isinstance(layer, ParamWrapper)


def lora_layers(model: nn.Module):
    """(name, layer) of every PEFT LoRA layer holding the CAT adapter (Linear, Embedding,
    ParamWrapper); a ParamWrapper is named by its parameter, `<module>.<parameter>`, the name
    its plan and record use."""
    for name, module in model.named_modules():
        if ADAPTER not in getattr(module, "lora_A", {}) and ADAPTER not in getattr(
            module, "lora_embedding_A", {}
        ):
            continue
        if is_parameter_wrapper(module):
            while name.endswith(_NESTED):
                name = name.removesuffix(_NESTED)
            name = f"{name}.{module.parameter_name}"
        yield name, module


def load_factors(layer, plan, rank: int) -> None:
    """Write the skills' per-expert factors into a ParamWrapper's rank-R adapter (zeros after).

    layer.lora_A[ADAPTER].weight (R·E, in), viewed (E, R, in); lora_B (out, R·E), viewed
    (out, R, E): skill i's slots offset_i .. offset_i + r_i - 1 of every expert.
    """
    experts = layer.num_experts
    lora_A = layer.lora_A[ADAPTER].weight
    lora_B = layer.lora_B[ADAPTER].weight
    with torch.no_grad():
        stacked_A = lora_A.view(experts, rank, lora_A.shape[-1])
        stacked_B = lora_B.view(lora_B.shape[0], rank, experts)
        stacked_A.zero_()
        stacked_B.zero_()
        offset = 0
        for _, factors in plan.blocks:
            end = offset + factors.rank
            stacked_A[:, offset:end] = factors.lora_A.to(lora_A)
            stacked_B[:, offset:end] = factors.lora_B.permute(1, 2, 0).to(lora_B)
            offset = end


def stacked_factors(layer, lora_A: torch.Tensor, lora_B: torch.Tensor):
    """A layer's factors with the experts stacked in front: (E, R, in), (E, out, R) on a
    ParamWrapper, unchanged (R, in), (out, R) on a Linear or Embedding layer."""
    if is_parameter_wrapper(layer):
        return per_expert(lora_A, lora_B, layer.num_experts)
    return lora_A, lora_B


def _factor_product(layer):
    """(lhs, rhs), fp32, with ΔP = lhs @ rhs per expert in the parameter's own layout:
    (E, out, R) @ (E, R, in), or (E, in, R) @ (E, R, out) for an `is_transposed` parameter.
    The slot weights w (fp32, c·s) scale B's rank slots."""
    stacked_A, stacked_B = per_expert(
        layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.num_experts
    )
    weighted_B = stacked_B.float() * state_of(layer).slot_weights()
    if layer.get_param().dim() == 3 and not layer._did_swap_in_out_features:
        return stacked_A.float().mT, weighted_B.mT
    return weighted_B, stacked_A.float()


def delta_weight(layer, adapter_name: str, *args, **kwargs) -> torch.Tensor:
    """ParamWrapper.get_delta_weight of a CAT layer: ΔP_e = B_e diag(w) A_e, computed in fp32
    and cast as PEFT casts it (to the parameter's device, and dtype where it is a compute dtype).
    Shape: the parameter's ((E, out, in), (E, in, out) or (out, in))."""
    if adapter_name != ADAPTER:
        return type(layer).get_delta_weight(layer, adapter_name, *args, **kwargs)
    lhs, rhs = _factor_product(layer)
    delta = lhs @ rhs
    param = layer.get_param()
    if param.dim() == 2:
        delta = delta[0]
    if param.dtype in (torch.float16, torch.bfloat16, torch.float32):  # ALLOWED_COMPUTE_DTYPES
        return delta.to(param.device, param.dtype)
    return delta.to(param.device)


def delta_factors(layer, adapter_name: str):
    """ParamWrapper.get_delta_factors (PEFT >= 0.21) of a CAT layer: (lhs, rhs, 1.0) with
    ΔP = lhs @ rhs, in the parameter's dtype as PEFT casts them (its forward folds them into
    P with one baddbmm)."""
    if adapter_name != ADAPTER:
        return type(layer).get_delta_factors(layer, adapter_name)
    lhs, rhs = _factor_product(layer)
    dtype = layer.get_param().dtype
    return lhs.to(dtype), rhs.to(dtype), 1.0


_OVERRIDES = {"get_delta_weight": delta_weight, "get_delta_factors": delta_factors}


def install_delta(layer) -> None:
    """Make a ParamWrapper compute the CAT update for ADAPTER in forward and merges."""
    for name, function in _OVERRIDES.items():
        if hasattr(type(layer), name):  # get_delta_factors: PEFT >= 0.21
            setattr(layer, name, types.MethodType(function, layer))


def remove_delta(layer) -> None:
    """Give a ParamWrapper PEFT's own update back (for apply_export's plain LoRA)."""
    for name in _OVERRIDES:
        layer.__dict__.pop(name, None)


def dropout_outside_parameters(peft_model, p: float) -> None:
    """PEFT's `nn.Dropout(p)` on the adapter input of every LoRA layer but the ParamWrappers.

    ParamWrapper refuses lora_dropout (it adds ΔP to the parameter, there is no adapter input
    to drop), so attach_cat asks PEFT for none and gives the other layers theirs here, as
    LoraLayer.update_layer builds it.
    """
    for _, layer in lora_layers(peft_model):
        if not is_parameter_wrapper(layer) and p > 0:
            layer.lora_dropout[ADAPTER] = nn.Dropout(p=p)


def factor_keys(model: nn.Module) -> dict[str, tuple[str, str]]:
    """PEFT's saved keys (lora_A, lora_B) of every CAT ParamWrapper, by its CAT name:
    `base_model.model.<module>(.base_layer)*.lora_A.weight`, the nesting read off the model."""
    names = {id(layer): name for name, layer in cat_layers(model)}
    keys = {}
    for path, module in model.named_modules():
        name = names.get(id(module))
        if name is None or not is_parameter_wrapper(module):
            continue
        depth = 0
        while path.endswith(_NESTED * (depth + 1)):
            depth += 1
        saved = name.rpartition(".")[0] + _NESTED * depth
        keys[name] = (peft_key(saved, "A"), peft_key(saved, "B"))
    return keys


def expert_form(skill, model: nn.Module) -> str | None:
    """What LoRA on MoE expert weights a skill has, in words (None: none), for merges."""
    names = dict(model.named_modules())
    legacy = [n for n in skill.modules if _PER_EXPERT_MODULE.match(n) and n not in names]
    if legacy:
        return f"per-expert MoE modules (e.g. {legacy[0]}), which PEFT loads as target_parameters"
    if skill.parameter_factors or skill.config.get("target_parameters"):
        return f"target_parameters {skill.config.get('target_parameters')!r}"
    return None
