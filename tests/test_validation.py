"""Every user mistake is refused with a CatError before any weight is touched.

The message names what to fix (the skill, its path, the module, the config key), and the
base model handed to `attach_cat` is left exactly as it was: not wrapped, not modified.
A skill's own files are only ever read, and a pickled `.bin` skill only through
`torch.load(weights_only=True)`.
"""

import hashlib
import json
import logging
import math
import shutil

import pytest
import torch
from fixtures import build_base, build_skill, load_base
from peft import IA3Config, LoraConfig, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file

from axolotl_cat_plugin import CatConfig, CatError, attach_cat, export_cat
from axolotl_cat_plugin.core.state import is_coefficient

TOKENS = torch.tensor([[1, 10, 20, 30, 40, 50, 60, 70]])
WEIGHTS = "adapter_model.safetensors"
Q_PROJ = "model.layers.0.self_attn.q_proj"


# ---------------------------------------------------------------- helpers


def refused(world, adapters, *names, **options) -> CatError:
    """attach_cat refuses, naming every one of `names`, and leaves the base untouched."""
    model = load_base(world["base"])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    modules_before = [name for name, _ in model.named_modules()]
    with pytest.raises(CatError) as info:
        attach_cat(model, CatConfig(skills=adapters, **options))
    message = str(info.value)
    for name in names:
        assert str(name) in message, f"{name!r} not named in: {message}"
    assert [name for name, _ in model.named_modules()] == modules_before  # nothing injected
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    return info.value


def copy_skill(world, tmp_path, name="math", new_name=None):
    """A private copy of one of the world's skills, to break as a test pleases."""
    return shutil.copytree(world["skills"][name], tmp_path / (new_name or name))


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder


def rewrite_weights(folder, change):
    tensors = load_file(str(folder / WEIGHTS))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS))
    return folder


def skill(path, name):
    return {"path": str(path), "name": name}


def save_adapter(world, folder, config, **save_options):
    """A real adapter of any PEFT type, saved by PEFT itself."""
    torch.manual_seed(0)
    get_peft_model(load_base(world["base"]), config).save_pretrained(folder, **save_options)
    return folder


def sha256_tree(folder):
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
        if path.is_file()
    }


# ---------------------------------------------------------------- config


def test_empty_skills_list_is_refused():
    for skills in ([], None, ()):
        with pytest.raises(CatError, match="cat_merge.skills"):
            CatConfig(skills=skills)


def test_the_old_adapters_keyword_still_works_with_a_deprecation_warning(tmp_path, caplog):
    entries = [skill(tmp_path / "a", "math")]
    with caplog.at_level(logging.WARNING, logger="axolotl_cat_plugin"):
        config = CatConfig(adapters=entries)
    assert config.skills == CatConfig(skills=entries).skills and config.adapters is None
    assert "cat_merge.adapters is deprecated" in caplog.text
    with pytest.raises(CatError, match="not also as `adapters`"):
        CatConfig(skills=entries, adapters=entries)


def test_duplicate_skill_names_are_refused_naming_the_name(tmp_path):
    with pytest.raises(CatError, match="'math'"):
        CatConfig(skills=[skill(tmp_path / "a", "math"), skill(tmp_path / "b", "math")])
    # two folders called the same get the same default name: they need explicit names
    with pytest.raises(CatError, match="'math'"):
        CatConfig(skills=[str(tmp_path / "a" / "math"), str(tmp_path / "b" / "math")])


@pytest.mark.parametrize(
    "option, value", [("granularity", "per_head"), ("parametrization", "sigmoid")]
)
def test_unknown_granularity_or_parametrization_is_refused(option, value):
    with pytest.raises(CatError) as info:
        CatConfig(skills=["skill"], **{option: value})
    assert option in str(info.value) and value in str(info.value)


@pytest.mark.parametrize("init", [math.nan, math.inf, -math.inf, "1.0", None])
def test_non_finite_or_non_numeric_init_is_refused(init):
    with pytest.raises(CatError, match="init"):
        CatConfig(skills=["skill"], init=init)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, math.nan])
def test_dropout_outside_zero_one_is_refused(dropout):
    with pytest.raises(CatError, match="dropout"):
        CatConfig(skills=["skill"], dropout=dropout)


@pytest.mark.parametrize(
    "entry, key",
    [
        (42, "skills[0]"),
        ({"name": "math"}, "skills[0].path"),
        ({"path": "x", "weight": 2}, "weight"),
        ({"path": "x", "name": 3}, "skills[0].name"),
    ],
)
def test_malformed_adapter_entries_are_refused_naming_the_entry(entry, key):
    with pytest.raises(CatError) as info:
        CatConfig(skills=[entry])
    assert key in str(info.value)


# ---------------------------------------------------------------- finding the skill


