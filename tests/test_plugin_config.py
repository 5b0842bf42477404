"""The `cat_merge:` YAML block: what Axolotl's own config validation accepts and refuses.

Runs Axolotl's validate_config in process (offline, no model loaded), as `axolotl train`
does before anything else.
"""

import contextlib
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from axolotl.integrations.base import PluginManager
from axolotl.utils.config import prepare_plugins, validate_config
from axolotl.utils.dict import DictDefault
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from axolotl_cat_plugin.integration.args import CatMergeConfig

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "example_yamls").rglob("*.yml"))


@pytest.fixture(autouse=True)
def fresh_plugin_manager():
    PluginManager._instance = None
    yield
    PluginManager._instance = None


@pytest.fixture(autouse=True)
def in_a_world(world, tmp_path, monkeypatch):
    """Run from a folder where the example YAMLs' relative skill paths exist."""
    skills = tmp_path / "demo_out" / "tiny" / "skills"
    for name, folder in world["skills"].items():
        shutil.copytree(folder, skills / name)
    monkeypatch.chdir(tmp_path)
    # the demo's YAMLs list demo_plugins.SeedLoraInit, which scripts/demo.sh finds through
    # PYTHONPATH; without this the test passed only after another test had imported from there
    monkeypatch.syspath_prepend(str(REPO / "scripts" / "demo"))
    return tmp_path


def provide_local_skills(config: dict, world) -> None:
    """Create every local skill folder a YAML names (a real tiny adapter), as a user would have."""
    for entry in (config.get("cat_merge") or {}).get("skills", []):
        path = entry if isinstance(entry, str) else entry["path"]
        if (path.startswith((".", "/")) or path.count("/") > 1) and not Path(path).exists():
            shutil.copytree(world["skills"]["math"], path)


def validate(config: dict):
    cfg = DictDefault(config)
    prepare_plugins(cfg)
    return validate_config(cfg)


def example(**overrides) -> dict:
    config = yaml.safe_load((REPO / "example_yamls" / "tiny-cpu" / "cat.yml").read_text())
    config.update(overrides)
    return config


def with_block(**block) -> dict:
    config = example()
    config["cat_merge"] = {**config["cat_merge"], **block}
    return config


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_example_yaml_passes_axolotls_validation(path, world):
    config = yaml.safe_load(path.read_text())
    provide_local_skills(config, world)
    validate(config)


def test_defaults_fill_the_block():
    block = validate(example(cat_merge={"skills": ["demo_out/tiny/skills/math"]})).cat_merge
    assert block["granularity"] == "module"
    assert block["parametrization"] == "free"
    assert block["init"] == 1.0


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (example(cat_merge=None), "cat_merge"),
        (with_block(skills=[]), "skills"),
        (with_block(granularity="tensor"), "granularity"),
        (with_block(parametrization="sigmoid"), "parametrization"),
        (with_block(export_rank=0), "export_rank"),
        (with_block(prune_threshold=-1), "prune_threshold"),
        (with_block(init=float("nan")), "init"),
        (
            with_block(skills=[{"path": "./a", "name": "x"}, {"path": "./b", "name": "x"}]),
            "duplicate",
        ),
        (with_block(skills=[{"path": "./a", "weight": 2}]), "weight"),
        (with_block(typo_key=1), "typo_key"),
        (example(adapter="lora"), "adapter: cat_merge"),
        (example(load_in_4bit=True), "quantized"),
        (example(load_in_8bit=True), "quantized"),
        (
            {**with_block(granularity="model"), "fsdp_version": 2, "fsdp_config": {"a": 1}},
            "granularity: model",
        ),
        (
            {**with_block(granularity="adapter"), "fsdp_version": 2, "fsdp_config": {"a": 1}},
            "granularity: adapter",
        ),
        (with_block(skills=["./no/such/skill"]), "./no/such/skill"),
        (example(output_dir="demo_out/tiny/skills/math"), "the folder of skill"),
        (with_block(granularity="core", prune_threshold=0.1), "prune_threshold"),
        (with_block(skills=["demo_out"]), "adapter_config.json"),
    ],
)
def test_config_mistakes_fail_at_validation_naming_the_key(config, named):
    with pytest.raises((ValidationError, ValueError)) as error:
        validate(config)
    assert named in str(error.value)


def test_granularity_adapter_still_reads_as_model_with_a_deprecation_warning(caplog):
    """`adapter` was this option's name before 0.2; it collided with the YAML's `adapter:`."""
    with caplog.at_level(logging.WARNING, logger="axolotl_cat_plugin"):
        block = validate(with_block(granularity="adapter")).cat_merge
    assert block["granularity"] == "model" and type(block["granularity"]) is str
    assert "'adapter' is deprecated" in caplog.text and "'model'" in caplog.text
    assert validate(with_block(granularity="model")).cat_merge["granularity"] == "model"


