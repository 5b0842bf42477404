"""Put CAT on a model: one PEFT adapter `default` holding every skill, plus the coefficients.

What a finished CAT model is asked (its layers, its metadata) lives in state.py.
"""

from __future__ import annotations

import logging
import types

from peft import PeftModel, get_peft_model
from torch import nn

from .config import CatConfig
from .errors import CatError
from .export.fold import scaling_one_config
from .granularity.base import granularity_named
from .layers.experts import dropout_outside_parameters, lora_layers
from .layers.quantized import keep_gradients_through_4bit_layers
from .layers.variants import MODULE_KINDS, load_factors
from .skills.check import warn_on_foreign_base
from .skills.plan import (
    ModulePlan,
    fan_in_fan_out_for,
    plan_modules,
    plan_parameters,
    target_modules_for,
    target_parameters_for,
)
from .skills.read import load_skills
from .starting import starting_coefficients
from .state import (
    ADAPTER,
    CatMetadata,
    CatState,
    is_coefficient,
    keep_frozen_on_set_adapter,
    put_state,
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
    parameters = plan_parameters(model, skills)  # LoRA on MoE expert parameters (layers/experts.py)
    granularity_named(config.granularity).refuse(plans, parameters)
    for kind in MODULE_KINDS:  # whole modules composed beside the LoRA (modules_to_save)
        kind.check(skills, model)
    starting = starting_coefficients(config, skills)  # refuse a bad record before wrapping
    keep_gradients_through_4bit_layers(model)  # a QLoRA base on the CPU (layers/quantized.py)
    rank = max(plan.rank for plan in [*plans, *parameters])
    target_modules = target_modules_for([plan.name for plan in plans])
    fan_in_fan_out = fan_in_fan_out_for(model, [plan.name for plan in plans])
    modules_to_save = [name for kind in MODULE_KINDS for name in kind.modules_to_save(skills)]
    lora_config = scaling_one_config(
        rank,
        target_modules=target_modules,
        target_parameters=target_parameters_for(parameters) or None,
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=modules_to_save or None,
        lora_dropout=0.0 if parameters else config.dropout,  # ParamWrapper refuses dropout
        # the factors are the skills': drawing random ones first would only waste time
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, lora_config)
    if parameters:
        dropout_outside_parameters(peft_model, config.dropout)
    _install(peft_model, [*plans, *parameters], skills, config, starting)
    for kind in MODULE_KINDS:
        kind.install(peft_model, skills, config)
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
    from .export.write import export_cat  # export builds on state, never on attach

    if is_main_process:
        export_cat(self, save_directory)


def _install(peft_model, plans, skills, config: CatConfig, starting) -> None:
    """Load the concatenated factors and give every wrapped module its CatState: the
    granularity shapes the planned ones, a wrapped module no skill touches gets zero factors
    and a state without coefficients."""
    rank = peft_model.peft_config[ADAPTER].r
    layers = dict(lora_layers(peft_model.base_model.model))  # by module (or parameter) name
    names = tuple(skill.name for skill in skills)
    planned = {plan.name for plan in plans}
    for name, module in layers.items():
        if name not in planned:
            load_factors(module, ModulePlan(name, []), rank)  # wrapped, touched by no skill
            put_state(module, CatState(name, names, config.parametrization))
    granularity_named(config.granularity).install(layers, plans, skills, config, starting, rank)
