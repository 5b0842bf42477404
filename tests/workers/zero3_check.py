"""Fit CAT coefficients under DeepSpeed ZeRO-3 and fold them; one level below Axolotl.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/workers/zero3_check.py \
        --out OUT --per-device-batch 2            # ZeRO-3, two ranks, gloo on the CPU
    python tests/workers/zero3_check.py --out OUT1 --per-device-batch 4   # plain torch reference

What a run proves, together with tests/test_zero3.py: under `deepspeed.initialize` with
ZeRO stage 3 every parameter, the frozen skill factors and the fp32 CAT coefficients
alike, is partitioned (outside forward a rank holds an empty tensor); the CAT forward still
sees whole factors (ZeRO-3 gathers parameters a module reads in forward); the coefficients
fitted by two partitioned ranks equal one plain process's over the same global batches; and
`fold` / `skill_coefficients` (collective: they gather the factors with GatheredParameters)
give every rank the same adapter, which rank 0 writes.

Each --config is fitted in turn into OUT/<granularity>-<parametrization>/ as with
tests/workers/fsdp2_check.py, whose helpers this reuses. On a CPU set DS_ACCELERATOR=cpu.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

from workers.common import close, coefficients, write_record  # noqa: E402
from workers.fsdp2_check import (  # noqa: E402
    begin,
    cat_model,
    distributed,
    parameter_facts,
    parse_args,
    train_and_fold,
)


def partition_facts(model) -> dict:
    """What ZeRO-3 made of the parameters: each coefficient's full shape and what a rank holds."""

    def describe(p):
        return {
            "dtype": str(p.dtype),
            "full_shape": list(getattr(p, "ds_shape", p.shape)),
            "held_outside_forward": p.numel(),
            "partitioned": hasattr(p, "ds_id"),
        }

    return parameter_facts(model, describe, "frozen_partitioned", lambda p: hasattr(p, "ds_id"))


def fit(args, base: Path, skills: list[Path], spec: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = cat_model(args, base, skills, spec)
    start = coefficients(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    engine = model
    if distributed():
        import deepspeed

        engine, optimizer, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config={
                "train_micro_batch_size_per_gpu": args.per_device_batch,
                # partition every parameter, however small, as a large model's would be
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9,
            },
        )
    facts = partition_facts(model)

    def update(loss):
        if distributed():
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    record = {"partitioned": distributed(), **facts}
    folded = train_and_fold(args, model, engine, update, spec, out, start, record)
    record["fold_shapes"] = {key: list(t.shape) for key, t in folded.tensors.items()}
    write_record(out, record)


def init_deepspeed(backend: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)


def main(argv=None) -> None:
    args = parse_args(argv)
    out, base, skills = begin(args, init_deepspeed)
    for spec in args.configs:
        fit(args, base, skills, spec, out / spec.replace(":", "-"))
    close()


if __name__ == "__main__":
    main()