def test_the_old_adapters_key_still_reads_as_skills_with_a_deprecation_warning(caplog):
    """`cat_merge.adapters` (before 0.2) collided with the YAML's own `adapter:` key."""
    config = example()
    config["cat_merge"] = {"adapters": config["cat_merge"]["skills"]}
    with caplog.at_level(logging.WARNING, logger="axolotl_cat_plugin"):
        block = validate(config).cat_merge
    assert block["skills"] == example()["cat_merge"]["skills"] and "adapters" not in block
    assert "cat_merge.adapters is deprecated" in caplog.text
    both = with_block(adapters=example()["cat_merge"]["skills"])
    with pytest.raises((ValidationError, ValueError), match="not also as `adapters`"):
        validate(both)


def test_an_export_rank_above_the_concatenated_rank_is_refused_before_training(world):
    """Checked when the CAT model is built (the rank is known then), not after the fit."""
    from fixtures import load_base

    from axolotl_cat_plugin.core import CatError
    from axolotl_cat_plugin.integration.plugin import CatMergePlugin

    cfg = validate(with_block(export_rank=1000))
    with pytest.raises(CatError, match=r"export_rank: .* the concatenated rank \d+, got 1000"):
        CatMergePlugin().load_adapter(load_base(world["base"]), cfg)
    cfg = validate(with_block(export_rank=2))
    model, config = CatMergePlugin().load_adapter(load_base(world["base"]), cfg)
    assert config.r >= 2


def test_deepspeed_zero3_is_accepted():
    """fold gathers ZeRO-3 partitions (tests/test_zero3.py, tests/test_axolotl_zero3.py)."""
    cfg = validate(example(deepspeed={"zero_optimization": {"stage": 3}}))
    assert cfg.adapter == "cat_merge"


def test_lora_kernels_are_forced_off_for_cat_merge():
    cfg = validate(example(lora_mlp_kernel=True, lora_qkv_kernel=True))
    assert cfg.lora_mlp_kernel is False and cfg.lora_qkv_kernel is False


def test_a_plain_lora_config_is_untouched_by_the_plugin():
    lora = example(adapter="lora", cat_merge=None, lora_r=4, lora_alpha=8, lora_mlp_kernel=None)
    without = {k: v for k, v in lora.items() if k != "plugins"}
    with_plugin = dict(validate(lora))
    PluginManager._instance = None
    plain = dict(validate(without))
    for key in ("plugins", "cat_merge", "inference"):
        with_plugin.pop(key, None)
        plain.pop(key, None)
    assert with_plugin == plain


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.text(max_size=8), st.integers(), st.none()), max_size=3),
    st.dictionaries(st.text(max_size=6), st.one_of(st.text(max_size=6), st.integers()), max_size=3),
)
KEYS = st.sampled_from(
    [
        "adapters",
        "granularity",
        "parametrization",
        "init",
        "dropout",
        "learning_rate",
        "export_rank",
        "prune_threshold",
        "unknown",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_any_malformed_block_gives_a_validation_error_never_a_crash(block):
    with contextlib.suppress(ValidationError):  # any other exception fails the test
        CatMergeConfig.model_validate(block)


def test_the_trainer_reads_its_settings_from_axolotls_training_args():
    """The validated block reaches CatTrainer through Axolotl's training-args mechanism (the
    plugin's mixin and get_training_args, as integrations/kd does), not the raw config."""
    import dataclasses

    from axolotl.integrations.config import merge_training_args
    from transformers import TrainingArguments

    from axolotl_cat_plugin.integration.trainer import CatTrainer

    cfg = validate(with_block(learning_rate=0.05, objective="distill"))
    settings = PluginManager.get_instance().get_training_args(cfg)
    assert settings == {"cat_learning_rate": 0.05, "cat_objective": "distill"}

    # the training arguments class as Axolotl declares it, with the plugins' mixins
    @dataclasses.dataclass
    class TrainingArgs(merge_training_args(), TrainingArguments):
        pass

    args = TrainingArgs(output_dir="out", learning_rate=cfg.learning_rate, **settings)
    trainer = CatTrainer.__new__(CatTrainer)  # its two properties need only its args
    trainer.args = args
    assert (trainer.cat_learning_rate, trainer.cat_objective) == (0.05, "distill")

    PluginManager._instance = None
    config = example()
    config["cat_merge"].pop("learning_rate", None)
    cfg = validate(config)  # no cat_merge.learning_rate: the run's
    settings = PluginManager.get_instance().get_training_args(cfg)
    assert settings == {"cat_learning_rate": cfg.learning_rate, "cat_objective": "lm"}
