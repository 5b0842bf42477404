"""Every adapter_config.json key is known to leave W + scaling * B A unchanged, or refused by
name with its value before anything else of the skill is read (an allow-list, not a deny-list).

The list of keys is PEFT's own: a test walks dataclasses.fields(LoraConfig) of the installed
PEFT, so a field a new PEFT adds fails here until someone classifies it.
"""

import dataclasses
import json
import shutil

import pytest
from fixtures import load_base
from peft import LoraConfig, get_peft_model
from test_validation import copy_skill, edit_config, refused, skill

from axolotl_cat_plugin import CatConfig, CatError, attach_cat
from axolotl_cat_plugin.cli import main
from axolotl_cat_plugin.core.config import SkillSpec
from axolotl_cat_plugin.core.skills.check import ANY_VALUE_KEYS, VARIANT_KEYS, check_config

# a value that turns each variant on (the dataclass defaults are all off)
ON = {
    "use_dora": True,
    "lora_bias": True,
    "use_qalora": True,
    "alora_invocation_tokens": [5, 6],
    "layer_replication": [[0, 2], [1, 2]],
    "trainable_token_indices": [3, 4],
    "arrow_config": {"top_k": 2},
    "use_bdlora": {"target_modules_bd_a": ["q_proj"], "nblocks": 2},
    "velora_config": {"rank": 4},
    "monteclora_config": {"num_samples": 2},
    "megatron_config": {"tensor_model_parallel_size": 2},
    "kasa_config": {"beta": 0.0001},
}


def test_every_lora_config_field_of_this_peft_is_classified():
    fields = {field.name for field in dataclasses.fields(LoraConfig)}
    unclassified = fields - ANY_VALUE_KEYS - set(VARIANT_KEYS)
    assert not unclassified, (
        f"classify these LoraConfig fields in core/skills/check.py: {unclassified}"
    )
    # what PEFT itself calls a LoRA variant is never on the allow-list
    variants = {f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant")}
    assert variants and not variants & ANY_VALUE_KEYS


def test_the_defaults_of_this_peft_pass():
    config = {**LoraConfig(r=2, lora_alpha=4).to_dict(), "peft_type": "LORA"}
    check_config(SkillSpec(path="x", name="x"), config)


@pytest.mark.parametrize("key", sorted(VARIANT_KEYS))
def test_every_variant_is_refused_by_name_with_its_value(key):
    config = {**LoraConfig(r=2, lora_alpha=4).to_dict(), "peft_type": "LORA", key: ON[key]}
    with pytest.raises(CatError) as error:
        check_config(SkillSpec(path="x", name="x"), config)
    assert key in str(error.value) and (repr(ON[key]) in str(error.value) or ON[key] is True)


def test_a_key_this_release_does_not_know_is_refused_unless_off(world, tmp_path):
    # before anything else is read: the weights file is not even valid
    folder = edit_config(copy_skill(world, tmp_path), use_future_variant={"blocks": 4})
    (folder / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    refused(world, [skill(folder, "math")], "'math'", "use_future_variant", "{'blocks': 4}")
    folder = edit_config(copy_skill(world, tmp_path, new_name="off"), use_future_variant=None)
    attach_cat(load_base(world["base"]), CatConfig(skills=[skill(folder, "off")]))


def bdlora_skill(world, folder):
    """A real BD-LoRA skill, saved by the installed PEFT (skipped where PEFT has none)."""
    if "use_bdlora" not in {f.name for f in dataclasses.fields(LoraConfig)}:
        pytest.skip("this PEFT has no BD-LoRA (use_bdlora: PEFT 0.20+)")
    from peft import BdLoraConfig

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "o_proj"],
        use_bdlora=BdLoraConfig(
            target_modules_bd_a=["q_proj"], target_modules_bd_b=["o_proj"], nblocks=2
        ),
    )
    get_peft_model(load_base(world["base"]), config).save_pretrained(folder)
    assert json.loads((folder / "adapter_config.json").read_text())["use_bdlora"]
    return folder


def test_a_bdlora_skill_is_refused_by_attach_cat_and_merge(world, tmp_path, capsys):
    folder = bdlora_skill(world, tmp_path / "bd")
    refused(world, [skill(folder, "bd")], "'bd'", "use_bdlora", "block-diagonal")
    out = tmp_path / "merged"
    argv = ["merge", "--method", "concat", "--weights", "1", "1", "--base", str(world["base"])]
    assert main([*argv, "--out", str(out), str(world["skills"]["math"]), f"bd={folder}"]) == 2
    error = capsys.readouterr().err
    assert "use_bdlora" in error and "Traceback" not in error
    assert not out.exists()  # nothing written


def test_a_bdlora_skill_is_refused_by_the_yaml_validation(world, tmp_path):
    from axolotl.integrations.base import PluginManager
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    folder = bdlora_skill(world, tmp_path / "bd")
    out = tmp_path / "out"
    config = {
        "base_model": str(world["base"]),
        "plugins": ["axolotl_cat_plugin.CatMergePlugin"],
        "adapter": "cat_merge",
        "cat_merge": {"skills": [str(world["skills"]["math"]), str(folder)]},
        "datasets": [{"path": "mix.jsonl", "type": "completion"}],
        "output_dir": str(out),
        "sequence_len": 64,
        "micro_batch_size": 1,
        "num_epochs": 1,
        "learning_rate": 0.01,
    }
    PluginManager._instance = None
    try:
        cfg = DictDefault(config)
        prepare_plugins(cfg)
        with pytest.raises(Exception, match="use_bdlora"):
            validate_config(cfg)
    finally:
        PluginManager._instance = None
    assert not out.exists()


def test_factors_that_do_not_fit_are_said_not_to_fit(world, tmp_path):
    """A shape that does not fit is reported as such; "another base" only when the skill's
    config names another base."""
    from safetensors.torch import load_file, save_file

    folder = copy_skill(world, tmp_path)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, weights)
    base_name = str(world["base"])
    edit_config(folder, base_model_name_or_path=base_name)
    error = refused(world, [skill(folder, "math")], "'math'", "q_proj", "do not fit")
    assert "base model" not in str(error)
    edit_config(folder, base_model_name_or_path="someone/other-base")
    refused(world, [skill(folder, "math")], "do not fit", "'someone/other-base'")


def test_a_skill_whose_base_differs_in_name_only_still_composes(world, tmp_path):
    folder = tmp_path / "renamed"
    shutil.copytree(world["skills"]["math"], folder)
    edit_config(folder, base_model_name_or_path="a/local-copy-of-the-base")
    attach_cat(load_base(world["base"]), CatConfig(skills=[skill(folder, "renamed")]))
