"""What an earlier run left in output_dir: every earlier export is kept (numbered
generations), an old run's checkpoints are moved with it unless this run resumes, a finished
fit is not resumed; the record says whether the fit finished and `inspect` shows it (and a
core fit's core_residual); CLI errors name the CLI's flags."""

import json

import pytest
from axolotl.utils.dict import DictDefault
from test_exactness import cat_model, randomize

from axolotl_cat_plugin import CatError, export_cat
from axolotl_cat_plugin.cli import main
from axolotl_cat_plugin.core import cat_metadata
from axolotl_cat_plugin.core.export.write import retire_previous_export
from axolotl_cat_plugin.integration.plugin import CatMergePlugin


def fake_export(folder, marker, **record):
    """An export folder as a run leaves it (its files' contents name the run)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": marker}))
    (folder / "adapter_model.safetensors").write_text(f"weights {marker}")
    (folder / "cat_coefficients.json").write_text(
        json.dumps({"skills": [], "modules": {}, "marker": marker, **record})
    )
    return folder


def checkpoint(folder, step):
    (folder / f"checkpoint-{step}").mkdir(parents=True)
    (folder / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")


def test_every_earlier_export_is_kept_in_numbered_generations(tmp_path):
    out = tmp_path / "out"
    for run in (1, 2, 3):
        fake_export(out, run)
        retire_previous_export(out)
    kept = {
        p.name: json.loads((p / "cat_coefficients.json").read_text())["marker"]
        for p in out.iterdir()
    }
    assert kept == {"previous_export": 1, "previous_export.2": 2, "previous_export.3": 3}
    assert retire_previous_export(out) is None  # nothing left to move


def plugin_cfg(out, **options):
    return DictDefault({"adapter": "cat_merge", "output_dir": str(out), **options})


def test_a_new_run_moves_an_old_runs_checkpoints_with_its_export(tmp_path):
    out = fake_export(tmp_path / "out", 1, fit_finished=True)
    checkpoint(out, 2)
    checkpoint(out, 4)
    CatMergePlugin().pre_model_load(plugin_cfg(out))
    assert sorted(p.name for p in out.iterdir()) == ["previous_export"]
    moved = sorted(p.name for p in (out / "previous_export").iterdir())
    assert "checkpoint-2" in moved and "checkpoint-4" in moved and "cat_coefficients.json" in moved


@pytest.mark.parametrize(
    "options",
    [{"auto_resume_from_checkpoints": True}, {"resume_from_checkpoint": "CHECKPOINT"}],
)
def test_resuming_a_finished_fit_is_refused_naming_the_option(tmp_path, options):
    out = fake_export(tmp_path / "out", 1, fit_finished=True)
    checkpoint(out, 4)
    if "resume_from_checkpoint" in options:
        options = {"resume_from_checkpoint": str(out / "checkpoint-4")}
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(CatError) as error:
        CatMergePlugin().pre_model_load(plugin_cfg(out, **options))
    assert next(iter(options)) in str(error.value) and "finished" in str(error.value)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing moved


def test_resuming_an_interrupted_fit_keeps_its_checkpoints(tmp_path):
    out = fake_export(tmp_path / "out", 1, fit_finished=False)
    checkpoint(out, 4)
    CatMergePlugin().pre_model_load(plugin_cfg(out, auto_resume_from_checkpoints=True))
    assert (out / "checkpoint-4").is_dir()  # Axolotl resumes from it
    assert not (out / "cat_coefficients.json").exists()  # the partial export moved aside
    assert (out / "previous_export" / "cat_coefficients.json").exists()


def test_inspect_says_whether_the_fit_finished_and_shows_the_core_residual(world, tmp_path, capsys):
    model = cat_model(world, granularity="core")
    randomize(model)
    out = export_cat(model, tmp_path / "api")
    assert main(["inspect", str(out)]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "not recorded" in shown
    record = json.loads((out / "cat_coefficients.json").read_text())
    residuals = [e["core_residual"] for e in record["modules"].values() if e["coefficients"]]
    assert f"largest {max(residuals):.3g}" in shown and "core residual" in shown

    cat_metadata(model).extra["fit_finished"] = False  # as the trainer marks it during a fit
    out = export_cat(model, tmp_path / "interrupted")
    assert json.loads((out / "cat_coefficients.json").read_text())["fit_finished"] is False
    assert main(["inspect", str(out)]) == 0
    assert "not finished" in capsys.readouterr().out
    cat_metadata(model).extra["fit_finished"] = True
    assert main(["inspect", str(export_cat(model, tmp_path / "done"))]) == 0
    assert "finished" in capsys.readouterr().out


def test_cli_export_errors_name_the_cli_flags(world, tmp_path, capsys):
    model = cat_model(world, granularity="core")
    run = export_cat(model, tmp_path / "run")
    base = ["export", str(run), "--base", str(world["base"]), "--out", str(tmp_path / "x")]
    assert main([*base, "--rank", "1000"]) == 2
    error = capsys.readouterr().err
    assert "--rank: must be a whole number" in error and "export_rank" not in error
    assert main([*base, "--prune-threshold", "0.1"]) == 2
    error = capsys.readouterr().err
    assert "--prune-threshold: granularity core" in error and "use --rank" in error
    assert not (tmp_path / "x").exists()


def test_cli_merge_names_its_own_arguments_for_duplicate_skills(world, tmp_path, capsys):
    math = world["skills"]["math"]
    argv = ["merge", "--method", "concat", "--weights", "1", "1", "--base", str(world["base"])]
    assert main([*argv, "--out", str(tmp_path / "m"), f"a={math}", f"a={math}"]) == 2
    error = capsys.readouterr().err
    assert "NAME=PATH" in error and "cat_merge" not in error
    assert not (tmp_path / "m").exists()
