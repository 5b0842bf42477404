"""Axolotl's SFT trainer, fitting only the CAT coefficients.

- the optimiser holds the coefficients alone, without weight decay, at their own learning rate;
- the logs carry each skill's coefficient mean/min/max (so W&B and TensorBoard plot them);
- checkpoints hold the folded adapter (PEFT-loadable) plus the raw coefficients in a
  sidecar, from which `resume_from_checkpoint` continues exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import torch
from axolotl.core.trainers.base import AxolotlTrainer
from safetensors.torch import load_file
from transformers.trainer import TRAINING_ARGS_NAME

from ..core.errors import CatError
from ..core.export.fold import full_tensor, gathered, skill_coefficients
from ..core.export.write import compose, write
from ..core.fit.baselines import is_sharded, static_coefficients, static_mixes
from ..core.fit.distill import DistillLossMixin
from ..core.fit.graded import graded_score, load_grader, read_prompts
from ..core.format import CHECKPOINT_COEFFICIENTS_FILE as COEFFICIENTS_SIDECAR
from ..core.format import (
    COEFFICIENTS_FILE,
    LEGACY_CHECKPOINT_COEFFICIENTS_FILE,
    LEGACY_COEFFICIENT_SUFFIX,
)
from ..core.state import (
    ADAPTER,
    COEFFICIENTS,
    STATE,
    cat_metadata,
    coefficient_parameters,
    has_coefficients,
)

LOG = logging.getLogger(__name__)


class CatModelCardMixin:
    """Axolotl and Trainer.push_to_hub write the Trainer's generic card into output_dir; once
    the export (with its own card) is written there, the folder must stay as written."""

    def create_model_card(self, *args, **kwargs):
        """The Trainer's card, unless output_dir already holds the export and its card."""
        if _holds_export(self.args.output_dir) and not has_coefficients(self.model):
            LOG.info("CAT: keeping the export's model card in %s", self.args.output_dir)
            return None
        return super().create_model_card(*args, **kwargs)


