"""The real-model study's measuring sticks (scripts/real_model/): the graders that decide every
accuracy in docs/real_model.md, and the report's derived figures (what a `granularity: auto`
by held-out loss would pick, the data curve), and the fitting loop both worlds share
(scripts/demo/fit_loop.py). No model."""

import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts" / "real_model"))

import grade  # noqa: E402
import report  # noqa: E402
from world import in_words  # noqa: E402


@pytest.mark.parametrize(
    "reply, correct",
    [
        ('{"answer": "14 hours"}', True),
        ('{"answer": "It lasts 14 hours."} and more', True),  # text after the object is fine
        ("14 hours", False),  # the fact without the format
        ('Sure: {"answer": "14 hours"}', False),  # the object must come first
        ('{"answer": "41 hours"}', False),
        ('{"reply": "14 hours"}', False),
        ('{"answer": "14 hours"', False),  # not JSON
    ],
)
def test_manual_in_json_needs_the_fact_inside_the_json_answer(reply, correct):
    assert grade.manual_in_json(reply, {"expected": "14 hours"}) is correct


def test_manual_and_json_graders_each_check_one_skill():
    row = {"expected": "14 hours"}
    assert grade.manual("It gives 14 hours of use.", row)
    assert not grade.manual("It gives 12 hours of use.", row)
    assert grade.manual("Made by Oskbridge.", {"expected": "Oskbridge"})
    assert grade.json_skill('{"answer": "the Blue kettle"}', {"expected": "blue kettle"})
    assert not grade.json_skill("the blue kettle", {"expected": "blue kettle"})


@pytest.mark.parametrize(
    "reply, value, correct",
    [
        ("twenty-three", 23, True),
        ("The answer is seven.", 7, True),
        ("7", 7, False),  # digits break the words skill's format
        ("7, that is seven", 7, False),  # the first number decides
        ("forty", 40, True),
        ("twenty-three", 32, False),
        ("no number here", 0, False),
    ],
)
def test_words_needs_the_first_number_in_words(reply, value, correct):
    assert grade.words(reply, {"value": value}) is correct


def test_words_reads_back_what_the_world_writes():
    for n in range(0, 50):
        assert grade.words(in_words(n), {"value": n}), n


def test_math_needs_the_first_integer_in_digits():
    assert grade.math("8", {"expected": "8"}) and grade.math("It is 8 cookies.", {"expected": "8"})
    assert not grade.math("eight", {"expected": "8"})
    assert not grade.math("6 + 2 = 8", {"expected": "8"})


def fit(composite, held_out):
    return {"composite": composite, "fit": {"held_out_loss_after": held_out}}


def test_auto_pick_by_held_out_loss_is_compared_with_the_tests_best():
    methods = {
        "cat_module": {"0": fit(10.4, 0.42), "1": fit(6.2, 0.45)},
        "cat_layer": {"0": fit(10.4, 0.49), "1": fit(8.3, 0.47)},
        "cat_core": {"0": fit(0.0, 0.23), "1": fit(8.3, 0.20)},
        "uniform": {"-": {"composite": 0.0}},
    }
    picks = report.auto_pick(methods)
    assert picks["0"]["pick"] == "cat_core" and picks["0"]["best"] == ["cat_layer", "cat_module"]
    assert not picks["0"]["matches"]
    assert picks["1"]["pick"] == "cat_core" and picks["1"]["matches"]  # a tie with cat_layer
    assert picks["1"]["pick_composite"] == 8.3


def test_auto_pick_reports_nothing_before_two_candidates_share_a_seed():
    """A cold run reports after every stage: after the skills no candidate exists yet, and a
    seed with one fitted candidate has nothing to pick among."""
    assert report.auto_pick({"skill-math": {"-": {"composite": 0.0}}}) == {}
    one = {"cat_module": {"0": fit(6.7, 0.5)}, "cat_layer": {"1": fit(8.3, 0.4)}}
    assert report.auto_pick(one) == {}


def test_curve_gathers_each_share_with_the_main_tables_runs():
    methods = {
        "cat_module": {"0": {"composite": 10.0}, "1": {"composite": 6.0}},
        "cat_module_f0.025": {"0": {"composite": 2.0}},
        "cat_module_f0.2": {"0": {"composite": 12.0}},
        "mix_lora_lr0.002": {"0": {"composite": 1.0}},  # no other share: no curve
        "cat_core": {"0": {"composite": 0.0}},
    }
    assert report.curve(methods) == {"cat_module": {0.025: [2.0], 0.1: [10.0, 6.0], 0.2: [12.0]}}


