"""Axolotl plugins the demo's YAMLs list (demo.sh puts scripts/ on PYTHONPATH).

`SeedLoraInit`: axolotl 0.19 creates a LoRA (its random lora_A) before anything seeds torch,
so two runs of one YAML train different skills; 0.21 calls `set_seed(cfg.seed)` right before
`get_peft_model`. This plugin does the same on both versions, in the hook Axolotl calls just
before it loads adapters, so a demo seed gives the same adapters every time.
"""

from __future__ import annotations

from axolotl.integrations.base import BasePlugin
from transformers import set_seed


class SeedLoraInit(BasePlugin):
    def pre_lora_load(self, cfg, model):
        set_seed(cfg.seed if cfg.seed is not None else 42)
