"""CAT under DDP: two processes fit the same coefficients as one, and rank 0 alone exports.

tests/workers/ddp_check.py fits CAT with a transformers Trainer (or TRL's SFTTrainer) on
accelerate's DDP over gloo, in two processes with a per-device batch of 2, and in one plain
process (no process group at all) with a batch of 4: the same global batch of the same
examples at every step, so the same loss, gradient and AdamW updates up to float rounding.

One level below `axolotl train` (tests/test_axolotl_ddp.py runs that): the same
Trainer, accelerate and DDP machinery, driven on attach_cat/export_cat directly, as a
TRL or plain-transformers user would.
"""

import json
from pathlib import Path

import pytest
from compare import export_difference
from workers.launch import finish, launch, ranks

from axolotl_cat_plugin.core.export import write as export

pytestmark = [pytest.mark.e2e, pytest.mark.core_distributed]
STEPS = 6
REQUIRED = {export.CONFIG_FILE, export.WEIGHTS_FILE, export.COEFFICIENTS_FILE}
TOLERANCE = 1e-5


def ddp_check(world, out: Path, *, processes: int, batch: int, trainer: str = "hf") -> str:
    """Run tests/workers/ddp_check.py: under torchrun with `processes` ranks, or as one plain
    process (0)."""
    args = ["--steps", STEPS, "--per-device-batch", batch, "--lr", "0.05", "--seed", "0"]
    process = launch(
        "ddp_check.py", world, out, processes=processes, args=[*args, "--trainer", trainer]
    )
    return finish(process, timeout=300, name=f"{processes or 'one'} process(es), {trainer}")


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    logs = {
        "two": ddp_check(world, root / "two", processes=2, batch=2),
        "one": ddp_check(world, root / "one", processes=0, batch=4),
        "sft": ddp_check(world, root / "sft", processes=2, batch=2, trainer="sft"),
    }
    return {name: (root / name, log) for name, log in logs.items()}


def coefficient_values(out: Path) -> dict[tuple[str, str], list[float]]:
    """Every (module, skill) coefficient in cat_coefficients.json, scalars as 1-lists."""
    record = json.loads((out / "cat_coefficients.json").read_text())
    values = {}
    for module, entry in record["modules"].items():
        for skill, value in entry["coefficients"].items():
            values[module, skill] = value if isinstance(value, list) else [value]
    return values


@pytest.mark.parametrize("name", ["two", "sft"])
def test_every_rank_ends_with_the_same_coefficients(runs, name):
    out, _ = runs[name]
    rank0, rank1 = ranks(out)
    assert (rank0["rank"], rank1["rank"]) == (0, 1)
    for record in (rank0, rank1):
        assert record["world_size"] == 2 and record["global_batch"] == 4
        assert record["steps"] == STEPS and len(record["losses"]) == STEPS
        assert record["ddp_wrapped"], "the Trainer did not wrap the model in DDP"
    assert rank0["alpha"].keys() == rank1["alpha"].keys() and rank0["alpha"]
    assert rank0["alpha"] == rank1["alpha"]  # bitwise: JSON floats hold fp32 values exactly


def test_each_global_step_sees_the_same_examples_in_both_runs(runs):
    """The precondition of the comparison: the ranks split each global batch of the one process."""
    rank0, rank1 = ranks(runs["two"][0])
    (single,) = ranks(runs["one"][0])
    assert len(single["batches"]) == STEPS
    for step, (a, b, whole) in enumerate(
        zip(rank0["batches"], rank1["batches"], single["batches"], strict=True)
    ):
        assert len(a) == len(b) == 2 and len(whole) == 4
        assert sorted(a + b) == whole, f"step {step}: ranks saw {a} + {b}, one process {whole}"


@pytest.mark.parametrize("name", ["two", "sft"])
def test_only_rank_zero_writes_the_export(runs, name):
    out, log = runs[name]
    assert [record["exported"] for record in ranks(out)] == [True, False]
    assert (
        log.count("wrote the CAT export") == 1 and f"rank 0: wrote the CAT export to {out}" in log
    )
    files = {path.name for path in out.iterdir() if path.is_file()}
    files -= {"rank0.json", "rank1.json"}
    assert REQUIRED <= files <= set(export.EXPORT_FILES), files  # one export, nothing else
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]  # no staging


@pytest.mark.parametrize("name", ["two", "sft"])
def test_two_process_export_equals_the_one_process_export(runs, name):
    two, one = runs[name][0], runs["one"][0]
    tensors, coefficients = export_difference(two, one)
    print(f"{name}: adapter max difference {tensors:.3g}, coefficients {coefficients:.3g}")
    assert tensors <= TOLERANCE and coefficients <= TOLERANCE
    record_two = json.loads((two / "cat_coefficients.json").read_text())
    record_one = json.loads((one / "cat_coefficients.json").read_text())
    assert {k: v for k, v in record_two.items() if k != "modules"} == {
        k: v for k, v in record_one.items() if k != "modules"
    }
    configs = [json.loads((out / export.CONFIG_FILE).read_text()) for out in (two, one)]
    for config in configs:  # PEFT keeps them as a set: their JSON order follows the hash seed
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]


def test_training_moved_the_coefficients(runs):
    for record in ranks(runs["two"][0]):
        for name, start in record["alpha_start"].items():
            moved = max(abs(a - b) for a, b in zip(record["alpha"][name], start, strict=True))
            assert moved > 1e-2, f"rank {record['rank']}: {name} stayed at {start}"
    exported = [v for values in coefficient_values(runs["two"][0]).values() for v in values]
    assert max(abs(value - 1.0) for value in exported) > 0.1  # free coefficients start at 1


@pytest.mark.parametrize("name", ["two", "sft"])
def test_folding_the_ddp_wrapped_model_equals_folding_the_model(runs, name):
    for record in ranks(runs[name][0]):
        assert record["wrapped_type"] == "DistributedDataParallel"
        assert record["fold_wrapped_max_difference"] == 0.0


@pytest.mark.parametrize("name", ["two", "sft"])
def test_the_trainers_save_model_writes_the_same_export(runs, name):
    """trainer.save_model under DDP goes through the patched save_pretrained on rank 0."""
    out = runs[name][0]
    saved = out / "trainer_save"
    assert {path.name for path in saved.iterdir()} >= REQUIRED
    assert export_difference(out, saved) == (0.0, 0.0)