def test_the_mix_lora_rate_is_picked_among_the_main_tables_runs_only():
    methods = {
        "mix_lora": {"0": fit(0.0, 5.7)},
        "mix_lora_lr0.002": {"0": fit(2.1, 0.58)},
        "mix_lora_lr0.002_f0.2": {"0": fit(0.0, 0.31)},  # the data curve: another share
    }
    assert report.pick_by_held_out_loss(methods, "mix_lora") == "mix_lora_lr0.002"


def _fit_loop():
    """scripts/demo/fit_loop.fit_loop, imported on first use (it brings transformers)."""
    demo = str(Path(__file__).resolve().parent.parent / "scripts" / "demo")
    if demo not in sys.path:
        sys.path.insert(0, demo)
    from fit_loop import fit_loop

    return fit_loop


def test_the_fit_loop_draws_every_row_once_an_epoch_and_repeats_a_mix_smaller_than_a_batch():
    import torch

    fit_loop = _fit_loop()
    weight = torch.nn.Parameter(torch.ones(3))
    drawn = []

    def batch_loss(rows):
        drawn.append(list(rows))
        return (weight**2).sum()

    fit_loop({"w": weight}, batch_loss, rows=6, steps=3, batch=4, lr=0.1, seed=0)
    flat = [row for batch in drawn for row in batch]
    assert [len(batch) for batch in drawn] == [4, 4, 4]
    assert sorted(flat[:6]) == list(range(6))  # the first epoch: every row once
    assert len(set(flat[6:])) == 6  # the second epoch's rows, all distinct
    drawn.clear()
    fit_loop({"w": weight}, batch_loss, rows=3, steps=2, batch=4, lr=0.1, seed=0)
    assert [len(batch) for batch in drawn] == [4, 4]  # 3 rows: one repeats within a batch
    assert set(drawn[0]) == {0, 1, 2}


def test_the_fit_loop_keeps_the_parameters_of_the_best_held_out_check():
    import torch

    fit_loop = _fit_loop()
    weight = torch.nn.Parameter(torch.tensor([2.0]))
    held_out = iter([5.0, 1.0, 3.0, 4.0])  # steps 0, 2, 4, 6: the best after step 2
    seen = {}

    def remember(step, loss):
        seen[step] = float(weight)

    losses, stopping = fit_loop(
        {"w": weight},
        lambda rows: (weight**2).sum(),
        rows=2,
        steps=6,
        batch=1,
        lr=0.1,
        seed=0,
        early_stop=(2, lambda: next(held_out)),
        on_step=remember,
    )
    assert len(losses) == 6 and losses[0] > losses[-1]
    assert stopping.best_step == 2 and float(weight) == pytest.approx(seen[2])
    assert [step for step, _ in stopping.history] == [0, 2, 4, 6]


def test_scores_added_by_two_runs_at_once_are_all_kept(tmp_path):
    """Two runs of the study may score one task at once (two parts of its chain): each adds its
    methods to what is on disk when it writes, never to what it read at its start."""
    import threading

    _fit_loop()  # scripts/demo on the path: evaluate.py imports eval_composition from there
    import evaluate

    out = tmp_path / "scores.json"
    evaluate.add_scores(out, "base", {"composite": 0.0})
    on_start = evaluate.read_scores(out)
    evaluate.add_scores(out, "other-run", {"composite": 1.0})  # written meanwhile
    evaluate.add_scores(out, "seed-0/cat_module", {"composite": 2.0})
    assert set(on_start) == {"base"}
    assert set(evaluate.read_scores(out)) == {"base", "other-run", "seed-0/cat_module"}

    def run(part):
        for i in range(25):
            evaluate.add_scores(out, f"{part}-{i}", {"composite": float(i)})

    threads = [threading.Thread(target=run, args=(part,)) for part in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(evaluate.read_scores(out)) == 3 + 50
    assert not out.with_name("scores.json.partial").exists()


@pytest.mark.parametrize(
    "task, skills", [("manual_json", ("manual", "json")), ("math_words", ("math", "words"))]
)
def test_data_mixing_trains_for_the_skills_steps_together(task, skills):
    """Data mixing gets the skills' training budget: its max_steps is the sum of theirs (the
    counts once stayed at the first skills' totals when the skills were trained longer)."""
    yamls = REPO / "example_yamls" / "smollm2-cpu"
    steps = {
        name: yaml.safe_load((yamls / f"{name}.yml").read_text())["max_steps"]
        for name in (f"data-mix-{task}", *(f"skill-{skill}" for skill in skills))
    }
    assert steps[f"data-mix-{task}"] == sum(steps[f"skill-{skill}"] for skill in skills), steps