def test_missing_local_path_is_refused(world, tmp_path):
    missing = tmp_path / "nowhere" / "math"
    refused(world, [skill(missing, "math")], "'math'", str(missing), "does not exist")


def test_a_file_instead_of_the_adapter_folder_is_refused(world, tmp_path):
    weights = copy_skill(world, tmp_path) / WEIGHTS
    refused(world, [skill(weights, "math")], "'math'", str(weights), "folder")


def test_folder_without_adapter_config_is_refused(world, tmp_path):
    folder = copy_skill(world, tmp_path)
    (folder / "adapter_config.json").unlink()
    refused(world, [skill(folder, "math")], "'math'", "adapter_config.json", str(folder))


def test_folder_without_weights_is_refused(world, tmp_path):
    folder = copy_skill(world, tmp_path)
    (folder / WEIGHTS).unlink()
    refused(world, [skill(folder, "math")], "'math'", str(folder), WEIGHTS)


def test_adapter_config_that_is_not_json_is_refused(world, tmp_path):
    folder = copy_skill(world, tmp_path)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    refused(world, [skill(folder, "math")], "'math'", "adapter_config.json", "not valid JSON")


def test_adapter_config_that_is_not_an_object_is_refused(world, tmp_path):
    folder = copy_skill(world, tmp_path)
    (folder / "adapter_config.json").write_text("[1, 2]")
    refused(world, [skill(folder, "math")], "'math'", "adapter_config.json", "JSON object")


