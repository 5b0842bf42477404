"""Fit CAT coefficients with DDP (gloo, CPU) and export from rank 0; one level below Axolotl.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/workers/ddp_check.py \
        --out OUT --per-device-batch 2
    python -m torch.distributed.run --standalone --nproc_per_node 1 tests/workers/ddp_check.py \
        --out OUT1 --per-device-batch 4

What a run proves, together with tests/test_distributed.py: under DistributedDataParallel the
CAT coefficients stay identical on every rank, a rank-0 `export_cat` writes the same
adapter as a one-process run over the same global batches, and folding works on the
DDP-wrapped model as on the unwrapped one.

Why at core level: TRL and plain-transformers users fit CAT without Axolotl;
tests/test_axolotl_ddp.py runs `axolotl train` itself under torchrun.

Every rank writes OUT/rank{R}.json (its coefficients before and after, the example ids of
each step, the losses, and what folding the DDP-wrapped model gave); rank 0 alone writes the
export to OUT and OUT/trainer_save (the Trainer's own save_model path).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

from compare import tensor_difference  # noqa: E402
from fixtures import load_base  # noqa: E402

from axolotl_cat_plugin.core import CatConfig, attach_cat, export_cat  # noqa: E402
from axolotl_cat_plugin.core.export.fold import fold  # noqa: E402  (see fsdp2_check.py)
from workers.common import (  # noqa: E402
    SEQUENCE_LEN,
    argument_parser,
    base_and_skills,
    close,
    coefficients,
    make_rows,
    rank,
    world_size,
    write_record,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__.split("\n\n")[0], steps=6)
    parser.add_argument("--granularity", default="module")
    parser.add_argument("--parametrization", default="free")
    parser.add_argument("--trainer", choices=["hf", "sft"], default="hf")
    parser.add_argument(
        "--sampling",
        choices=["random", "sequential"],
        default="random",
        help="train_sampling_strategy; random is seeded by --seed and the same on every rank",
    )
    parser.add_argument(
        "--examples",
        type=int,
        default=0,
        help="dataset size (default: exactly steps x global batch, one epoch)",
    )
    return parser.parse_args(argv)


def recording(base_cls, ids: dict[tuple[int, ...], int]):
    """base_cls that remembers which examples each micro-batch of this rank held."""

    class Recording(base_cls):
        def compute_loss(self, model, inputs, *args, **kwargs):
            batch = sorted(ids[tuple(row)] for row in inputs["input_ids"].tolist())
            self.cat_batches.append(batch)
            return super().compute_loss(model, inputs, *args, **kwargs)

    return Recording


def build_trainer(args, model, tokenizer, rows, out: Path):
    ids = {tuple(row): i for i, row in enumerate(rows)}
    common = dict(
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.per_device_batch,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        seed=args.seed,
        data_seed=args.seed,
        train_sampling_strategy=args.sampling,
        dataloader_drop_last=True,
        dataloader_num_workers=0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        # gloo under torchrun; a plain `python` run is one process with no process group
        ddp_backend="gloo" if "LOCAL_RANK" in os.environ else None,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
    )
    if args.trainer == "sft":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**common, max_length=SEQUENCE_LEN, packing=False)
        dataset = Dataset.from_list([{"input_ids": row} for row in rows])
        trainer = recording(SFTTrainer, ids)(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer
        )
    else:
        config = TrainingArguments(**common, remove_unused_columns=False)
        dataset = Dataset.from_list(
            [{"input_ids": row, "attention_mask": [1] * len(row), "labels": row} for row in rows]
        )
        trainer = recording(Trainer, ids)(
            model=model,
            args=config,
            train_dataset=dataset,
            data_collator=default_data_collator,
            processing_class=tokenizer,
        )
    trainer.cat_batches = []
    return trainer


def fold_difference(a, b) -> float:
    """Largest difference between two folded adapters (inf if they differ in shape or keys)."""
    return tensor_difference(a.tensors, b.tensors) if a.record == b.record else float("inf")


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, skills = base_and_skills(args, out)

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    config = CatConfig(
        [str(path) for path in skills],
        granularity=args.granularity,
        parametrization=args.parametrization,
        dropout=0.0,
    )
    model = attach_cat(load_base(base), config)
    start = coefficients(model)

    global_batch = args.per_device_batch * world_size()
    rows = make_rows(args.examples or args.steps * global_batch, len(tokenizer), args.seed)
    trainer = build_trainer(args, model, tokenizer, rows, out)
    trainer.train()

    unwrapped, wrapped = trainer.model, trainer.model_wrapped
    is_ddp = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    folded = fold(unwrapped)
    wrapped_difference = fold_difference(folded, fold(wrapped))

    exported = trainer.is_world_process_zero()
    if exported:
        export_cat(unwrapped, out)
        print(f"rank {rank()}: wrote the CAT export to {out}", flush=True)
    # the Trainer's own save (checkpoints, Axolotl's final save) goes through the patched
    # save_pretrained; it is collective, so every rank calls it and rank 0 writes
    trainer.save_model(str(out / "trainer_save"))

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record = {
        "rank": rank(),
        "world_size": world_size(),
        "trainer": args.trainer,
        "global_batch": global_batch,
        "steps": trainer.state.global_step,
        "ddp_wrapped": is_ddp,
        "wrapped_type": type(wrapped).__name__,
        "fold_wrapped_max_difference": wrapped_difference,
        "exported": exported,
        "batches": trainer.cat_batches,
        "losses": losses,
        "alpha_start": start,
        "alpha": coefficients(unwrapped),
    }
    write_record(out, record)
    print(
        f"rank {rank()}/{world_size()}: {trainer.state.global_step} steps, global batch "
        f"{global_batch}, model {type(wrapped).__name__}, fold(wrapped) vs fold(unwrapped) "
        f"max difference {wrapped_difference}, losses {[round(x, 6) for x in losses]}",
        flush=True,
    )
    close()


if __name__ == "__main__":
    main()
