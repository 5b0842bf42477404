"""Put CAT on a model: one PEFT adapter `default` holding every skill, plus the coefficients.

What a finished CAT model is asked (its layers, its metadata) lives in state.py.
"""

from __future__ import annotations

import logging
import types

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .config import CatConfig
from .core_space import core_factors
from .embedding import CatEmbeddingVariant, factor_weights, is_embedding
from .errors import CatError
from .experts import (
    dropout_outside_parameters,
    install_delta,
    is_parameter_wrapper,
    load_factors,
    lora_layers,
)
from .granularity import Granularity
from .layer import CatLinearVariant
from .plan import (
    ModulePlan,
    fan_in_fan_out_for,
    plan_modules,
    plan_parameters,
    refuse_core,
    target_modules_for,
    target_parameters_for,
)
from .quantized import keep_gradients_through_4bit_layers
from .saved_modules import check_saved_modules, install_saved_modules, saved_module_names
from .skill_checks import warn_on_foreign_base
from .skills import load_skills
from .starting import initial_alpha, starting_coefficients
from .state import (
    ADAPTER,
    CatMetadata,
    CatState,
    is_coefficient,
    keep_frozen_on_set_adapter,
    put_state,
    slot_layout,
)

LOG = logging.getLogger(__name__)


def attach_cat(model: nn.Module, config: CatConfig) -> PeftModel:
    """Wrap `model` in a PeftModel whose only trainable parameters are CAT coefficients.

    CAT ("LoRA Soups", arXiv 2410.13025): one PEFT adapter of rank R (the largest per-module
    concatenation of the skills' ranks) holds every skill's factors; each wrapped layer gets
    fp32 coefficients shaped by config.granularity. Raises CatError for a PeftModel input,
    for skills that cannot be read or do not fit the base (names the skill and module), and
    for a coefficients_from record that does not match.
    """
    if isinstance(model, PeftModel):
        raise CatError("attach_cat expects the plain base model, not a PeftModel")
    skills = load_skills(config.skills)
    plans = plan_modules(model, skills)
    parameters = plan_parameters(model, skills)  # LoRA on MoE expert parameters (experts.py)
    embeddings = [plan.name for plan in plans if any(f.embedding for _, f in plan.blocks)]
    if config.granularity is Granularity.CORE and embeddings:
        raise CatError(
            f"granularity core builds its joint basis for Linear modules only, and these skills "
            f"have embedding LoRAs on {embeddings[0]}; use granularity module, layer, model "
            "or rank with embedding skills"
        )
    if config.granularity is Granularity.CORE:
        refuse_core(parameters)
    check_saved_modules(skills, model)  # modules_to_save: composed beside the LoRA
    starting = starting_coefficients(config, skills)  # refuse a bad record before wrapping
    keep_gradients_through_4bit_layers(model)  # a QLoRA base on the CPU (see quantized.py)
    rank = max(plan.rank for plan in [*plans, *parameters])
    target_modules = target_modules_for([plan.name for plan in plans])
    fan_in_fan_out = fan_in_fan_out_for(model, [plan.name for plan in plans])
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=target_modules,
        lora_dropout=0.0 if parameters else config.dropout,  # ParamWrapper refuses dropout
        target_parameters=target_parameters_for(parameters) or None,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
        # the factors are the skills': drawing random ones first would only waste time
        init_lora_weights=False,
        modules_to_save=saved_module_names(skills) or None,
    )
    peft_model = get_peft_model(model, lora_config)
    if parameters:
        dropout_outside_parameters(peft_model, config.dropout)
    _install(peft_model, [*plans, *parameters], skills, config, starting)
    install_saved_modules(peft_model, skills, config)
    for name, param in peft_model.named_parameters():
        param.requires_grad_(is_coefficient(name))
    for module in peft_model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "set_adapter"):
            keep_frozen_on_set_adapter(module)

    base_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    peft_model.base_model.cat_metadata = CatMetadata(
        skills=[skill.record() for skill in skills],
        granularity=config.granularity,
        parametrization=config.parametrization,
        base_model=base_name,
        target_modules=target_modules,
        fan_in_fan_out=fan_in_fan_out,
        target_parameters=lora_config.target_parameters,
    )
    # any save (a trainer's checkpoint, a Ctrl-C handler) must write a correct adapter
    peft_model.save_pretrained = types.MethodType(_save_folded, peft_model)
    warn_on_foreign_base(skills, base_name)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    LOG.info(
        "CAT: %d skills on %d modules, concatenated rank %d, %d trainable coefficients "
        "(granularity %s, parametrization %s)",
        len(skills),
        len(plans) + len(parameters),
        rank,
        trainable,
        config.granularity,
        config.parametrization,
    )
    return peft_model


def _save_folded(self, save_directory, *args, is_main_process: bool = True, **kwargs):
    """save_pretrained of a CAT model: the folded standard adapter, exactly as export_cat writes it.

    The unfolded adapter would be a plain sum of unscaled skills, loadable but wrong.
    """
    from .export import export_cat  # export builds on state, never on attach

    if is_main_process:
        export_cat(self, save_directory)


