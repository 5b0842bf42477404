"""One demo seed, one set of adapters: a cheap demo stage run twice gives identical files.

Runs the demo's own skill YAML (3 steps instead of 400) through `axolotl train`, with the
demo's SeedLoraInit plugin it lists, on the demo's world and shipped base, twice.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from axolotl_runner import axolotl
from safetensors.torch import load_file

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "scripts" / "demo"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    for command in (
        ["demo_world.py", str(root / "world")],
        [
            "demo_base.py",
            "install",
            str(DEMO / "base"),
            str(root / "world"),
            str(root / "base"),
        ],
    ):
        subprocess.run([sys.executable, str(DEMO / command[0]), *command[1:]], check=True, cwd=REPO)
    return root


def stage_config(demo: Path, run: str) -> Path:
    text = (REPO / "example_yamls" / "tiny-cpu" / "skill-french.yml").read_text()
    text = text.replace("demo_out/world", str(demo / "world")).replace(
        "demo_out/base", str(demo / "base")
    )
    text = re.sub(r"^max_steps: \d+$", "max_steps: 3", text, flags=re.M)
    text = re.sub(r"^output_dir: .*$", f"output_dir: {demo / run}", text, flags=re.M)
    text = re.sub(
        r"^dataset_prepared_path: .*$",
        f"dataset_prepared_path: {demo / run}-data",
        text,
        flags=re.M,
    )
    path = demo / f"{run}.yml"
    path.write_text(text)
    return path


def test_a_seed_gives_the_same_adapter_twice(demo):
    env = {"PYTHONPATH": os.pathsep.join([str(DEMO), os.environ.get("PYTHONPATH", "")])}
    adapters = []
    for run in ("first", "second"):
        result = axolotl("train", str(stage_config(demo, run)), cwd=demo, env=env)
        assert result.returncode == 0, f"axolotl train ({run}) failed"
        adapters.append(load_file(str(demo / run / "adapter_model.safetensors")))
    first, second = adapters
    assert first.keys() == second.keys() and first
    for key in first:
        assert torch.equal(first[key], second[key]), key
    # and the run trained something: lora_B starts at zero
    assert any(first[key].abs().max() > 0 for key in first if "lora_B" in key)


def test_random_skills_match_shapes_and_norms_and_repeat_for_a_seed(demo, tmp_path):
    sys.path.insert(0, str(DEMO))
    from random_skills import randomize  # noqa: PLC0415

    skill = demo / "first"
    if not (skill / "adapter_model.safetensors").exists():
        pytest.skip("needs the adapter of test_a_seed_gives_the_same_adapter_twice")
    outputs = []
    for name in ("a", "b"):
        randomize(skill, tmp_path / name, torch.Generator().manual_seed(7))
        outputs.append(load_file(str(tmp_path / name / "adapter_model.safetensors")))
    real = load_file(str(skill / "adapter_model.safetensors"))
    for key, tensor in real.items():
        assert torch.equal(outputs[0][key], outputs[1][key])
        assert outputs[0][key].shape == tensor.shape
        assert outputs[0][key].norm() == pytest.approx(float(tensor.norm()), rel=1e-5)
        if tensor.norm() > 0:
            assert not torch.allclose(outputs[0][key], tensor)
    assert (tmp_path / "a" / "adapter_config.json").read_text() == (
        skill / "adapter_config.json"
    ).read_text()
