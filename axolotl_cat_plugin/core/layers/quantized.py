"""A bitsandbytes-quantized base (QLoRA users: load_in_4bit / load_in_8bit).

PEFT wraps bitsandbytes' Linear4bit / Linear8bitLt in its own LoRA layers
(peft/tuners/lora/bnb.py), whose forward hands the base output to our LoRA variant as the
full-precision Linear does; the factors and coefficients stay fp32, so the fit and the export
are the same as on a full-precision base (the export is the same standard adapter).

One thing needs care, on the CPU only: bitsandbytes 0.50's Linear4bit.forward
(bitsandbytes/nn/modules.py), on a CPU with AVX512-BF16, repacks its weights in place the
first time it runs in eval mode without gradients, and the packed matmul it uses from then on
returns no gradient to its input. A CAT fit that evaluated (or generated) once would then
silently stop training every coefficient below the last quantized layer. We turn that
repacking off on the base's 4-bit layers (`support_avx512bf16_for_cpu`); a base already
repacked is refused.
"""

from __future__ import annotations

from torch import nn

from ..errors import CatError


def keep_gradients_through_4bit_layers(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU weight repacking on every 4-bit layer; how many there were.

    Raises CatError naming a layer whose weights were already repacked (the base ran an
    inference forward on the CPU before attach_cat): reload the base.
    """
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if hasattr(module, "support_avx512bf16_for_cpu")
    ]
    for name, module in layers:  # refuse before changing anything
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise CatError(
                f"4-bit layer {name}: bitsandbytes repacked its weights for CPU inference (the "
                "base ran a forward in eval mode before attach_cat), and the packed matmul "
                "passes no gradient back; reload the base and call attach_cat before any "
                "forward"
            )
    for _, module in layers:
        module.support_avx512bf16_for_cpu = False
    return len(layers)
