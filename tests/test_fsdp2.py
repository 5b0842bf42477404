"""CAT under FSDP2: two sharded processes fit the same coefficients as one unsharded process.

tests/workers/fsdp2_check.py shards the CAT model as accelerate does for Axolotl's `fsdp_version: 2`
(`fully_shard` on each decoder layer, then on the root), on the CPU over gloo with two ranks
and a per-device batch of 2, and fits the coefficients with AdamW; the reference is one plain
process, no process group, no sharding, with a batch of 4: the same global batch at every
step, so the same losses, gradients and updates up to float rounding. Every rank folds
(collectively), rank 0 exports. Granularities module (rank 1 holds an empty shard), layer
(one coefficient tensor shared inside an FSDP unit) and rank (2 + 2 rows) are fitted in the
same processes; adapter (shared across units) is refused by FSDP2, which is pinned here too.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from safetensors.torch import load_file

from axolotl_cat_plugin.core import export

pytestmark = [pytest.mark.e2e, pytest.mark.core_distributed]
REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "workers" / "fsdp2_check.py"
STEPS = 4
FITTED = ["module-free", "layer-softmax", "rank-free"]
REFUSED = "adapter-free"
REQUIRED = {export.CONFIG_FILE, export.WEIGHTS_FILE, export.COEFFICIENTS_FILE}
TOLERANCE = 1e-5


def launch(
    world, out: Path, *, processes: int, batch: int, script: Path = SCRIPT, env: dict | None = None
) -> subprocess.Popen:
    """Start the script: under torchrun with `processes` ranks, or as one plain process (0)."""
    launcher = [sys.executable]
    if processes:
        launcher += ["-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc_per_node", str(processes)]
    skills = [str(world["skills"][name]) for name in ("math", "code", "prose")]
    command = [*launcher, str(script), "--base", str(world["base"]), "--skills", *skills]
    command += ["--out", str(out), "--steps", str(STEPS), "--per-device-batch", str(batch)]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # torchrun's default for its ranks; the same for the reference
        **(env or {}),
    }
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as error:
        pytest.skip(f"this torch has no FSDP2: {error}")
    if not dist.is_gloo_available():
        pytest.skip("this torch has no gloo backend: FSDP2 cannot run on the CPU")
    root = tmp_path_factory.mktemp("fsdp2")
    # side by side: the processes spend most of their time importing
    processes = {
        "two": launch(world, root / "two", processes=2, batch=2),
        "one": launch(world, root / "one", processes=0, batch=4),
    }
    logs = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}:\n{stdout[-4000:]}{stderr[-6000:]}"
        logs[name] = stdout
    return {name: (root / name, log) for name, log in logs.items()}


def ranks(out: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]


def largest_difference(a, b) -> float:
    """Largest difference between two equally shaped nests of lists / dicts of floats."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max((largest_difference(a[key], b[key]) for key in a), default=0.0)
    if isinstance(a, list):
        assert len(a) == len(b)
        return max((largest_difference(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    return abs(a - b)


def export_difference(a: Path, b: Path) -> tuple[float, float]:
    """Largest difference of the adapter tensors and of the recorded coefficients."""
    tensors_a = load_file(a / export.WEIGHTS_FILE)
    tensors_b = load_file(b / export.WEIGHTS_FILE)
    assert tensors_a.keys() == tensors_b.keys()
    tensors = 0.0
    for key, tensor in tensors_a.items():
        assert tensor.shape == tensors_b[key].shape, key
        if tensor.numel():
            tensors = max(tensors, float((tensor - tensors_b[key]).abs().max()))
    modules = [
        json.loads((out / export.COEFFICIENTS_FILE).read_text())["modules"] for out in (a, b)
    ]
    coefficients = [{name: entry["coefficients"] for name, entry in m.items()} for m in modules]
    return tensors, largest_difference(*coefficients)


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


def test_granularity_adapter_is_refused_by_fsdp2_not_fitted_wrong(runs):
    """One coefficient tensor shared by all decoder layers spans FSDP units: FSDP2 says so."""
    out = runs["two"][0] / REFUSED
    for record in ranks(out):
        assert "shared with a parameter already managed by another FSDP group" in record["refused"]
    assert not (out / export.CONFIG_FILE).exists()
    assert {path.name for path in (runs["one"][0] / REFUSED).iterdir()} >= REQUIRED