class CatTrainer(CatModelCardMixin, DistillLossMixin, AxolotlTrainer):
    """Reads its settings from its training arguments, which the plugin fills from the
    validated `cat_merge` block (CatTrainingArgsMixin); its loss is the LM loss, or with
    `objective: distill` core.distill's (DistillLossMixin)."""

    @property
    def cat_objective(self) -> str:
        """cat_merge.objective: "lm" (default) or "distill"."""
        return getattr(self.args, "cat_objective", None) or "lm"

    @property
    def cat_learning_rate(self) -> float:
        """cat_merge.learning_rate, else the run's learning_rate (the plugin resolves it)."""
        return getattr(self.args, "cat_learning_rate", None) or self.args.learning_rate

    def train(self, *args, **kwargs):
        """The Trainer's train; every save until the run's end (checkpoints, the save of an
        interrupted run) records `fit_finished: false` (post_train writes true)."""
        cat_metadata(self.model).extra["fit_finished"] = False
        return super().train(*args, **kwargs)

    def create_optimizer(self, model=None):
        """The configured optimizer over the coefficients alone, at cat_learning_rate, with
        no weight decay."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            coefficients = list(coefficient_parameters(opt_model).values())
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(
                self.args, opt_model
            )
            optimizer_kwargs = dict(optimizer_kwargs)
            learning_rate = self.cat_learning_rate
            optimizer_kwargs["lr"] = learning_rate
            # where the coefficients started, for cat_movement() at the end of the fit
            self._cat_start = [p.detach().float().clone() for p in coefficients]
            self.optimizer = optimizer_cls(
                [{"params": coefficients, "weight_decay": 0.0}], **optimizer_kwargs
            )
            LOG.info(
                "CAT: optimising %d coefficients (%d tensors) with %s, lr %g, no weight decay",
                sum(p.numel() for p in coefficients),
                len(coefficients),
                optimizer_cls.__name__,
                learning_rate,
            )
        return self.optimizer

    def training_step(self, model, inputs, *args, **kwargs):
        """Axolotl's step; raises CatError (no export) when the loss is not finite."""
        loss = super().training_step(model, inputs, *args, **kwargs)
        if not torch.isfinite(loss).all():
            # stop here: an export of diverged coefficients would be a broken adapter
            raise CatError(
                f"CAT: the loss became {loss.item()} at step {self.state.global_step + 1}; "
                "stopping without exporting. Lower cat_merge.learning_rate (or learning_rate)."
            )
        return loss

    def log(self, logs, *args, **kwargs):
        """Adds cat/<skill>/mean|min|max of the effective coefficients to each loss log."""
        if "loss" in logs:
            self._cat_losses = [*getattr(self, "_cat_losses", []), float(logs["loss"])]
            for skill, values in skill_coefficients(self.model).items():
                logs[f"cat/{skill}/mean"] = sum(values) / len(values)
                logs[f"cat/{skill}/min"] = min(values)
                logs[f"cat/{skill}/max"] = max(values)
        return super().log(logs, *args, **kwargs)

    def cat_movement(self) -> dict | None:
        """How far the coefficients moved and what the training loss did meanwhile.

        Returns {"relative_change": ||c - c0|| / ||c0|| over every coefficient (fp32),
        "first_loss", "last_loss"} (the first and last logged training loss), or None before
        training, without two logged losses, or when the coefficients are sharded. Logs a
        warning when the coefficients moved by more than half their starting norm while the
        loss improved by less than 2%: on a small mix that is a fit following noise (seen on
        SmolLM2-135M at coefficient learning rate 0.05: 0.14-1.80 after 40 steps, loss flat).
        """
        start, losses = getattr(self, "_cat_start", None), getattr(self, "_cat_losses", [])
        if start is None or len(losses) < 2 or is_sharded(self.model):
            return None
        now = list(coefficient_parameters(self.model).values())
        change = sum(
            float((p.detach().float() - s).pow(2).sum()) for p, s in zip(now, start, strict=True)
        )
        norm = sum(float(s.pow(2).sum()) for s in start)
        result = {
            "relative_change": round((change / max(norm, 1e-24)) ** 0.5, 4),
            "first_loss": losses[0],
            "last_loss": losses[-1],
        }
        if result["relative_change"] > 0.5 and losses[-1] > 0.98 * losses[0]:
            LOG.warning(
                "CAT: the coefficients moved by %.0f%% of their starting norm while the training "
                "loss went from %.4f to %.4f: the fit may be following noise in a small mix; "
                "try a lower cat_merge.learning_rate or fewer steps",
                100 * result["relative_change"],
                losses[0],
                losses[-1],
            )
        return result

    def cat_baselines(self, grader=None) -> dict | None:
        """Each skill alone, the uniform sum, the average and the fitted CAT, compared with
        the coefficients set in place (core/fit/baselines.py): the eval loss on the run's eval
        split and, with ``grader`` (the validated ``cat_merge.grader``), the mean score of the
        user's grader on greedy replies to the user's prompts (core/fit/graded.py), which then
        decides the verdict (higher is better).

        None without an eval split (val_set_size / test_datasets) and without a grader, and
        when the coefficients are sharded (FSDP2, ZeRO-3). Collective under DDP: every rank
        must call it. The loss is the Trainer's own eval loss (evaluation_loop,
        prediction_loss_only). Raises CatError when the grader returns a score outside 0..1.
        """
        if self.eval_dataset is None and grader is None:
            return None
        if is_sharded(self.model):
            LOG.warning("CAT: no comparison with static merges under FSDP2/ZeRO-3 (sharded)")
            return None
        started = time.time()
        if grader is not None:
            prompts, function = read_prompts(grader.prompts), load_grader(grader.function)
        skills = [skill["name"] for skill in cat_metadata(self.model).skills]
        mixes = {**static_mixes(skills), "CAT (fitted)": None}
        rows = []
        # one dataloader for every mix (the Trainer builds a new one per call)
        dataloader = self.get_eval_dataloader() if self.eval_dataset is not None else None
        for label, weights in mixes.items():
            context = (
                static_coefficients(self.model, weights) if weights else contextlib.nullcontext()
            )
            row = {"method": label, "weights": weights}
            with context:
                if dataloader is not None:
                    output = self.evaluation_loop(
                        dataloader,
                        f"CAT baseline: {label}",
                        prediction_loss_only=True,
                    )
                    row["eval_loss"] = output.metrics["eval_loss"]
                if grader is not None:
                    row["graded"] = graded_score(
                        self.model,
                        self.processing_class,
                        prompts,
                        function,
                        grader.max_new_tokens,
                        grader.batch_size,
                    )
            rows.append(row)
        metric = "graded" if grader is not None else "eval_loss"
        sign = 1 if metric == "graded" else -1  # a higher score, a lower loss
        best_static = max(rows[:-1], key=lambda row: sign * row[metric])
        cfg = getattr(self, "axolotl_cfg", None) or {}
        result = {
            "metric": metric,
            "seconds": round(time.time() - started, 1),
            "methods": rows,
            "best_static": best_static["method"],
            "cat_beats_best_static": sign * rows[-1][metric] > sign * best_static[metric],
        }
        if self.eval_dataset is not None:
            # test_datasets the skills never saw, or rows split off the fit's own mix (which
            # come from the skills' training data: a low loss there can reward memorisation)
            result["eval_rows_from"] = (
                "test_datasets" if cfg.get("test_datasets") else "training_mix"
            )
            result["rows_evaluated"] = len(self.eval_dataset)
            LOG.info(
                "CAT: eval loss on %d held-out rows from %s",
                result["rows_evaluated"],
                "test_datasets"
                if result["eval_rows_from"] == "test_datasets"
                else "the training mix (val_set_size): rows of the skills' own data",
            )
        if grader is not None:
            result["grader"] = {"function": grader.function, "prompts": grader.prompts}
            result["prompts_graded"] = len(prompts)
            LOG.info("CAT: %s on %d prompts of %s", grader.function, len(prompts), grader.prompts)
        for row in rows:
            LOG.info(
                "CAT:   %-24s %s",
                row["method"],
                "  ".join(f"{key} {row[key]:.4f}" for key in ("eval_loss", "graded") if key in row),
            )
        LOG.info("CAT: compared in %.1f s", result["seconds"])
        return result

    def save_model(self, output_dir=None, _internal_call=False):
        """Checkpoints: the folded adapter (loadable as is) and the raw coefficients beside it.

        Every rank folds, since gathering FSDP2- or ZeRO-3-sharded factors is collective (the
        Trainer would call the model's save on rank 0 alone and hang); rank 0 writes.
        """
        if not has_coefficients(self.model):
            # post_train has written the export and made the model the plain LoRA it holds:
            # its save_pretrained leaves output_dir as written (DeepSpeed ZeRO-3's own save
            # could not gather the plain factors that replaced partitioned ones)
            if not _holds_export(output_dir or self.args.output_dir):
                return super().save_model(output_dir, _internal_call)
            if self.args.should_save:
                model = self.accelerator.unwrap_model(self.model)
                model.save_pretrained(output_dir or self.args.output_dir)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        export = compose(self.model, card=False)
        with gathered(self.model):
            raw = {
                name: full_tensor(p).detach().float().cpu().clone()
                for name, p in coefficient_parameters(self.model).items()
            }
        if not self.args.should_save:
            return
        write(export, output_dir, coefficients=raw)  # the sidecar in the same atomic write
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # the checkpoint's adapter files are folded; loading them would apply coefficients twice
        model = self.model if model is None else model
        sidecar = os.path.join(resume_from_checkpoint, COEFFICIENTS_SIDECAR)
        legacy = os.path.join(resume_from_checkpoint, LEGACY_CHECKPOINT_COEFFICIENTS_FILE)
        if not os.path.isfile(sidecar) and os.path.isfile(legacy):
            sidecar = legacy  # written before 0.2: `<layer>.cat_alpha` names
        if not os.path.isfile(sidecar):
            raise CatError(
                f"{resume_from_checkpoint} has no {COEFFICIENTS_SIDECAR}; it was not written by a "
                "cat_merge run, so its coefficients cannot be restored"
            )
        saved = {_current_name(name): value for name, value in load_file(sidecar).items()}
        parameters = coefficient_parameters(model)
        if set(saved) != set(parameters):
            raise CatError(
                f"{sidecar} holds coefficients for other modules than this model; was it written "
                "with other skills or another granularity?"
            )
        with torch.no_grad():
            for name, param in parameters.items():
                param.copy_(saved[name])
        LOG.info("CAT: restored %d coefficient tensors from %s", len(saved), sidecar)


def _current_name(name: str) -> str:
    """A coefficient's parameter name as this release spells it (`x.cat_alpha` before 0.2)."""
    if name.endswith(LEGACY_COEFFICIENT_SUFFIX):
        return f"{name[: -len(LEGACY_COEFFICIENT_SUFFIX)]}.{STATE}.{ADAPTER}.{COEFFICIENTS}"
    return name


def _holds_export(folder) -> bool:
    return (Path(folder) / COEFFICIENTS_FILE).is_file()
