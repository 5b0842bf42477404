"""CAT under DeepSpeed ZeRO-3: two partitioned processes fit what one plain process fits.

tests/workers/zero3_check.py wraps the CAT model in `deepspeed.initialize` with ZeRO stage 3 (every
parameter partitioned, none kept whole for being small), on the CPU over gloo with two ranks
and a per-device batch of 2; the reference is one plain torch process with a batch of 4 and
the same AdamW. Every rank folds (fold gathers the partitioned factors and coefficients with
GatheredParameters, a collective), rank 0 exports. Unlike FSDP2, ZeRO-3 also fits
granularity `model` (one coefficient tensor shared by every decoder layer).
"""

import importlib.util
import json

import pytest
from compare import export_difference, largest_difference
from workers.launch import ranks, two_ranks_and_one

from axolotl_cat_plugin.core.export import write as export

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.core_distributed,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="deepspeed is not installed (scripts/tools/env.sh installs it)",
    ),
]
STEPS = 4
CONFIGS = ["module-free", "layer-softmax", "rank-free", "model-free"]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    env = {"DS_ACCELERATOR": "cpu"}
    logs = two_ranks_and_one("zero3_check.py", world, root, steps=STEPS, timeout=400, env=env)
    return {name: root / name for name in logs}


@pytest.mark.parametrize("config", CONFIGS)
def test_every_parameter_is_partitioned_and_only_the_coefficients_train(runs, config):
    for record in ranks(runs["two"] / config):
        assert record["world_size"] == 2 and record["global_batch"] == 4
        assert record["trainable"] == sorted(record["alphas"]) and record["alphas"]
        assert record["frozen_partitioned"] == record["frozen"]  # base and skill factors too
        for name, alpha in record["alphas"].items():
            assert alpha["partitioned"] and alpha["dtype"] == "torch.float32", name
            assert alpha["held_outside_forward"] == 0, name  # gathered only while needed


@pytest.mark.parametrize("config", CONFIGS)
def test_every_rank_folds_the_same_adapter_and_only_rank_zero_writes(runs, config):
    rank0, rank1 = ranks(runs["two"] / config)
    assert rank0["fold_digest"] == rank1["fold_digest"]
    assert rank0["alpha"] == rank1["alpha"] and rank0["losses"] == rank1["losses"]
    files = {path.name for path in (runs["two"] / config).iterdir()}
    required = {export.CONFIG_FILE, export.WEIGHTS_FILE, export.COEFFICIENTS_FILE}
    assert files == required | {"rank0.json", "rank1.json"}


@pytest.mark.parametrize("config", CONFIGS)
def test_the_partitioned_fit_equals_the_plain_fit(runs, config):
    two, one = runs["two"] / config, runs["one"] / config
    (partitioned, _), (single,) = ranks(two), ranks(one)
    assert not single["partitioned"] and single["global_batch"] == 4
    losses = largest_difference(partitioned["losses"], single["losses"])
    alphas = largest_difference(partitioned["alpha"], single["alpha"])
    tensors, coefficients = export_difference(two, one)
    print(
        f"{config}: losses {losses:.3g}, coefficients {alphas:.3g}, adapter tensors {tensors:.3g}"
    )
    assert max(losses, alphas, tensors, coefficients) <= TOLERANCE
    moved = largest_difference(partitioned["alpha"], partitioned["alpha_start"])
    assert moved > 1e-2, f"training left the coefficients where they started ({moved})"
    shapes = [json.loads((out / "rank0.json").read_text())["fold_shapes"] for out in (two, one)]
    assert shapes[0] == shapes[1]
