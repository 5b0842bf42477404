"""With an eval split, `axolotl train` compares the fitted CAT with static mixes of its skills.

The CAT row must be the eval loss of the exported adapter itself: the test recomputes it with
`axolotl evaluate`, loading the export as a plain LoRA (`adapter: lora`, `lora_model_dir`),
without the plugin, on the same split. With `cat_merge.grader`, every row also carries the
user's grader's mean score on greedy replies (the verdict follows it), and the CAT row is the
score of the export loaded by plain PEFT.
"""

import csv
import json

import pytest
import yaml
from axolotl_runner import axolotl, write_config
from fixtures import load_base, write_jsonl
from peft import PeftModel
from transformers import AutoTokenizer

from axolotl_cat_plugin.core.fit.graded import graded_score, load_grader, read_prompts

pytestmark = pytest.mark.e2e
METHODS = ["math alone", "code alone", "prose alone", "uniform sum", "average", "CAT (fitted)"]
# partial credit (how much of the expected answer the reply gets right), so the mixes differ
PAIRS = [(2, 5), (9, 1), (11, 3), (4, 4)]  # not in the mix (a < 8, b < 4)
GRADER = """import difflib

def closeness(reply, row):
    return difflib.SequenceMatcher(None, reply, row["answer"]).ratio()
"""


@pytest.fixture(scope="module")
def run(e2e_world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("baselines")
    prompts = write_jsonl(
        folder / "prompts.jsonl",
        [{"prompt": f"Q: {a} + {b}? A:", "answer": f" {a} + {b} = {a + b}"} for a, b in PAIRS],
    )
    (folder / "grader.py").write_text(GRADER)
    grader = {
        "prompts": str(prompts),
        "function": f"{folder / 'grader.py'}:closeness",
        "max_new_tokens": 12,
    }
    config = write_config(e2e_world, folder, max_steps=4, val_set_size=0.25)
    data = yaml.safe_load(config.read_text())
    data["cat_merge"]["grader"] = grader
    config.write_text(yaml.safe_dump(data))
    result = axolotl("train", str(config), cwd=folder)
    assert result.returncode == 0, "axolotl train failed"
    log = result.stdout + result.stderr
    return {"folder": folder, "config": config, "log": log, "grader": grader}


def test_record_card_and_log_carry_the_comparison(run):
    out = run["folder"] / "out"
    baselines = json.loads((out / "cat_coefficients.json").read_text())["baselines"]
    assert [row["method"] for row in baselines["methods"]] == METHODS
    assert baselines["rows_evaluated"] == 8  # 25% of the 32-row mix
    losses = {row["method"]: row["eval_loss"] for row in baselines["methods"]}
    assert len(set(losses.values())) == len(METHODS)  # six different models, six losses
    graded = {row["method"]: row["graded"] for row in baselines["methods"]}
    assert all(0 <= score <= 1 for score in graded.values())
    assert len(set(graded.values())) > 1
    # the grader decides the verdict: the highest score among the static mixes
    assert baselines["metric"] == "graded" and baselines["prompts_graded"] == len(PAIRS)
    best = max(METHODS[:-1], key=graded.get)
    assert baselines["best_static"] == best
    assert baselines["cat_beats_best_static"] == (graded["CAT (fitted)"] > graded[best])

    card = (out / "README.md").read_text()
    assert "## Against static merges" in card
    for method in METHODS:
        assert f"| {method} | {losses[method]:.4f} | {graded[method]:.4f} |" in card
    assert "CAT: eval loss on 8 held-out rows from the training mix" in run["log"]
    assert f"CAT: {run['grader']['function']} on {len(PAIRS)} prompts" in run["log"]
    # the rows were split off the fit's own mix: the record and the card say so
    assert baselines["eval_rows_from"] == "training_mix"
    assert "from the skills' own training data" in " ".join(card.split())


def test_record_says_how_far_the_coefficients_moved(run):
    record = json.loads((run["folder"] / "out" / "cat_coefficients.json").read_text())
    movement = record["training"]["coefficient_movement"]
    assert movement["relative_change"] > 0
    assert movement["first_loss"] > 0 and movement["last_loss"] > 0


def test_cat_row_is_the_eval_loss_of_the_export(run):
    folder, out = run["folder"], run["folder"] / "out"
    exported = json.loads((out / "adapter_config.json").read_text())
    config = yaml.safe_load(run["config"].read_text())
    for key in ("plugins", "cat_merge"):
        config.pop(key)
    config.update(
        adapter="lora",
        lora_model_dir=str(out),
        lora_r=exported["r"],
        lora_alpha=exported["lora_alpha"],
        lora_target_modules=sorted(exported["target_modules"]),
        output_dir=str(folder / "evaluate"),
    )
    path = folder / "evaluate.yml"
    path.write_text(yaml.safe_dump(config))
    result = axolotl("evaluate", str(path), cwd=folder)
    assert result.returncode == 0, "axolotl evaluate failed"
    with (folder / "evaluate" / "eval_summary.csv").open() as handle:
        rows = {row["metric"]: row for row in csv.DictReader(handle)}
    independent = float(rows["loss"]["validation"])

    baselines = json.loads((out / "cat_coefficients.json").read_text())["baselines"]
    cat_row = baselines["methods"][-1]["eval_loss"]
    assert cat_row == pytest.approx(independent, abs=1e-4)


def test_cat_row_is_the_graded_score_of_the_export(run, e2e_world):
    out = run["folder"] / "out"
    model = PeftModel.from_pretrained(load_base(e2e_world["base"]), str(out))
    tokenizer = AutoTokenizer.from_pretrained(e2e_world["base"])
    grader = run["grader"]
    independent = graded_score(
        model,
        tokenizer,
        read_prompts(grader["prompts"]),
        load_grader(grader["function"]),
        max_new_tokens=grader["max_new_tokens"],
    )
    baselines = json.loads((out / "cat_coefficients.json").read_text())["baselines"]
    assert baselines["methods"][-1]["graded"] == pytest.approx(independent, abs=1e-9)
