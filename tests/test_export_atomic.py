"""An export killed at any instant leaves the previous complete export or none, never a mix.

A child process exports into one folder over and over, alternating rank 2 and rank 4 (SVD),
and is SIGKILLed at random moments. After each kill the folder must either have no
adapter_config.json (nothing loadable) or be one whole export: config, weights and
cat_coefficients.json all of the same rank.
"""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from safetensors.torch import load_file

CHILD = textwrap.dedent(
    """
    import sys
    from fixtures import load_base
    from axolotl_cat_plugin import CatConfig, attach_cat, export_cat

    base, out, *skills = sys.argv[1:]
    model = attach_cat(load_base(base), CatConfig(skills=skills))
    export_cat(model, out, rank=4)
    print("ready", flush=True)  # one complete export is there: every kill lands after it
    while True:
        for rank in (2, 4):
            export_cat(model, out, rank=rank)
    """
)


def assert_whole_export_or_none(folder):
    if not (folder / "adapter_config.json").exists():
        return "none"
    rank = json.loads((folder / "adapter_config.json").read_text())["r"]
    record = json.loads((folder / "cat_coefficients.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    assert record["exported_rank"] == rank
    assert all(
        t.shape[0] == rank if ".lora_A." in key else t.shape[1] == rank
        for key, t in tensors.items()
    )
    return f"rank {rank}"


def test_sigkill_during_export_never_leaves_a_mix(world, tmp_path):
    out = tmp_path / "export"
    skills = [str(path) for path in world["skills"].values()]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # for `fixtures`
    rng = random.Random(0)
    seen = []
    for _ in range(5):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(world["base"]), str(out), *skills],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 1.0))
        child.send_signal(signal.SIGKILL)
        child.wait()
        seen.append(assert_whole_export_or_none(out))
    assert any(state != "none" for state in seen), seen