def test_hub_id_while_offline_is_refused_saying_offline(world, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # so the id cannot be a local folder by chance
    repo = "cat-tests-nobody/no-such-skill-lora"
    error = refused(world, [repo], "'no-such-skill-lora'", repo)
    assert "offline" in str(error).lower()


# ---------------------------------------------------------------- what kind of adapter


@pytest.mark.parametrize(
    "kind, config",
    [
        ("IA3", IA3Config(task_type="CAUSAL_LM")),
        ("PREFIX_TUNING", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    ],
)
def test_non_lora_peft_adapters_are_refused(world, tmp_path, kind, config):
    folder = save_adapter(world, tmp_path / "other", config)
    refused(world, [skill(folder, "other")], "'other'", "peft_type", kind)


def test_dora_adapter_is_refused(world, tmp_path):
    config = LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"], use_dora=True)
    folder = save_adapter(world, tmp_path / "dora", config)
    refused(world, [skill(folder, "dora")], "'dora'", "use_dora")


@pytest.mark.parametrize("bias", [{"bias": "all"}, {"bias": "lora_only"}, {"lora_bias": True}])
def test_trained_biases_are_refused(world, tmp_path, bias):
    config = LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"], **bias)
    folder = save_adapter(world, tmp_path / "biased", config)
    key, value = next(iter(bias.items()))
    # the message names the setting that trained biases, and the fix for both settings
    refused(world, [skill(folder, "biased")], "'biased'", f"{key}={value!r}", "lora_bias: false")


def test_factors_outside_the_skills_own_targets_are_composed_with_a_warning(
    world, tmp_path, caplog
):
    """PEFT loads only the modules a skill's config targets; a hand-edited config that
    narrows target_modules leaves factors PEFT would ignore, which CAT says it composes."""
    narrowed = tmp_path / "narrowed"
    shutil.copytree(world["skills"]["math"], narrowed)
    config = json.loads((narrowed / "adapter_config.json").read_text())
    (narrowed / "adapter_config.json").write_text(
        json.dumps({**config, "target_modules": ["q_proj"]})
    )
    with caplog.at_level(logging.WARNING, logger="axolotl_cat_plugin"):
        attach_cat(load_base(world["base"]), CatConfig(skills=[skill(narrowed, "narrowed")]))
    assert "does not target" in caplog.text and "PEFT ignores them" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="axolotl_cat_plugin"):
        attach_cat(
            load_base(world["base"]), CatConfig(skills=[skill(world["skills"]["math"], "m")])
        )
    assert "does not target" not in caplog.text


def test_init_must_be_a_number_and_is_said_unused_under_softmax(tmp_path, caplog):
    entries = [skill(tmp_path / "a", "math")]
    with pytest.raises(CatError, match="cat_merge.init"):
        CatConfig(skills=entries, init=True)
    with caplog.at_level(logging.WARNING, logger="axolotl_cat_plugin"):
        CatConfig(skills=entries, parametrization="softmax", init=0.7)
    assert "init 0.7 is not used with parametrization softmax" in caplog.text


def test_pissa_adapter_relative_to_a_modified_base_is_refused(world, tmp_path):
    # PiSSA (like OLoRA, CorDA, LoRA-GA, LoftQ) rewrites the base weights: its factors only
    # mean something on that residual base, so adding them to the original one is wrong
    config = LoraConfig(
        task_type="CAUSAL_LM", r=2, target_modules=["q_proj"], init_lora_weights="pissa"
    )
    folder = save_adapter(world, tmp_path / "pissa", config)
    refused(world, [skill(folder, "pissa")], "'pissa'", "init_lora_weights", "pissa")


@pytest.mark.parametrize("init", ["olora", "corda", "lora_ga", "loftq", "pissa_niter_4"])
def test_other_base_rewriting_initialisations_are_refused(world, tmp_path, init):
    folder = edit_config(copy_skill(world, tmp_path), init_lora_weights=init)
    refused(world, [skill(folder, "math")], "'math'", "init_lora_weights", init)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva"])
def test_initialisations_that_leave_the_base_alone_are_accepted(world, tmp_path, init):
    folder = edit_config(copy_skill(world, tmp_path), init_lora_weights=init)
    attach_cat(load_base(world["base"]), CatConfig(skills=[skill(folder, "math")]))


@pytest.mark.parametrize(
    "key, value",
    [
        ("use_qalora", True),
        ("alora_invocation_tokens", [5, 6]),
        ("layer_replication", [[0, 2], [1, 2]]),
        ("trainable_token_indices", [3, 4]),
        ("arrow_config", {"top_k": 2}),
    ],
)
def test_lora_variants_that_compute_something_else_are_refused(world, tmp_path, key, value):
    folder = edit_config(copy_skill(world, tmp_path), **{key: value})
    refused(world, [skill(folder, "math")], "'math'", key)


@pytest.mark.parametrize("key, value", [("r", 0), ("lora_alpha", None), ("r", "4")])
def test_missing_or_non_positive_rank_or_alpha_is_refused(world, tmp_path, key, value):
    folder = edit_config(copy_skill(world, tmp_path), **{key: value})
    refused(world, [skill(folder, "math")], "'math'", f"{key} must")


def test_rank_in_config_disagreeing_with_the_weights_is_refused(world, tmp_path):
    folder = edit_config(copy_skill(world, tmp_path), r=8)
    refused(world, [skill(folder, "math")], "'math'", "rank 4", "r=8")


# ---------------------------------------------------------------- does it fit the base


def test_skill_trained_on_another_architecture_is_refused_naming_the_module(world, tmp_path):
    wide = build_base(tmp_path / "wide", hidden=48)
    folder = build_skill(wide, tmp_path / "wide-math", seed=1, r=2, target_modules=["q_proj"])
    refused(world, [skill(folder, "wide")], "'wide'", Q_PROJ, "48")


def test_target_module_the_base_lacks_is_refused(world, tmp_path):
    folder = copy_skill(world, tmp_path)
    edit_config(folder, target_modules=["q_proj", "v_proj", "down_proj", "c_attn"])
    refused(world, [skill(folder, "math")], "'math'", "'c_attn'")


def test_target_modules_regex_matching_nothing_or_invalid_is_refused(world, tmp_path):
    folder = edit_config(copy_skill(world, tmp_path), target_modules=".*c_attn")
    refused(world, [skill(folder, "math")], "'math'", "'.*c_attn'")
    edit_config(folder, target_modules="(q_proj")
    refused(world, [skill(folder, "math")], "'math'", "(q_proj")


def test_weights_for_a_module_the_base_lacks_are_refused(world, tmp_path):
    def rename(tensors):
        for which in ("A", "B"):
            old = f"base_model.model.{Q_PROJ}.lora_{which}.weight"
            new = f"base_model.model.model.layers.0.self_attn.c_attn.lora_{which}.weight"
            tensors[new] = tensors.pop(old)

    folder = rewrite_weights(copy_skill(world, tmp_path), rename)
    refused(world, [skill(folder, "math")], "'math'", "model.layers.0.self_attn.c_attn")


def test_weights_on_a_module_that_is_not_linear_are_refused(world, tmp_path):
    def move_to_norm(tensors):
        for which in ("A", "B"):
            old = f"base_model.model.{Q_PROJ}.lora_{which}.weight"
            tensors[f"base_model.model.model.norm.lora_{which}.weight"] = tensors.pop(old)

    folder = rewrite_weights(copy_skill(world, tmp_path), move_to_norm)
    refused(world, [skill(folder, "math")], "'math'", "model.norm", "LlamaRMSNorm")


def test_foreign_tensors_in_the_weights_are_refused_naming_the_key(world, tmp_path):
    # a DoRA magnitude vector in a skill whose config does not say use_dora
    key = f"base_model.model.{Q_PROJ}.lora_magnitude_vector"

    def add_magnitude(tensors):
        tensors[key] = torch.ones(32)

    folder = rewrite_weights(copy_skill(world, tmp_path), add_magnitude)
    refused(world, [skill(folder, "math")], "'math'", key)


def test_a_factor_without_its_partner_is_refused(world, tmp_path):
    def drop_b(tensors):
        del tensors[f"base_model.model.{Q_PROJ}.lora_B.weight"]

    folder = rewrite_weights(copy_skill(world, tmp_path), drop_b)
    refused(world, [skill(folder, "math")], "'math'", Q_PROJ, "lora_B")


def test_different_base_model_name_is_only_a_warning(world, tmp_path, caplog):
    folder = edit_config(copy_skill(world, tmp_path), base_model_name_or_path="org/other-base")
    with caplog.at_level(logging.WARNING, logger="axolotl_cat_plugin"):
        model = attach_cat(load_base(world["base"]), CatConfig(skills=[skill(folder, "math")]))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'math'" in r.getMessage() and "org/other-base" in r.getMessage() for r in warnings)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=TOKENS).logits).all()


def test_same_base_model_name_gives_no_warning(world, caplog):
    with caplog.at_level(logging.WARNING, logger="axolotl_cat_plugin"):
        attach_cat(load_base(world["base"]), CatConfig(skills=[str(world["skills"]["math"])]))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------- the weights themselves


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(world, tmp_path, bad):
    key = f"base_model.model.{Q_PROJ}.lora_B.weight"

    def poison(tensors):
        tensors[key][3, 1] = bad

    folder = rewrite_weights(copy_skill(world, tmp_path), poison)
    refused(world, [skill(folder, "math")], "'math'", key, "NaN or Inf")


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "empty"])
def test_corrupt_safetensors_file_is_refused(world, tmp_path, damage):
    folder = copy_skill(world, tmp_path)
    path = folder / WEIGHTS
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage header":
        path.write_bytes(b"\xff" * 8 + data[8:])
    else:
        path.write_bytes(b"")
    refused(world, [skill(folder, "math")], "'math'", str(path), "corrupt")


