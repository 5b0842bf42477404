"""Fit CAT coefficients under FSDP2 (`fully_shard`) and fold them; one level below Axolotl.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/workers/fsdp2_check.py \
        --out OUT --per-device-batch 2            # FSDP2, two ranks, gloo on the CPU
    python tests/workers/fsdp2_check.py --out OUT1 --per-device-batch 4   # unsharded reference

What a run proves, together with tests/test_fsdp2.py: sharded the way Axolotl shards with
`fsdp_version: 2` (accelerate's fsdp2_prepare_model: `fully_shard` on every decoder layer,
then on the root), the CAT coefficients are fp32 DTensor shards and the only
trainable parameters; AdamW on them fits the same coefficients as one unsharded process
over the same global batches; `fold` (collective: every rank calls it) gives every rank the
same adapter; `skill_coefficients` works on the sharded model; and a rank-0 `write_export`
writes the adapter the unsharded run exports. Granularity `model` (one coefficient tensor
shared across decoder layers) cannot be sharded this way: FSDP2 refuses a parameter shared
by two FSDP units, and the run records that refusal instead of an export.

Each --config (granularity:parametrization) is fitted in turn in the same processes, into
OUT/<granularity>-<parametrization>/: the export (rank 0) and rank{R}.json per rank (sharding
facts, losses, coefficients, skill_coefficients, a digest of what fold gave that rank).
Without torchrun the model is not sharded and there is no process group at all.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

from fixtures import load_base  # noqa: E402

from axolotl_cat_plugin.core import CatConfig, attach_cat, write_export  # noqa: E402

# `fold` from its home module: once the submodule axolotl_cat_plugin.core.export.fold is imported,
# the package attribute `fold` is that module, not the function the lazy __getattr__ gives
from axolotl_cat_plugin.core.export.fold import fold, skill_coefficients  # noqa: E402
from axolotl_cat_plugin.core.state import is_coefficient  # noqa: E402
from workers.common import (  # noqa: E402
    argument_parser,
    base_and_skills,
    close,
    coefficients,
    make_rows,
    rank,
    world_size,
    write_record,
)

# module: one coefficient row per module, so rank 1 holds an empty shard; layer: one
# coefficient tensor shared by the modules of a decoder layer (one FSDP unit); rank: 4 rows,
# split 2 + 2 over the ranks; model: one coefficient tensor shared by every decoder layer,
# so by several FSDP units, which FSDP2 refuses at the first forward (the run records that)
DEFAULT_CONFIGS = ["module:free", "layer:softmax", "rank:free", "model:free"]
SHARED_ACROSS_UNITS = "is shared with a parameter already managed by another FSDP group"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__.split("\n\n")[0], steps=4)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (CUDA)")
    return parser.parse_args(argv)


def distributed() -> bool:
    return "WORLD_SIZE" in os.environ  # launched by torchrun, even with one process


def shard(model, device: str):
    """FSDP2 as accelerate applies it for Axolotl: each decoder layer, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def parameter_facts(model, describe, split_name: str, is_split) -> dict:
    """The trainable parameters' names, describe(p) of every coefficient tensor, and how many
    of the frozen parameters is_split(p) finds distributed (as `split_name`), of how many."""
    named = list(model.named_parameters())
    return {
        "trainable": sorted(n for n, p in named if p.requires_grad),
        "alphas": {n: describe(p) for n, p in named if is_coefficient(n)},
        split_name: sum(bool(is_split(p)) for _, p in named if not p.requires_grad),
        "frozen": sum(not p.requires_grad for _, p in named),
    }


def sharding_facts(model) -> dict:
    """What FSDP2 made of the parameters: the coefficients' types, dtypes and shards."""
    from torch.distributed.tensor import DTensor

    def describe(p):
        sharded = isinstance(p, DTensor)
        return {
            "dtensor": sharded,
            "dtype": str(p.dtype),
            "shape": list(p.shape),
            "placements": [repr(x) for x in p.placements] if sharded else None,
            "local_shape": list(p.to_local().shape) if sharded else None,
        }

    return parameter_facts(model, describe, "frozen_dtensors", lambda p: isinstance(p, DTensor))


