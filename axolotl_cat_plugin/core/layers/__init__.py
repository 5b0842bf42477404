"""What a wrapped layer computes, one kind per file behind `variants.py` (PEFT's LoraVariant
pattern): `linear.py` (+ `fused.py`, its one autograd Function), `embedding.py`, `experts.py`
(MoE ParamWrapper), `saved_modules.py` (modules_to_save), `quantized.py` (a bitsandbytes
base). Reads and writes each layer's state through `state.py`, nothing above it."""
