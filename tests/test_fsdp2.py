"""CAT under FSDP2: two sharded processes fit the same coefficients as one unsharded process.

tests/workers/fsdp2_check.py shards the CAT model as accelerate does for Axolotl's `fsdp_version: 2`
(`fully_shard` on each decoder layer, then on the root), on the CPU over gloo with two ranks
and a per-device batch of 2, and fits the coefficients with AdamW; the reference is one plain
process, no process group, no sharding, with a batch of 4: the same global batch at every
step, so the same losses, gradients and updates up to float rounding. Every rank folds
(collectively), rank 0 exports. Granularities module (rank 1 holds an empty shard), layer
(one coefficient tensor shared inside an FSDP unit) and rank (2 + 2 rows) are fitted in the
same processes; model (shared across units) is refused by FSDP2, which is pinned here too.
"""

import json

import pytest
import torch.distributed as dist
from compare import export_difference, largest_difference
from workers.launch import ranks, two_ranks_and_one

from axolotl_cat_plugin.core.export import write as export

pytestmark = [pytest.mark.e2e, pytest.mark.core_distributed]
STEPS = 4
FITTED = ["module-free", "layer-softmax", "rank-free"]
REFUSED = "model-free"
REQUIRED = {export.CONFIG_FILE, export.WEIGHTS_FILE, export.COEFFICIENTS_FILE}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as error:
        pytest.skip(f"this torch has no FSDP2: {error}")
    if not dist.is_gloo_available():
        pytest.skip("this torch has no gloo backend: FSDP2 cannot run on the CPU")
    root = tmp_path_factory.mktemp("fsdp2")
    logs = two_ranks_and_one("fsdp2_check.py", world, root, steps=STEPS, timeout=300)
    return {name: (root / name, log) for name, log in logs.items()}


@pytest.mark.parametrize("config", FITTED)
def test_the_coefficients_are_the_only_trainable_parameters_and_fp32_dtensor_shards(runs, config):
    rank0, rank1 = ranks(runs["two"][0] / config)
    for record in (rank0, rank1):
        assert record["world_size"] == 2 and record["global_batch"] == 4 and record["sharded"]
        assert record["model_type"] == "FSDPPeftModelForCausalLM"
        assert record["trainable"] == sorted(record["alphas"]) and record["alphas"]
        assert record["frozen_dtensors"] == record["frozen"]  # the frozen weights are sharded too
        for name, alpha in record["alphas"].items():
            assert alpha["dtensor"] and alpha["dtype"] == "torch.float32", name
            assert alpha["placements"] == ["Shard(dim=0)"], name
    shards = {
        name: (alpha["local_shape"], rank1["alphas"][name]["local_shape"])
        for name, alpha in rank0["alphas"].items()
    }
    expected = {"rank-free": ([2, 3], [2, 3])}.get(config, ([1, 3], [0, 3]))
    assert all(shard == expected for shard in shards.values()), shards
    assert len(shards) == (2 if config == "layer-softmax" else 12)  # per layer / per module


@pytest.mark.parametrize("config", FITTED)
def test_every_rank_folds_the_same_adapter(runs, config):
    rank0, rank1 = ranks(runs["two"][0] / config)
    assert rank0["fold_digest"] == rank1["fold_digest"]
    assert rank0["fold_types"] == rank1["fold_types"] == ["Tensor"]  # gathered, no DTensor left
    assert rank0["alpha"] == rank1["alpha"] and rank0["losses"] == rank1["losses"]
    assert rank0["skill_coefficients"] == rank1["skill_coefficients"]


@pytest.mark.parametrize("config", FITTED)
def test_only_rank_zero_writes_the_export(runs, config):
    two, log = runs["two"]
    out = two / config
    assert log.count(f"rank 0: wrote the CAT export to {out}") == 1  # lines may interleave
    assert "rank 1: wrote" not in log
    files = {path.name for path in out.iterdir()}
    assert files == REQUIRED | {"rank0.json", "rank1.json"}  # one export, no staging folder


@pytest.mark.parametrize("config", FITTED)
def test_the_sharded_fit_equals_the_unsharded_fit(runs, config):
    two, one = runs["two"][0] / config, runs["one"][0] / config
    (sharded, _), (single,) = ranks(two), ranks(one)
    assert not single["sharded"] and single["world_size"] == 1 and single["global_batch"] == 4
    losses = largest_difference(sharded["losses"], single["losses"])
    alphas = largest_difference(sharded["alpha"], single["alpha"])
    skills = largest_difference(sharded["skill_coefficients"], single["skill_coefficients"])
    tensors, coefficients = export_difference(two, one)
    print(
        f"{config}: max difference losses {losses:.3g}, coefficients {alphas:.3g}, "
        f"skill_coefficients {skills:.3g}, adapter tensors {tensors:.3g}, "
        f"exported coefficients {coefficients:.3g}"
    )
    assert max(losses, alphas, skills, tensors, coefficients) <= TOLERANCE
    assert len(sharded["losses"]) == STEPS
    moved = largest_difference(sharded["alpha"], sharded["alpha_start"])
    assert moved > 1e-2, f"training left the coefficients where they started ({moved})"
    records = [json.loads((out / export.COEFFICIENTS_FILE).read_text()) for out in (two, one)]
    headers = [{k: v for k, v in record.items() if k != "modules"} for record in records]
    assert headers[0] == headers[1]
    configs = [json.loads((out / export.CONFIG_FILE).read_text()) for out in (two, one)]
    for adapter_config in configs:  # PEFT keeps them as a set: the JSON order follows the hash
        adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
    assert configs[0] == configs[1]


def test_granularity_model_is_refused_by_fsdp2_not_fitted_wrong(runs):
    """One coefficient tensor shared by all decoder layers spans FSDP units: FSDP2 says so."""
    out = runs["two"][0] / REFUSED
    for record in ranks(out):
        assert "shared with a parameter already managed by another FSDP group" in record["refused"]
    assert not (out / export.CONFIG_FILE).exists()
    assert {path.name for path in (runs["one"][0] / REFUSED).iterdir()} >= REQUIRED
