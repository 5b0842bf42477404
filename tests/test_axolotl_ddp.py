"""`axolotl train` in two processes on CPU (DDP over gloo) fits what one process fits.

The recipe a CPU user follows (docs/gpu.md):

    ACCELERATE_USE_CPU=1 axolotl train cat.yml --launcher torchrun -- --nproc_per_node 2

with `max_memory: {cpu: ...}` in the YAML. Without ACCELERATE_USE_CPU, accelerate finds no
accelerator and each process trains alone; without max_memory, Axolotl's
device_map={"": LOCAL_RANK} asks transformers for an accelerator that is not there.

Every row of the data has the same number of tokens: Axolotl's trainer averages the loss per
rank before DDP averages the ranks, which equals one process's average over the whole batch
only when each rank holds as many tokens as the other.
"""

import json

import pytest
import torch
from axolotl_runner import axolotl, axolotl_torchrun, write_config
from compare import export_difference
from fixtures import write_jsonl

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        torch.version.cuda is not None and not torch.cuda.is_available(),
        reason="with WORLD_SIZE > 1 Axolotl asks torch.cuda.can_device_access_peer, which "
        "raises on a CUDA build of torch without a GPU (axolotl 0.21's env here); a CPU "
        "build of torch answers and Axolotl goes on",
    ),
]
TOLERANCE = 1e-5
STEPS = 4


@pytest.fixture(scope="module")
def equal_length_world(e2e_world, tmp_path_factory):
    rows = [{"text": f"Q: {a} + {b}? A: {a} + {b} = {a + b}"} for a in range(8) for b in range(2)]
    assert len({len(row["text"]) for row in rows}) == 1
    mix = write_jsonl(tmp_path_factory.mktemp("ddp-data") / "mix.jsonl", rows)
    return {**e2e_world, "mix": mix}


@pytest.fixture(scope="module")
def runs(equal_length_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("axolotl-ddp")
    common = dict(max_steps=STEPS, save_strategy="no", shuffle_merged_datasets=False)
    one = write_config(equal_length_world, root / "one", micro_batch_size=4, **common)
    two = write_config(
        equal_length_world,
        root / "two",
        micro_batch_size=2,
        max_memory={"cpu": "8GiB"},
        **common,
    )
    single = axolotl("train", str(one), cwd=root)
    double = axolotl_torchrun(two, 2, cwd=root, env={"ACCELERATE_USE_CPU": "1"})
    assert single.returncode == 0 and double.returncode == 0
    return {
        "one": (root / "one" / "out", single.stdout + single.stderr),
        "two": (root / "two" / "out", double.stdout + double.stderr),
    }


def test_two_processes_really_ran_data_parallel(runs):
    _, log = runs["two"]
    # Each process builds its own CatTrainer and says so; Axolotl's own "[RANK:1]" prefix only
    # shows when rank 1 happens to log a warning, which it does on some runs and not others.
    assert log.count("CAT: optimising") == 2
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in log  # the Trainer used DDP
    assert log.count("'train_runtime'") == 1  # only rank 0 logs, as under DDP


def test_every_rank_ends_with_the_same_coefficients(runs):
    _, log = runs["two"]
    assert "CAT: coefficients identical on all 2 ranks" in log


def test_only_rank_zero_writes_the_export(runs):
    out, log = runs["two"]
    assert log.count("CAT: wrote a rank-") == 1
    assert not list(out.glob(".cat-export-*"))  # no staging folder left by another rank


def test_export_equals_a_single_process_run_with_the_same_global_batch(runs):
    one, two = runs["one"][0], runs["two"][0]
    worst, _ = export_difference(one, two)  # inf if the tensor names or shapes differ
    assert worst <= TOLERANCE, f"DDP export differs by {worst:.3g}"
    record_one = json.loads((one / "cat_coefficients.json").read_text())
    record_two = json.loads((two / "cat_coefficients.json").read_text())
    assert record_one["training"]["steps"] == record_two["training"]["steps"] == STEPS
    moved = [
        value
        for entry in record_two["modules"].values()
        for value in entry["coefficients"].values()
        if value != 1.0
    ]
    assert moved, "the coefficients never left their initial value"
