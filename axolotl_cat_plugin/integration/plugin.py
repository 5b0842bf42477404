"""`CatMergePlugin`: `adapter: cat_merge` for `axolotl train`.

Every hook does nothing unless the config says `adapter: cat_merge`, so listing the plugin
never changes another run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from peft import PeftModel

from ..core import (
    CatError,
    apply_export,
    attach_cat,
    check_ranks_agree,
    fold,
    has_coefficients,
    retire_previous_export,
    write_export,
)
from ..core.card import model_card
from ..core.export import CARD_FILE, PLOT_FILE
from ..core.plot import coefficient_heatmap
from .args import CatMergeConfig

LOG = logging.getLogger(__name__)


def _is_cat(cfg) -> bool:
    return cfg.adapter == "cat_merge"


def _is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


class CatMergePlugin(BasePlugin):
    def __init__(self):
        super().__init__()
        self._trainer = None
        self._card = None  # the export's README.md, rewritten after Axolotl replaces it
        # our logger is no child of "axolotl": give it Axolotl's level so INFO lines show
        logging.getLogger("axolotl_cat_plugin").setLevel(
            logging.getLogger("axolotl").getEffectiveLevel()
        )

    def get_input_args(self) -> str:
        return "axolotl_cat_plugin.integration.args.CatMergeArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [AdapterCapabilities(name="cat_merge", lora_like=False)]

    def pre_model_load(self, cfg):
        if _is_cat(cfg) and not cfg.lora_model_dir and _is_main_process():
            retire_previous_export(cfg.output_dir)

    def load_adapter(self, model, cfg, inference=False, config_only=False):
        if not _is_cat(cfg):
            return None
        if cfg.lora_model_dir:
            if not (inference or cfg.inference or cfg.merge_lora):
                raise CatError(
                    "lora_model_dir is set in a cat_merge training run; the skills come from "
                    "cat_merge.adapters. Remove lora_model_dir (it is for loading a finished "
                    "export, e.g. `axolotl inference cat.yml --lora-model-dir out/cat`)."
                )
            LOG.info("cat_merge: loading the exported adapter from %s", cfg.lora_model_dir)
            peft_model = PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=False)
            return peft_model, peft_model.peft_config["default"]
        if config_only or cfg.rl:
            raise CatError(
                "adapter: cat_merge fits coefficients with supervised fine-tuning only; "
                f"rl: {cfg.rl!r} is not supported"
            )
        peft_model = attach_cat(model, _block(cfg).to_core())
        return peft_model, peft_model.peft_config["default"]

    def get_trainer_cls(self, cfg):
        if not _is_cat(cfg) or cfg.lora_model_dir:
            return None
        from .trainer import CatTrainer

        return CatTrainer

    def post_trainer_create(self, cfg, trainer):
        if _is_cat(cfg) and hasattr(trainer, "cat_learning_rate"):
            trainer.cat_learning_rate = _block(cfg).learning_rate
            self._trainer = trainer

    def post_train(self, cfg, model):
        """Fold the coefficients before Axolotl saves, so its own save writes the export.

        Axolotl calls this twice: right after training, and again after its save, its model
        card and (with hub_model_id) its push. In between, the HF Trainer's create_model_card
        would replace our README.md, and a push would upload that one: so the trainer writes
        our card instead, and the second call, with nothing left to fold, puts our card back
        in case anything else replaced it.
        """
        if not _is_cat(cfg):
            return
        if not has_coefficients(model):
            if self._card is not None and _is_main_process():
                _write_card(cfg.output_dir, self._card)
            return
        check_ranks_agree(model)
        block = _block(cfg)
        folded = fold(model, rank=block.export_rank, prune_threshold=block.prune_threshold)
        folded.record["training"] = self._training_record(cfg, block)
        baselines = self._trainer.cat_baselines() if self._trainer is not None else None
        if baselines is not None:
            folded.record["baselines"] = baselines
        card = plot = None
        if _is_main_process():
            plot = coefficient_heatmap(folded.record)
            card = model_card(
                folded.record,
                config=folded.config.to_dict(),
                hub_model_id=cfg.hub_model_id,
                plot_file=PLOT_FILE if plot is not None else None,
            )
            write_export(folded, cfg.output_dir, card=card, plot=plot)
            self._card = card
        if self._trainer is not None:
            self._trainer.cat_model_card = card
            self._trainer.cat_export = (folded, card, plot)
        apply_export(model, folded)

    def _training_record(self, cfg, block: CatMergeConfig) -> dict:
        state = getattr(self._trainer, "state", None)
        return {
            "datasets": [
                {"path": str(d.get("path")), "type": str(d.get("type"))}
                for d in (cfg.datasets or [])
            ],
            "steps": getattr(state, "global_step", None),
            "learning_rate": block.learning_rate or cfg.learning_rate,
            "sequence_len": cfg.sequence_len,
            "micro_batch_size": cfg.micro_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        }


def _write_card(output_dir, card: str) -> None:
    Path(output_dir, CARD_FILE).write_text(card)


def _block(cfg) -> CatMergeConfig:
    return CatMergeConfig.model_validate(dict(cfg.cat_merge))