def check_sharding(facts: dict) -> None:
    """The coefficients are fp32 DTensors sharded on dim 0, and the only trainable parameters."""
    assert facts["alphas"], "no coefficient parameter"
    assert facts["trainable"] == sorted(facts["alphas"]), facts["trainable"]
    for name, alpha in facts["alphas"].items():
        assert alpha["dtensor"], f"{name} is not a DTensor"
        assert alpha["dtype"] == "torch.float32", f"{name} is {alpha['dtype']}"
        assert alpha["placements"] == ["Shard(dim=0)"], f"{name}: {alpha['placements']}"


def digest(tensors: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for key in sorted(tensors):
        sha.update(key.encode())
        sha.update(tensors[key].detach().float().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def cat_model(args, base: Path, skills: list[Path], spec: str):
    """The CAT model of one --config (granularity:parametrization) on args.device."""
    granularity, parametrization = spec.split(":")
    torch.manual_seed(args.seed)
    config = CatConfig(
        [str(path) for path in skills],
        granularity=granularity,
        parametrization=parametrization,
        dropout=0.0,
    )
    return attach_cat(load_base(base), config).to(args.device)


def train_steps(args, vocab_size: int, loss_of, update) -> list[float]:
    """args.steps steps over the same global batches whatever the world size: this rank's
    slice of each goes to loss_of(ids); update(loss) backpropagates and steps. The global
    batch's losses (the mean of the ranks' means) come back."""
    batch, global_batch = args.per_device_batch, args.per_device_batch * world_size()
    rows = make_rows(args.steps * global_batch, vocab_size, args.seed)
    losses = []
    for step in range(args.steps):
        mine = rows[step * global_batch : (step + 1) * global_batch][rank() * batch :][:batch]
        loss = loss_of(torch.tensor(mine, device=args.device))
        update(loss)
        mean = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(mean)
            mean /= world_size()
        losses.append(float(mean))
    return losses


def fit(args, base: Path, skills: list[Path], spec: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = cat_model(args, base, skills, spec)
    if distributed():
        shard(model, args.device)
    facts = sharding_facts(model)
    if distributed():
        check_sharding(facts)
    start = coefficients(model)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0
    )

    def update(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    record = {"sharded": distributed(), "model_type": type(model).__name__, **facts}
    folded = train_and_fold(args, model, model, update, spec, out, start, record)
    record["fold_devices"] = sorted({str(t.device) for t in folded.tensors.values()})
    record["fold_types"] = sorted({type(t).__name__ for t in folded.tensors.values()})
    write_record(out, record)


def train_and_fold(args, model, engine, update, spec: str, out: Path, start, record: dict):
    """Train through `engine` (the model, or what wraps it; update(loss) steps it), then on
    every rank: gather, fold (collective), rank 0 exports; the common fields of this rank's
    record are added to `record`. The folded adapter comes back."""
    engine.train()
    losses = train_steps(
        args, model.config.vocab_size, lambda ids: engine(input_ids=ids, labels=ids).loss, update
    )
    record.update(
        rank=rank(),
        world_size=world_size(),
        config=spec,
        global_batch=args.per_device_batch * world_size(),
        losses=losses,
        alpha_start=start,
        alpha=coefficients(model),
        skill_coefficients=skill_coefficients(model),
    )
    folded = fold(model)
    if rank() == 0:
        write_export(folded, out)
        print(f"rank 0: wrote the CAT export to {out}", flush=True)
    record["fold_digest"] = digest(folded.tensors)
    print(
        f"rank {rank()}/{world_size()} {spec}: losses {[round(x, 6) for x in losses]}", flush=True
    )
    return folded


def begin(args, init_process_group) -> tuple[Path, Path, list[Path]]:
    """OUT made; under torchrun, this rank's GPU picked (cuda) and init_process_group(backend)
    called; then OUT, the base and the skills."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if distributed():
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        init_process_group(args.backend)
    return out, *base_and_skills(args, out)


def main(argv=None) -> None:
    args = parse_args(argv)
    out, base, skills = begin(args, dist.init_process_group)
    for spec in args.configs:
        folder = out / spec.replace(":", "-")
        try:
            fit(args, base, skills, spec, folder)
        except ValueError as error:
            if not (distributed() and SHARED_ACROSS_UNITS in str(error)):
                raise
            # every rank fails here alike, in FSDP2's lazy init before any collective
            write_record(folder, {"rank": rank(), "config": spec, "refused": str(error)})
            print(f"rank {rank()}/{world_size()} {spec}: FSDP2 refused: {error}", flush=True)
    close()


if __name__ == "__main__":
    main()
