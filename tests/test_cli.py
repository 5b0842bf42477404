"""`axolotl-cat`: inspect an export, export a fit again without training, merge baselines.

The commands run in process through `main([...])` (as the console script calls it), once
through the installed `axolotl-cat` script in a subprocess, and through Axolotl's CLI.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fixtures import load_base
from peft import PeftModel
from safetensors.torch import load_file

from axolotl_cat_plugin import CatConfig, CatError, attach_cat, export_cat
from axolotl_cat_plugin.cli import main
from axolotl_cat_plugin.core import cat_metadata
from axolotl_cat_plugin.core.format import read_record
from axolotl_cat_plugin.core.state import is_coefficient, state_of

TOKENS = torch.tensor([[1, 10, 20, 30, 40, 50, 60, 70], [1, 15, 25, 35, 45, 55, 65, 75]])
PRUNED_MODULE = "model.layers.1.self_attn.v_proj"  # math (r=4) + prose (r=3): rank 7
TRAINING = {"datasets": [{"path": "org/mix"}], "steps": 7, "learning_rate": 0.05}


def adapters(world, names=None):
    return [{"path": str(world["skills"][n]), "name": n} for n in names or world["skills"]]


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def set_coefficients(model, values: dict[str, float]):
    """Every coefficient set: `values` per skill name, one value for the whole model."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_coefficient(name):
                param.copy_(torch.tensor([list(values.values())]))


