"""The demo's miniature is a fair test of composition: what no method may see, none sees.

scripts/demo/demo_world.py builds the data; scripts/demo/eval_composition.py grades answers.
These tests pin the invariants the demo's table relies on, without training anything.
"""

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "demo"))
from demo_world import FRENCH, FRENCH_CUE, World, datasets, evaluation_sets  # noqa: E402
from eval_composition import accuracy, final_word  # noqa: E402


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


@pytest.fixture(scope="module")
def data(world):
    return datasets(world, random.Random(1), skill_rows=400, replay=0.25, pretraining_rows=400)


def mentions(lines: list[str], people: list[str]) -> set[str]:
    names = set(people)
    return {word for line in lines for word in line.split() if word in names}


def test_the_world_is_the_same_for_the_same_seed(world):
    again = World(seed=0)
    assert (again.known, again.manual, again.facts) == (world.known, world.manual, world.facts)
    assert World(seed=1).facts != world.facts


def test_people_are_known_or_in_the_manual_never_both(world):
    assert not set(world.known) & set(world.manual)
    assert not set(world.french_train) & set(world.french_test)
    assert set(world.french_train) | set(world.french_test) == set(world.known)


def test_the_base_sees_manual_people_by_name_but_never_their_facts(world, data):
    assert mentions(data["generic"], world.manual), "their names are not new tokens to the base"
    for line in data["generic"]:
        for sentence in line.split(" . "):
            if mentions([sentence], world.manual):
                assert not any(v in sentence.split() for a in FRENCH for v in FRENCH[a])


def test_skill_data_stays_inside_its_skill(world, data):
    # the manual skill: new facts (plus replayed known facts), never French
    assert mentions(data["manual"], world.manual)
    assert not any(FRENCH_CUE in line for line in data["manual"])
    # the french skill: known people only; in French never the ones its test asks about
    assert not mentions(data["french"], world.manual)
    in_french = [line for line in data["french"] if FRENCH_CUE in line]
    assert in_french and not mentions(in_french, world.french_test)


def test_no_training_data_states_a_manual_fact_in_french(world, data):
    for name in ("generic", "manual", "french"):
        for line in data[name]:
            assert not (FRENCH_CUE in line and mentions([line], world.manual)), (name, line)
    # only the diagnostics' composite training set does, by construction
    assert all(mentions([line], world.manual) for line in data["composite"])


def test_every_word_has_a_token(world, data):
    vocabulary = set(world.vocabulary())
    lines = [line for rows in data.values() for line in rows]
    lines += [
        f"{r['prompt']} {r['answer']}" for rows in evaluation_sets(world).values() for r in rows
    ]
    assert {word for line in lines for word in line.split()} <= vocabulary


def test_the_tests_ask_what_each_skill_and_their_composition_should_answer(world):
    suite = evaluation_sets(world)
    person = world.manual[0]
    color = world.facts[person]["color"]
    assert {"prompt": f"the color of {person} is", "answer": color} in suite["manual"]
    french = {"prompt": f"{FRENCH_CUE} the color of {person} is", "answer": FRENCH["color"][color]}
    assert french in suite["composite"]
    assert not mentions([r["prompt"] for r in suite["french"]], world.manual)
    assert len(suite["composite"]) == len(world.manual) * len(FRENCH)


def test_the_answer_is_the_last_word_of_the_first_sentence():
    assert final_word("red , rouge . the color") == "rouge"
    assert final_word("red .") == "red"
    assert final_word(" . red") == ""
    rows = [{"answer": "rouge"}, {"answer": "bleu"}]
    assert accuracy(rows, ["red , rouge .", "blue , vert ."]) == 0.5


def test_the_seed_table_gives_each_accuracy_its_mean_and_range_over_runs():
    from seed_summary import summarize

    def run(cat_composite, extra=None):
        scores = {"manual": 1.0, "french": 0.5, "composite": cat_composite, "train_seconds": 10}
        return {"cat": scores, **({"only_here": scores} if extra else {})}

    summary = summarize([run(0.2, extra=True), run(0.4), run(0.9)])
    assert list(summary) == ["cat"]  # a method missing from one run is left out
    composite = summary["cat"]["composite"]
    assert composite["values"] == [0.2, 0.4, 0.9]
    assert (composite["min"], composite["max"]) == (0.2, 0.9)
    assert composite["mean"] == pytest.approx(0.5)
    assert summary["cat"]["french"]["mean"] == 0.5
    assert summary["cat"]["train_seconds"]["mean"] == 10
