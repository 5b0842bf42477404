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

Every rank writes OUT/rank{R}_alpha.json (its coefficients before and after, the example ids
of each step, the losses, and what folding the DDP-wrapped model gave); rank 0 alone writes
the export to OUT and OUT/trainer_save (the Trainer's own save_model path).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from fixtures import build_base, build_skills, load_base  # noqa: E402

from axolotl_cat_plugin.core import CatConfig, attach_cat, export_cat  # noqa: E402
from axolotl_cat_plugin.core.fold import fold  # noqa: E402  (see fsdp2_check.py)
from axolotl_cat_plugin.core.state import is_coefficient  # noqa: E402

SEQUENCE_LEN = 16


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="base model folder (default: build a tiny Llama in OUT)")
    parser.add_argument("--skills", nargs="+", help="skill LoRA folders (default: build three)")
    parser.add_argument("--out", required=True, help="where the export and rank files go")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--per-device-batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
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


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def tiny_world(out: Path) -> tuple[Path, list[Path]]:
    """The test suite's tiny base and three skills, built by rank 0 while the others wait."""
    root = out / "world"
    if rank() == 0 and not (root / "skills" / "prose" / "adapter_config.json").exists():
        base = build_base(root / "base")
        build_skills(base, root / "skills")
        (root / "ready").write_text("ok\n")
    _wait_for(root / "ready")
    return root / "base", [root / "skills" / name for name in ("math", "code", "prose")]


def _wait_for(path: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.2)


def make_rows(count: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`count` distinct fixed-length token rows (BOS first): no padding, so no collation drift."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < count:
        row = [1] + [rng.randrange(4, vocab_size) for _ in range(SEQUENCE_LEN - 1)]
        if tuple(row) not in seen:
            seen.add(tuple(row))
            rows.append(row)
    return rows


def coefficients(model) -> dict[str, list[float]]:
    """Every trainable coefficient tensor by name, flattened (Python floats hold fp32 exactly)."""
    return {
        name: param.detach().float().flatten().tolist()
        for name, param in model.named_parameters()
        if is_coefficient(name)
    }


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
    if a.tensors.keys() != b.tensors.keys() or a.record != b.record:
        return float("inf")
    worst = 0.0
    for key, tensor in a.tensors.items():
        if tensor.shape != b.tensors[key].shape:
            return float("inf")
        worst = max(worst, float((tensor - b.tensors[key]).abs().max()) if tensor.numel() else 0.0)
    return worst


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if bool(args.base) != bool(args.skills):
        raise SystemExit("give --base and --skills together, or neither (a tiny world is built)")
    if args.base:
        base, skills = Path(args.base), [Path(path) for path in args.skills]
    else:
        base, skills = tiny_world(out)

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
    (out / f"rank{rank()}_alpha.json").write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"rank {rank()}/{world_size()}: {trainer.state.global_step} steps, global batch "
        f"{global_batch}, model {type(wrapped).__name__}, fold(wrapped) vs fold(unwrapped) "
        f"max difference {wrapped_difference}, losses {[round(x, 6) for x in losses]}",
        flush=True,
    )
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
