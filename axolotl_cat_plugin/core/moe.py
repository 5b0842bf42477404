"""Skills with LoRA on mixture-of-experts expert weights: recognised, and refused by name.

Two forms reach us (both are per expert e: W_e + s·B_e·A_e, a plain LoRA update):

- `target_parameters` (PEFT >= 0.17, peft/tuners/lora/layer.py `ParamWrapper`): the experts
  are one fused 3-D parameter (Mixtral, Qwen2-MoE in transformers v5: `mlp.experts.gate_up_proj`
  (E, 2I, H), `mlp.experts.down_proj` (E, H, I)); lora_A (r·E, in) holds the experts' A's
  expert-major, lora_B (out, r·E) their B's rank-major, and nested ParamWrappers save under
  `experts.lora_A` / `experts.base_layer.lora_A` in target_parameters order.
- per-expert Linear modules saved by an older PEFT on transformers v4
  (`...block_sparse_moe.experts.N.w1/w2/w3`, `...mlp.experts.N.gate_proj/...`), which this
  transformers no longer has: PEFT converts them to the fused form when it loads the skill
  (peft/utils/transformers_weight_conversion.py: w1 and w3 fused block-diagonally into
  gate_up_proj, with r and lora_alpha doubled).

CAT composes LoRAs on Linear and Embedding modules; the fused form needs its own slot layout
(per expert, two factor orders, nested wrappers) in attach, fold and export, which is not
built yet, and PEFT's own add_weighted_adapter refuses `target_parameters` too. So such a skill
is refused here, naming the form and what works instead.
"""

from __future__ import annotations

import re

from torch import nn

from .errors import CatError

_PER_EXPERT_MODULE = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<leaf>[^.]+)$")

WHAT_WORKS = (
    "What works: compose the skills that adapt attention and dense layers with CAT, and apply "
    "the expert skill at full strength by merging it into the base first (PEFT "
    "merge_and_unload, saved as the new base), or use a version of the skill trained without "
    "expert targets"
)


def expert_parameters_message(where: str, target_parameters) -> str:
    """The refusal for a skill whose adapter_config.json sets target_parameters."""
    return (
        f"{where}: target_parameters {target_parameters!r} puts LoRA on raw parameters such as "
        "MoE expert weights (PEFT's ParamWrapper: for every expert e, W_e + s·B_e·A_e on a fused "
        "3-D parameter). CAT does not compose expert parameters yet, and PEFT's "
        f"add_weighted_adapter refuses them too. {WHAT_WORKS}."
    )


def refuse_per_expert_modules(skill, model: nn.Module) -> None:
    """Refuse a skill with factors on per-expert Linear modules this base does not have.

    The older MoE layout (`...experts.N.w1`): PEFT still loads such a skill on a base whose
    experts are fused, by converting it (see the module docstring). Raises CatError naming the
    skill, a module, the fused parameters of this base and what works; returns when no such
    module exists (per-expert Linear modules that the base has are ordinary Linear LoRAs).
    """
    names = dict(model.named_modules())
    for module_name in sorted(skill.modules):
        match = _PER_EXPERT_MODULE.match(module_name)
        if not match or module_name in names:
            continue
        fused = [
            f"{name}.{param_name}"
            for name, module in names.items()
            if name.endswith(".experts")
            for param_name, param in module.named_parameters(recurse=False)
            if param.dim() == 3
        ]
        here = (
            f"this base fuses each layer's experts into 3-D parameters (e.g. {fused[0]}), and "
            "PEFT converts such a skill into LoRA on those parameters when it loads it"
            if fused
            else "this base has no such module"
        )
        raise CatError(
            f"skill {skill.name!r}: module {module_name} is expert {match['index']}'s "
            f"{match['leaf']} in the per-expert MoE layout an older PEFT/transformers saved; "
            f"{here}. CAT does not compose MoE expert LoRAs yet. {WHAT_WORKS}."
        )