@pytest.fixture(scope="module")
def run_dir(world, tmp_path_factory):
    """A finished fit's export: coefficients in [0.5, 1.5], math on PRUNED_MODULE at 0.01."""
    model = attach_cat(load_base(world["base"]), CatConfig(skills=adapters(world)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_coefficient(name):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
        layer = model.base_model.model.get_submodule(PRUNED_MODULE)
        state_of(layer).coefficients[0, state_of(layer).skill_names.index("math")] = 0.01
    cat_metadata(model).extra["training"] = TRAINING
    return export_cat(model, tmp_path_factory.mktemp("fit") / "out")


def test_inspect_prints_skills_rank_and_coefficients(run_dir, capsys):
    assert main(["inspect", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for expected in ("math", "code", "prose", "exported rank", "granularity", "Coefficients"):
        assert expected in out
    assert "Mean coefficient per layer" in out


def test_inspect_of_a_folder_without_a_record_exits_2_naming_the_path(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "cat_coefficients.json") in err


def test_a_record_from_a_newer_format_is_refused_by_every_reader(world, run_dir, tmp_path, capsys):
    newer = tmp_path / "newer"
    shutil.copytree(run_dir, newer)
    record = json.loads((newer / "cat_coefficients.json").read_text())
    record["format_version"] = 99
    (newer / "cat_coefficients.json").write_text(json.dumps(record))
    assert main(["inspect", str(newer)]) == 2
    assert "format_version 99" in capsys.readouterr().err
    assert main(["export", str(newer), "--out", str(tmp_path / "again")]) == 2
    assert "upgrade axolotl-cat-plugin" in capsys.readouterr().err
    resume = CatConfig(
        skills=adapters(world), coefficients_from=str(newer / "cat_coefficients.json")
    )
    with pytest.raises(CatError, match="format_version 99"):
        attach_cat(load_base(world["base"]), resume)


def test_export_rank_2_writes_a_rank_2_adapter_and_records_the_svd_error(world, run_dir, tmp_path):
    out = tmp_path / "rank2"
    assert main(["export", str(run_dir), "--rank", "2", "--out", str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    record = json.loads((out / "cat_coefficients.json").read_text())
    assert record["export_rank"] == 2 and record["training"] == TRAINING
    errors = [entry["svd_relative_error"] for entry in record["modules"].values()]
    assert all(0.0 <= error < 1.0 for error in errors)
    assert record["modules"][PRUNED_MODULE]["svd_relative_error"] > 0  # rank 7 -> 2 loses
    PeftModel.from_pretrained(load_base(world["base"]), out)  # a standard adapter


def test_export_prune_threshold_records_the_pruned_blocks(run_dir, tmp_path):
    out = tmp_path / "pruned"
    assert main(["export", str(run_dir), "--prune-threshold", "0.25", "--out", str(out)]) == 0
    record = json.loads((out / "cat_coefficients.json").read_text())
    assert record["prune_threshold"] == 0.25
    pruned = {name: e["pruned"] for name, e in record["modules"].items() if "pruned" in e}
    assert pruned == {PRUNED_MODULE: {"math": [0, 1, 2, 3]}}  # math's r=4 components
    assert record["modules"][PRUNED_MODULE]["rank"] == 3  # prose's r=3 is left


def test_export_in_place_without_options_reproduces_the_fit(run_dir, tmp_path):
    copy = shutil.copytree(run_dir, tmp_path / "copy")
    assert main(["export", str(copy), "--out", str(copy)]) == 0
    before = load_file(run_dir / "adapter_model.safetensors")
    after = load_file(copy / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        assert (before[key] - after[key]).abs().max() <= 1e-6


def test_export_refuses_skills_whose_weights_changed_since_the_fit(world, run_dir, tmp_path):
    skills = shutil.copytree(world["skills"]["math"].parent, tmp_path / "skills")
    fit = shutil.copytree(run_dir, tmp_path / "fit")
    record = json.loads((fit / "cat_coefficients.json").read_text())
    for skill in record["skills"]:
        skill["source"] = str(skills / skill["name"])
    (fit / "cat_coefficients.json").write_text(json.dumps(record))
    weights = skills / "code" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors = {key: value * 2 for key, value in tensors.items()}
    from safetensors.torch import save_file

    save_file(tensors, weights)
    assert main(["export", str(fit), "--out", str(tmp_path / "out")]) == 2


def test_merge_cat_equals_peft_add_weighted_adapter_and_the_weighted_sum(world, tmp_path):
    out = tmp_path / "merged"
    skills = [f"{n}={world['skills'][n]}" for n in ("math", "code")]  # code: rsLoRA, not first
    argv = ["merge", "--method", "concat", "--weights", "0.5", "1.5", "--base", str(world["base"])]
    assert main([*argv, "--out", str(out), *skills]) == 0
    assert sorted(os.listdir(out)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "merge_record.json",
    ]
    merged = logits(PeftModel.from_pretrained(load_base(world["base"]), out))

    peft = PeftModel.from_pretrained(
        load_base(world["base"]), world["skills"]["math"], adapter_name="math"
    )
    peft.load_adapter(world["skills"]["code"], adapter_name="code")
    peft.add_weighted_adapter(["math", "code"], [0.5, 1.5], "merged", combination_type="cat")
    peft.set_adapter("merged")
    assert (merged - logits(peft)).abs().max() <= 1e-5

    # and it is Σ w_i ΔW_i: CAT with one coefficient per skill set to the weights
    cat = attach_cat(
        load_base(world["base"]),
        CatConfig(skills=adapters(world, ["math", "code"]), granularity="model"),
    )
    set_coefficients(cat, {"math": 0.5, "code": 1.5})
    assert (merged - logits(cat)).abs().max() <= 1e-5


def test_merge_method_cat_still_works_as_concat_with_a_deprecation_warning(world, tmp_path, caplog):
    """`cat` is PEFT's name for the fixed-weight concatenation, easily read as the learned CAT."""
    skills = [f"{n}={world['skills'][n]}" for n in ("math", "code")]
    outputs = {}
    for method in ("cat", "concat"):
        out = tmp_path / method
        argv = ["merge", "--method", method, "--weights", "0.5", "1.5"]
        argv += ["--base", str(world["base"]), "--out", str(out), *skills]
        assert main(argv) == 0
        outputs[method] = load_file(str(out / "adapter_model.safetensors"))
    assert "merge method 'cat' is deprecated" in caplog.text and "use 'concat'" in caplog.text
    assert outputs["cat"].keys() == outputs["concat"].keys()
    assert all(torch.equal(outputs["cat"][k], outputs["concat"][k]) for k in outputs["cat"])


def test_a_record_of_version_1_reads_in_todays_terms(world, tmp_path, capsys):
    """0.1 wrote format_version 1: granularity `adapter` (now `model`), a skill's `alpha`."""
    out = export_cat(
        attach_cat(
            load_base(world["base"]), CatConfig(skills=adapters(world), granularity="model")
        ),
        tmp_path / "run",
    )
    record_file = out / "cat_coefficients.json"
    record = json.loads(record_file.read_text())
    assert record["granularity"] == "model"
    assert record["format_version"] == 2 and record["skills"][0]["lora_alpha"] == 8
    old_skills = [
        {("alpha" if key == "lora_alpha" else key): value for key, value in skill.items()}
        for skill in record["skills"]
    ]
    old = {**record, "format_version": 1, "granularity": "adapter", "skills": old_skills}
    record_file.write_text(json.dumps(old))
    assert read_record(out).granularity == "model"
    assert read_record(out).skills == record["skills"]
    assert main(["inspect", str(out)]) == 0
    assert "lora_alpha" in capsys.readouterr().out
    config = CatConfig(
        skills=adapters(world), granularity="model", coefficients_from=str(record_file)
    )
    attach_cat(load_base(world["base"]), config)  # resumes from it without a mismatch


@pytest.mark.parametrize("weight", ["nan", "inf"])
def test_merge_refuses_weights_that_are_not_finite(world, tmp_path, capsys, weight):
    skills = [f"{n}={world['skills'][n]}" for n in ("math", "code")]
    argv = ["merge", "--method", "concat", "--weights", "1", weight, "--base", str(world["base"])]
    assert main([*argv, "--out", str(tmp_path / "m"), *skills]) == 2
    assert "--weights must be finite numbers" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_no_writer_writes_into_a_skills_own_folder(world, tmp_path, capsys):
    """export_cat, axolotl-cat merge --out and export --out all refuse a skill's folder."""
    skills = {name: tmp_path / name for name in ("math", "code")}
    for name, folder in skills.items():
        shutil.copytree(world["skills"][name], folder)
    digests = {p: p.read_bytes() for folder in skills.values() for p in folder.iterdir()}
    entries = [{"path": str(folder), "name": name} for name, folder in skills.items()]
    model = attach_cat(load_base(world["base"]), CatConfig(skills=entries))
    with pytest.raises(CatError, match="is the folder of skill 'math'"):
        export_cat(model, skills["math"])
    argv = ["merge", "--method", "concat", "--weights", "1", "1", "--base", str(world["base"])]
    argv += ["--out", str(skills["code"]), *[f"{n}={f}" for n, f in skills.items()]]
    assert main(argv) == 2
    assert "--out" in capsys.readouterr().err
    run = export_cat(model, tmp_path / "run")
    argv = ["export", str(run), "--out", str(skills["math"]), "--base", str(world["base"])]
    assert main(argv) == 2
    assert "is the folder of skill" in capsys.readouterr().err
    assert {p: p.read_bytes() for folder in skills.values() for p in folder.iterdir()} == digests


def test_merge_svd_is_the_weighted_sum_despite_peft_scaling_twice(world, tmp_path):
    # the same skill twice: the sum has rank 4, so PEFT's rank-4 SVD loses nothing
    math = world["skills"]["math"]  # scaling 2: PEFT 0.20 would square it
    argv = ["merge", "--method", "svd", "--weights", "0.3", "0.2", "--base", str(world["base"])]
    assert main([*argv, "--out", str(tmp_path / "svd"), f"a={math}", f"b={math}"]) == 0
    merged = logits(PeftModel.from_pretrained(load_base(world["base"]), tmp_path / "svd"))
    cat = attach_cat(load_base(world["base"]), CatConfig(skills=[str(math)], granularity="model"))
    set_coefficients(cat, {"math": 0.5})
    assert (merged - logits(cat)).abs().max() <= 1e-4


def test_merge_linear_on_unequal_ranks_is_refused_naming_the_ranks(world, tmp_path, capsys):
    skills = [f"{n}={world['skills'][n]}" for n in ("math", "prose")]
    argv = ["merge", "--method", "linear", "--weights", "1", "1", "--base", str(world["base"])]
    assert main([*argv, "--out", str(tmp_path / "out"), *skills]) == 2
    err = capsys.readouterr().err
    assert "math r=4" in err and "prose r=3" in err and "use --method concat or svd" in err
    assert not (tmp_path / "out").exists()


def test_merge_refuses_an_rslora_skill_listed_first(world, tmp_path, capsys):
    skills = [f"{n}={world['skills'][n]}" for n in ("code", "math")]
    argv = ["merge", "--method", "concat", "--weights", "1", "1", "--base", str(world["base"])]
    assert main([*argv, "--out", str(tmp_path / "out"), *skills]) == 2
    err = capsys.readouterr().err
    assert "'code' uses rsLoRA and is listed first" in err and "'math'" in err


def test_the_installed_console_script_runs(run_dir):
    script = Path(sys.executable).parent / "axolotl-cat"
    result = subprocess.run(
        [str(script), "inspect", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "math" in result.stdout and "prose" in result.stdout


def test_axolotl_cat_command_passes_arguments_to_the_same_parser(run_dir, tmp_path):
    from axolotl_cat_plugin.integration.command import cat

    result = CliRunner().invoke(cat, ["inspect", str(run_dir)])
    assert result.exit_code == 0 and "prose" in result.output
    assert CliRunner().invoke(cat, ["inspect", str(tmp_path)]).exit_code == 2


def test_axolotl_cli_serves_the_cat_command(run_dir, tmp_path):
    # a subprocess outside the checkout: a stale *.egg-info in the repo root would shadow the
    # installed entry points for a process started there
    axolotl = Path(sys.executable).parent / "axolotl"
    result = subprocess.run(
        [str(axolotl), "cat", "inspect", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1"},
    )
    assert result.returncode == 0, (
        "is the package installed with its axolotl.cli_commands entry point "
        f"(pip install -e .)?\n{result.stderr[-3000:]}"
    )
    assert "prose" in result.stdout