def _install(peft_model, plans, skills, config: CatConfig, starting) -> None:
    """Load the concatenated factors and give every wrapped module its CatState."""
    rank = peft_model.peft_config[ADAPTER].r
    layers = dict(lora_layers(peft_model.base_model.model))  # by module (or parameter) name
    names = tuple(skill.name for skill in skills)
    planned = {plan.name for plan in plans}
    for name, module in layers.items():
        if name not in planned:
            _load_factors(module, ModulePlan(name, []), rank)  # wrapped, touched by no skill
            put_state(module, CatState(name, names, config.parametrization))
    granularity = config.granularity  # a Granularity (CatConfig parses it)
    if granularity is Granularity.CORE:  # a core per module: no slot layout, nothing shared
        for plan in plans:
            layer = layers[plan.name]
            _install_core(layer, plan, skills, config, starting.get(plan.name), rank)
        return
    # a coefficient row per component (granularity rank, as many rows as the largest skill
    # rank anywhere) or one row
    rows = max(f.rank for plan in plans for _, f in plan.blocks) if granularity.per_rank else 1
    layouts = {plan.name: slot_layout(plan.blocks, len(skills), rank, rows) for plan in plans}
    # modules sharing coefficients (granularity layer / model) share the union of their skills
    groups: dict[str, torch.Tensor] = {}
    for plan in plans:
        group, present = granularity.group(plan.name), layouts[plan.name][2]
        groups[group] = groups[group] | present if group in groups else present
    shared: dict[str, nn.Parameter] = {}
    for plan in plans:
        layer = layers[plan.name]
        device = factor_weights(layer, ADAPTER)[0].device
        group = granularity.group(plan.name)
        present = groups[group]
        if group not in shared:
            alpha = initial_alpha(config, present, starting.get(plan.name), skills)
            shared[group] = nn.Parameter(alpha.to(device))
        slot_index, slot_scale, _ = layouts[plan.name]
        _load_factors(layer, plan, rank)
        state = CatState(
            plan.name,
            names,
            config.parametrization,
            coefficients=shared[group],
            present=present.to(device),
            slot_index=slot_index.to(device),
            slot_scale=slot_scale.to(device),
        )
        _use_cat_variant(layer, state)


def _use_cat_variant(layer, state: CatState) -> None:
    """Give a layer its CatState and the CAT variant in place of PEFT's LoRA forward (a
    ParamWrapper takes no variant: its delta itself is replaced, experts.py)."""
    put_state(layer, state)
    if is_parameter_wrapper(layer):
        install_delta(layer)
    else:
        layer.lora_variant[ADAPTER] = (
            CatEmbeddingVariant() if is_embedding(layer) else CatLinearVariant()
        )
    layer.cast_input_dtype_enabled = False  # the variant casts the factors instead


def _install_core(layer, plan: ModulePlan, skills, config: CatConfig, previous, rank) -> None:
    """Granularity `core`: the joint basis as factors, the learned core M as coefficients."""
    device = layer.lora_A[ADAPTER].weight.device
    basis = core_factors(plan.blocks, len(skills), rank)
    with torch.no_grad():
        layer.lora_A[ADAPTER].weight.copy_(basis.lora_A)
        layer.lora_B[ADAPTER].weight.copy_(basis.lora_B)
    core = basis.initial_core * float(config.init)
    if previous and "core" in previous:
        recorded = torch.as_tensor(previous["core"], dtype=torch.float32)
        size = recorded.shape[0] if recorded.dim() == 2 else -1
        if recorded.shape != (size, size) or size > rank:
            raise CatError(
                f"coefficients_from: module {plan.name} records a core of shape "
                f"{tuple(recorded.shape)}; these skills give an R x R core with R <= {rank}"
            )
        if size > basis.kept:  # written with a basis wider than the skills' span (core_space)
            raise CatError(
                f"coefficients_from: module {plan.name} records a {size} x {size} core, but "
                f"these skills' factors span only {basis.kept} directions there (rank-deficient: "
                "an untrained or repeated skill); the record was written by an earlier release "
                "whose basis left the skills' span. Fit the core again"
            )
        core = torch.zeros_like(core)
        core[:size, :size] = recorded
    present = torch.zeros(1, len(skills), dtype=torch.bool)
    for skill_index, _ in plan.blocks:
        present[0, skill_index] = True
    state = CatState(
        plan.name,
        tuple(skill.name for skill in skills),
        config.parametrization,
        coefficients=nn.Parameter(core.to(device)),
        present=present.to(device),
        skill_cores=basis.skill_cores.to(device),
    )
    _use_cat_variant(layer, state)


def _load_factors(layer, plan: ModulePlan, rank: int) -> None:
    if is_parameter_wrapper(layer):  # per expert, in PEFT's ParamWrapper layout
        load_factors(layer, plan, rank)
        return
    lora_A, lora_B = factor_weights(layer, ADAPTER)
    with torch.no_grad():
        lora_A.zero_()
        lora_B.zero_()
        offset = 0
        for _, factors in plan.blocks:
            lora_A[offset : offset + factors.rank] = factors.lora_A.to(lora_A)
            lora_B[:, offset : offset + factors.rank] = factors.lora_B.to(lora_B)
            offset += factors.rank
