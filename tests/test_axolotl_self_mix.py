"""`cat_merge.self_mix` and `cat_merge.objective: distill` inside Axolotl: config and a real run."""

import json
import re

import pytest
from axolotl.integrations.base import PluginManager
from axolotl_runner import axolotl, write_config
from pydantic import ValidationError
from test_plugin_config import REPO, validate, with_block

from axolotl_cat_plugin.core.fit.distill import SKILL_COLUMN
from axolotl_cat_plugin.core.format import COEFFICIENTS_FILE
from axolotl_cat_plugin.integration.args import SELF_MIX_PLACEHOLDER


@pytest.fixture(autouse=True)
def fresh_plugin_manager(world, tmp_path, monkeypatch):
    PluginManager._instance = None
    monkeypatch.chdir(tmp_path)
    yield
    PluginManager._instance = None


def block_with_skills(world, **block):
    skills = [{"path": str(path), "name": name} for name, path in world["skills"].items()]
    config = with_block(**block)
    config["cat_merge"]["skills"] = skills
    return config


def test_self_mix_takes_the_place_of_datasets(world):
    config = block_with_skills(world, self_mix={"pool": 4, "keep": 2}, objective="distill")
    config.pop("datasets")
    cfg = validate(config)
    assert [d["path"] for d in cfg.datasets] == [SELF_MIX_PLACEHOLDER]
    assert cfg.remove_unused_columns is False  # the teacher column reaches compute_loss
    assert cfg.cat_merge["self_mix"]["pool"] == 4


@pytest.mark.parametrize(
    "change,named",
    [
        (dict(self_mix={"pool": 2, "keep": 3}), "keep \\(3\\) is larger than pool \\(2\\)"),
        (dict(self_mix={"pool": 2, "kept": 1}), "kept"),
        (dict(objective="kl"), "objective"),
        (dict(self_mix={}, _datasets=True), "self_mix writes the fitting mix itself"),
        (dict(objective="distill", _packing=True), "sample_packing: false"),
        (dict(objective="distill", _zero3=True), "FSDP and DeepSpeed ZeRO-3 shard them"),
    ],
)
def test_mistakes_are_refused_at_validation(world, change, named):
    keep_datasets = change.pop("_datasets", False)
    packing = change.pop("_packing", False)
    zero3 = change.pop("_zero3", False)
    config = block_with_skills(world, **change)
    if not keep_datasets and "self_mix" in change:
        config.pop("datasets")
    if packing:
        config["sample_packing"] = True
    if zero3:
        config["deepspeed"] = str(REPO / "example_yamls" / "paper-gpu" / "zero3.json")
    with pytest.raises((ValidationError, ValueError), match=named):
        validate(config)


@pytest.mark.e2e
def test_axolotl_train_writes_the_mix_and_distills_from_it(e2e_world, tmp_path):
    block = {
        "skills": [{"path": str(p), "name": n} for n, p in e2e_world["skills"].items()],
        "granularity": "core",
        "objective": "distill",
        "self_mix": {"prompts": ["Q: ", "def "], "pool": 6, "keep": 3, "max_new_tokens": 12},
    }
    config = write_config(e2e_world, tmp_path, cat_merge=block, datasets=None, max_steps=3)
    result = axolotl("train", str(config), cwd=tmp_path)
    assert result.returncode == 0, "axolotl train failed"
    (mix,) = (tmp_path / "out" / "self_mix").glob("self_mix-*.jsonl")
    rows = [json.loads(line) for line in mix.read_text().splitlines()]
    assert [row[SKILL_COLUMN] for row in rows] == [n for n in e2e_world["skills"] for _ in range(3)]
    record = json.loads((tmp_path / "out" / COEFFICIENTS_FILE).read_text())
    training = record["training"]
    assert training["objective"] == "distill" and training["self_mix"]["keep"] == 3
    assert training["datasets"] == [{"path": str(mix), "type": "completion"}]
    assert training["steps"] == 3
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- objective: distill" in card and "written by the skills themselves" in card
    # the logged loss is the KL to the teachers (about 0.01 here), not the LM loss (about 4.6)
    losses = [
        float(x) for x in re.findall(r"'loss': '?([0-9.e+-]+)", result.stdout + result.stderr)
    ]
    assert losses and max(losses) < 1.0, losses
    # a real mix with a skill column, distilled: the same run on the mix just written
    config = write_config(
        e2e_world,
        tmp_path / "real",
        cat_merge={**block, "self_mix": None},
        datasets=[{"path": str(mix), "ds_type": "json", "type": "completion"}],
        max_steps=2,
    )
    result = axolotl("train", str(config), cwd=tmp_path)
    assert result.returncode == 0, "axolotl train on a real mix with objective distill failed"