def as_bin(folder):
    """The same skill with its weights pickled as adapter_model.bin, as older PEFT saved."""
    torch.save(load_file(str(folder / WEIGHTS)), folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()
    return folder


def test_bin_skill_is_read_with_weights_only_and_equals_its_safetensors_twin(
    world, tmp_path, monkeypatch
):
    folder = as_bin(copy_skill(world, tmp_path))
    calls = []
    original = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    from_bin = attach_cat(load_base(world["base"]), CatConfig(skills=[skill(folder, "math")]))
    monkeypatch.undo()
    assert calls == [True]

    reference = attach_cat(
        load_base(world["base"]), CatConfig(skills=[skill(world["skills"]["math"], "math")])
    )
    with torch.no_grad():
        assert torch.equal(from_bin(input_ids=TOKENS).logits, reference(input_ids=TOKENS).logits)


class _RunsCode:
    """Unpickling this calls open(marker, "w"): what a malicious .bin would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_bin_pickle_that_would_run_code_is_refused_without_running_it(world, tmp_path):
    folder = copy_skill(world, tmp_path)
    (folder / WEIGHTS).unlink()
    marker = tmp_path / "code-ran"
    payload = {f"base_model.model.{Q_PROJ}.lora_A.weight": _RunsCode(marker)}
    torch.save(payload, folder / "adapter_model.bin")
    refused(world, [skill(folder, "math")], "'math'", "adapter_model.bin")
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload, named",
    [
        ({f"base_model.model.{Q_PROJ}.lora_A.weight": 3}, f"{Q_PROJ}.lora_A.weight"),
        ({f"base_model.model.{Q_PROJ}.lora_A.weight": "x"}, f"{Q_PROJ}.lora_A.weight"),
        ([torch.zeros(2, 2)], "adapter_model.bin"),
        ({7: torch.zeros(2, 2)}, "adapter_model.bin"),
    ],
)
def test_bin_holding_anything_but_named_tensors_is_refused(world, tmp_path, payload, named):
    folder = copy_skill(world, tmp_path)
    (folder / WEIGHTS).unlink()
    torch.save(payload, folder / "adapter_model.bin")
    refused(world, [skill(folder, "math")], "'math'", named)


def test_skill_files_are_byte_identical_after_attach_and_export(world, tmp_path):
    before = {name: sha256_tree(path) for name, path in world["skills"].items()}
    adapters = [skill(path, name) for name, path in world["skills"].items()]
    model = attach_cat(load_base(world["base"]), CatConfig(skills=adapters))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_coefficient(name):
                param.mul_(0.5)
    export_cat(model, tmp_path / "export")
    export_cat(model, tmp_path / "export-svd", rank=3, prune_threshold=0.1)
    assert {name: sha256_tree(path) for name, path in world["skills"].items()} == before
