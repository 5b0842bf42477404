"""`CatMergePlugin`: `adapter: cat_merge` for `axolotl train`.

Every hook does nothing unless the config says `adapter: cat_merge`, so listing the plugin
never changes another run.
"""

from __future__ import annotations

import json
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
    has_coefficients,
    retire_previous_export,
)
from ..core.export.fold import check_export_options
from ..core.export.write import compose, run_checkpoints, write
from ..core.format import COEFFICIENTS_FILE, PREVIOUS_EXPORT, read_record
from .args import CatMergeConfig

LOG = logging.getLogger(__name__)


def _is_cat(cfg) -> bool:
    return cfg.adapter == "cat_merge"


def _is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _inside(path, folder) -> bool:
    if not path or not folder:
        return False
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def _refuse_resuming_a_finished_fit(cfg, resuming: bool) -> None:
    """Resuming from checkpoints beside an export whose fit finished would continue that
    finished fit, not start this one: refuse, saying how to move on."""
    output_dir = Path(cfg.output_dir)
    checkpoints = run_checkpoints(output_dir)
    if not resuming or not checkpoints or not (output_dir / COEFFICIENTS_FILE).is_file():
        return
    try:
        finished = read_record(output_dir).fit_finished
    except CatError:
        return  # not a record we read: nothing says the fit finished
    if finished:
        option = (
            f"resume_from_checkpoint: {cfg.resume_from_checkpoint}"
            if cfg.resume_from_checkpoint
            else "auto_resume_from_checkpoints: true"
        )
        raise CatError(
            f"{option}: {output_dir} holds a CAT fit that finished (its cat_coefficients.json "
            f"says so) and its checkpoints ({checkpoints[-1].name} the last), so resuming would "
            "continue that finished fit instead of running this one. To fit again, remove the "
            "option (the old export and checkpoints are then kept in "
            f"{output_dir / PREVIOUS_EXPORT}*); or choose another output_dir"
        )


