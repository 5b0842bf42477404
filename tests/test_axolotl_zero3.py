"""`axolotl train` with DeepSpeed ZeRO-3 writes the export a plain run writes.

Under ZeRO-3 Axolotl saves through the Trainer (DeepSpeed's consolidated state dict), not
through PEFT's save_pretrained; that path cannot gather the plain LoRA factors the plugin put
in place of the partitioned ones, so the trainer writes the plugin's folded export instead.

On this CPU machine the run is one process under torchrun: with WORLD_SIZE 1 Axolotl would
initialise the process group with nccl itself, which a CPU build lacks, and
AXOLOTL_IS_PREPROCESS=1 skips that (DeepSpeed then sets up gloo). A GPU run needs neither
that nor DS_ACCELERATOR.
"""

import importlib.util
import json

import pytest
from axolotl_runner import axolotl, axolotl_torchrun, write_config
from compare import export_difference

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="deepspeed is not installed (scripts/tools/env.sh installs it)",
    ),
]
TOLERANCE = 1e-5
ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "zero_allow_untested_optimizer": True,
}


@pytest.fixture(scope="module")
def runs(e2e_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("axolotl-zero3")
    (root / "zero3.json").write_text(json.dumps(ZERO3))
    plain = write_config(e2e_world, root / "plain", max_steps=4)
    zero3 = write_config(
        e2e_world,
        root / "zero3",
        max_steps=4,
        deepspeed=str(root / "zero3.json"),
        max_memory={"cpu": "8GiB"},
    )
    single = axolotl("train", str(plain), cwd=root)
    env = {"DS_ACCELERATOR": "cpu", "AXOLOTL_IS_PREPROCESS": "1"}
    sharded = axolotl_torchrun(zero3, 1, cwd=root, env=env)
    assert single.returncode == 0 and sharded.returncode == 0
    return {
        "plain": (root / "plain" / "out", single.stdout + single.stderr),
        "zero3": (root / "zero3" / "out", sharded.stdout + sharded.stderr),
    }


def test_axolotl_saved_through_the_zero3_path(runs):
    # one writer: the plugin writes the export once; Axolotl's save (trainer.save_model under
    # ZeRO-3, the model's save_pretrained otherwise) then leaves the folder as written
    for run in ("zero3", "plain"):
        _, log = runs[run]
        assert log.count("CAT: wrote a rank-") == 1, run
        assert "already holds this export; leaving it as written" in log, run


def test_the_zero3_export_equals_the_plain_export(runs):
    zero3, plain = runs["zero3"][0], runs["plain"][0]
    worst, _ = export_difference(zero3, plain)  # inf if the tensor names or shapes differ
    assert worst <= TOLERANCE, f"ZeRO-3 export differs by {worst:.3g}"
    records = [json.loads((out / "cat_coefficients.json").read_text()) for out in (zero3, plain)]
    assert records[0]["modules"].keys() == records[1]["modules"].keys()
    assert "# CAT adapter" in (zero3 / "README.md").read_text()  # our card, not the Trainer's
