"""Through the real `axolotl train`: mistakes are refused before any compute, a diverging
run stops without exporting, a re-run never mixes exports, and a run killed mid-training
resumes to the uninterrupted result.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from axolotl_runner import axolotl, axolotl_command, write_config
from safetensors.torch import load_file

pytestmark = pytest.mark.e2e


def test_a_missing_skill_is_refused_at_validation_naming_it_and_writing_nothing(
    e2e_world, tmp_path
):
    config = write_config(e2e_world, tmp_path, max_steps=2)
    text = config.read_text().replace(str(e2e_world["skills"]["code"]), "./skills/no-such-skill")
    config.write_text(text)

    result = axolotl("train", str(config), cwd=tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "./skills/no-such-skill" in output and "does not exist" in output
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "prepared").exists()  # refused before the dataset was tokenized


def test_a_diverging_run_stops_with_a_clear_message_and_exports_nothing(e2e_world, tmp_path):
    config = write_config(e2e_world, tmp_path, max_steps=20)
    text = config.read_text().replace("learning_rate: 0.05", "learning_rate: 1.0e+30")
    config.write_text(text)

    result = axolotl("train", str(config), cwd=tmp_path)
    assert result.returncode != 0
    assert "the loss became" in result.stdout + result.stderr
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "out" / "cat_coefficients.json").exists()


def test_rerunning_into_an_export_moves_it_aside_and_never_mixes(e2e_world, tmp_path):
    def config(name, **overrides):  # write_config writes tmp_path/config.yml: keep each one
        return write_config(e2e_world, tmp_path, **overrides).rename(tmp_path / f"{name}.yml")

    steps = dict(max_steps=2, save_strategy="steps", save_steps=1)
    first = config("first", **steps)
    text = first.read_text().replace("learning_rate: 0.05", "learning_rate: 0.05\n  export_rank: 2")
    first.write_text(text)
    second = config("second", max_steps=2)
    third = config("third", **steps)
    resume = config("resume", auto_resume_from_checkpoints=True, **steps)

    assert axolotl("train", str(first), cwd=tmp_path).returncode == 0
    out = tmp_path / "out"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    # the record says whether the fit finished: checkpoints were written during it
    assert json.loads((out / "cat_coefficients.json").read_text())["fit_finished"] is True
    during = json.loads((out / "checkpoint-1" / "cat_coefficients.json").read_text())
    assert during["fit_finished"] is False

    assert axolotl("train", str(second), cwd=tmp_path).returncode == 0
    rank = json.loads((out / "adapter_config.json").read_text())["r"]
    assert rank == 7 == json.loads((out / "cat_coefficients.json").read_text())["exported_rank"]
    tensors = load_file(out / "adapter_model.safetensors")
    assert all(t.shape[0] == rank for k, t in tensors.items() if ".lora_A." in k)
    previous = out / "previous_export"
    assert json.loads((previous / "adapter_config.json").read_text())["r"] == 2
    assert json.loads((previous / "cat_coefficients.json").read_text())["exported_rank"] == 2
    # the first run's checkpoints went with its export, not beside the second run's
    assert (previous / "checkpoint-2").is_dir() and not (out / "checkpoint-2").exists()

    # a third run keeps both earlier exports
    assert axolotl("train", str(third), cwd=tmp_path).returncode == 0
    assert json.loads((previous / "adapter_config.json").read_text())["r"] == 2
    assert json.loads((out / "previous_export.2" / "adapter_config.json").read_text())["r"] == 7

    # resuming the finished third run is refused, naming the option, with nothing moved
    before = sorted(p.name for p in out.iterdir())
    assert "checkpoint-2" in before
    result = axolotl("train", str(resume), cwd=tmp_path)
    assert result.returncode != 0
    assert "auto_resume_from_checkpoints" in result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_sigkill_mid_training_then_resume_ends_with_the_uninterrupted_coefficients(
    e2e_world, tmp_path
):
    steps = dict(max_steps=40, save_strategy="steps", save_steps=4)
    uninterrupted = write_config(e2e_world, tmp_path / "whole", **steps)
    assert axolotl("train", str(uninterrupted), cwd=tmp_path).returncode == 0

    killed = write_config(e2e_world, tmp_path / "killed", **steps)
    command, env = axolotl_command("train", str(killed))
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    out = tmp_path / "killed" / "out"
    deadline = time.time() + 300
    while not (out / "checkpoint-8" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "never reached checkpoint-8"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "checkpoint-40").exists(), "the run finished before it was killed"

    complete = sorted(
        (p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists()),
        key=lambda p: int(p.name.split("-")[1]),
    )[-1]
    for partial in out.glob("checkpoint-*"):
        if int(partial.name.split("-")[1]) > int(complete.name.split("-")[1]):
            shutil.rmtree(partial)
    resumed = write_config(
        e2e_world, tmp_path / "killed", resume_from_checkpoint=str(complete), **steps
    )
    assert axolotl("train", str(resumed), cwd=tmp_path).returncode == 0

    expected = load_file(
        tmp_path / "whole" / "out" / "checkpoint-40" / "cat_coefficients.safetensors"
    )
    got = load_file(out / "checkpoint-40" / "cat_coefficients.safetensors")
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert (value - got[name]).abs().max() <= 1e-6, name