class CatMergePlugin(BasePlugin):
    """`adapter: cat_merge` for Axolotl (hooks in the order Axolotl calls them).

    pre_model_load moves an earlier export aside; load_adapter builds the CAT model from the
    `cat_merge` block (or, with lora_model_dir, loads a finished export for inference);
    get_trainer_cls supplies CatTrainer; post_train writes the export (see there).
    """

    def __init__(self):
        super().__init__()
        self._trainer = None
        self._validated: tuple[str, CatMergeConfig] | None = None
        # our logger is no child of "axolotl": give it Axolotl's level so INFO lines show
        logging.getLogger("axolotl_cat_plugin").setLevel(
            logging.getLogger("axolotl").getEffectiveLevel()
        )

    def get_input_args(self) -> str:
        """The pydantic model Axolotl mixes into its config (the `cat_merge` block)."""
        return "axolotl_cat_plugin.integration.args.CatMergeArgs"

    def get_training_args_mixin(self) -> str:
        """The dataclass Axolotl mixes into its training arguments (CatTrainingArgsMixin)."""
        return "axolotl_cat_plugin.integration.args.CatTrainingArgsMixin"

    def get_training_args(self, cfg) -> dict:
        """The trainer's CAT settings, from the block as validated once: the coefficients'
        learning rate (cat_merge.learning_rate, else the run's) and the objective."""
        if not _is_cat(cfg):
            return {}
        block = self._config(cfg)
        return {
            "cat_learning_rate": block.learning_rate or cfg.learning_rate,
            "cat_objective": block.objective,
        }

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        """Declares the adapter name `cat_merge` to Axolotl."""
        return [AdapterCapabilities(name="cat_merge", lora_like=False)]

    def load_datasets(self, cfg, preprocess=False):
        """With cat_merge.self_mix (the skills write the mix) or objective distill (each row
        keeps its teacher): the run's datasets, built by integration/datasets.py; else None,
        and Axolotl loads them itself."""
        if not _is_cat(cfg) or cfg.lora_model_dir or cfg.rl:
            return None
        from .datasets import load_cat_datasets

        return load_cat_datasets(cfg, self._config(cfg))

    def pre_model_load(self, cfg):
        """Before Axolotl writes anything: an export already in output_dir goes to a new
        generation folder, previous_export/ or previous_export.N/ (retire_previous_export),
        and so do an earlier run's checkpoint-N folders unless this run resumes.

        Resuming (auto_resume_from_checkpoints, or resume_from_checkpoint inside output_dir)
        continues an interrupted run: its checkpoints stay. A run whose export says the fit
        finished is not resumed: raises CatError naming the options.
        """
        if not _is_cat(cfg) or cfg.lora_model_dir:
            return
        resuming = bool(cfg.auto_resume_from_checkpoints) or _inside(
            cfg.resume_from_checkpoint, cfg.output_dir
        )
        _refuse_resuming_a_finished_fit(cfg, resuming)
        if _is_main_process():
            retire_previous_export(cfg.output_dir, checkpoints=not resuming)

    def load_adapter(self, model, cfg, inference=False, config_only=False):
        """(PeftModel, LoraConfig): the CAT model for training, or the export for inference.

        Raises CatError for lora_model_dir in a training run and for RL (rl:) configs.
        """
        if not _is_cat(cfg):
            return None
        if cfg.lora_model_dir:
            if not (inference or cfg.inference or cfg.merge_lora):
                raise CatError(
                    "lora_model_dir is set in a cat_merge training run; the skills come from "
                    "cat_merge.skills. Remove lora_model_dir (it is for loading a finished "
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
        block = self._config(cfg)
        peft_model = attach_cat(model, block.to_core())
        # the export's rule with the concatenated rank known: before training, not after
        concatenated_rank = peft_model.peft_config["default"].r
        check_export_options(block.granularity, concatenated_rank, block.export_rank)
        return peft_model, peft_model.peft_config["default"]

    def get_trainer_cls(self, cfg):
        """CatTrainer for a cat_merge training run, else None (Axolotl's default)."""
        if not _is_cat(cfg) or cfg.lora_model_dir:
            return None
        from .trainer import CatTrainer

        return CatTrainer

    def post_trainer_create(self, cfg, trainer):
        """Keeps the trainer, which post_train asks for the static-mix comparison."""
        if _is_cat(cfg) and hasattr(trainer, "cat_baselines"):
            self._trainer = trainer  # post_train asks it for the static-mix comparison

    def _config(self, cfg) -> CatMergeConfig:
        """The cat_merge block as validated once per run (validation reads every skill's
        adapter_config.json; Axolotl has already validated the same block)."""
        key = json.dumps(cfg.cat_merge, sort_keys=True, default=str)
        if self._validated is None or self._validated[0] != key:
            self._validated = (key, CatMergeConfig.model_validate(dict(cfg.cat_merge)))
        return self._validated[1]

    def post_train(self, cfg, model):
        """Fold the coefficients and write the export, once, before Axolotl saves.

        The export (adapter, cat_coefficients.json, card, heatmap) is composed by the core's
        one composer and written to output_dir by its one atomic writer. The model then
        becomes the plain LoRA it describes, whose save_pretrained leaves output_dir as
        written: Axolotl's save, its model card and a hub_model_id push all see that folder
        unchanged. Axolotl calls this hook again after its save; there is nothing left to do
        then.
        """
        if not _is_cat(cfg) or not has_coefficients(model):
            return
        check_ranks_agree(model)
        block = self._config(cfg)
        extra = {"fit_finished": True, "training": self._training_record(cfg, block)}
        movement = self._trainer.cat_movement() if self._trainer is not None else None
        if movement is not None:
            extra["training"]["coefficient_movement"] = movement
        baselines = self._trainer.cat_baselines(block.grader) if self._trainer is not None else None
        if baselines is not None:
            extra["baselines"] = baselines
        export = compose(
            model,
            rank=block.export_rank,
            prune_threshold=block.prune_threshold,
            extra=extra,
            hub_model_id=cfg.hub_model_id,
            card=_is_main_process(),
        )
        if _is_main_process():
            write(export, cfg.output_dir)
        apply_export(model, export, written_to=cfg.output_dir)

    def _training_record(self, cfg, block: CatMergeConfig) -> dict:
        state = getattr(self._trainer, "state", None)
        return {
            "datasets": [
                {"path": str(d.get("path")), "type": str(d.get("type"))}
                for d in (cfg.datasets or [])
            ],
            "steps": getattr(state, "global_step", None),
            "learning_rate": block.learning_rate or cfg.learning_rate,
            "objective": block.objective,
            "self_mix": block.self_mix.model_dump() if block.self_mix is not None else None,
            "sequence_len": cfg.sequence_len,
            "micro_batch_size": cfg.micro_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        }
