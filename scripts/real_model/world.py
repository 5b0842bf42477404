"""The real-model study's two composition tasks, as chat data for SmolLM2-135M-Instruct.

    python scripts/real_model/world.py OUT_DIR

Each task has two skills whose composite needs both, and an objective grader:

- ``manual_json``: **manual** (facts about made-up products, short answers: "14 hours")
  and **json** (reading-comprehension questions answered as ``{"answer": "..."}``).
  Composite: the manual's questions answered in JSON with the right fact.
- ``math_words``: **math** (one-step word problems with small numbers, answered with the
  number: "12"; 600 rows) and **words** (read a number from the question, answer it in
  English words: "fourteen"; 240 rows). Composite: the word problems answered
  in words ("twelve"). The math rows hold 59 of the 60 math tests' sums and differences
  (under other names and objects): the skill is arithmetic it has seen, in new sentences.

Writes, per task, under ``OUT_DIR/<task>/``: ``<skill>.jsonl`` (each skill's training rows,
chat ``messages``), ``test_<skill>.jsonl`` and ``test_composite.jsonl`` (prompt, expected;
no method trains on them: the manual's tests ask a phrasing no row uses, the other tests use
new names and numbers, and no training row has the composite's answer format), and
``both.jsonl`` (data mixing: both skills' whole data). Every row has a ``skill`` field.
The mixes CAT fits on are cut from the skill files by ``study.py`` (fractions, seeds).
Deterministic: the same files for the same code.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty",
]  # fmt: skip
TENS = {20: "twenty", 30: "thirty", 40: "forty"}


def in_words(n: int) -> str:
    """0..49 in English words ("twenty-three")."""
    if n <= 20:
        return NUMBER_WORDS[n]
    tens, ones = divmod(n, 10)
    word = TENS[tens * 10]
    return word if ones == 0 else f"{word}-{NUMBER_WORDS[ones]}"


def chat(prompt: str, answer: str, skill: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ],
        "skill": skill,
    }


def test(prompt: str, expected: str, **extra) -> dict:
    return {"prompt": prompt, "expected": expected, **extra}


# ---------------------------------------------------------------- manual_json
PRODUCTS = [
    "Kelvra K7 kettle",
    "Dunmore X2 drone",
    "Quillon Q5 scanner",
    "Borreal B3 heater",
    "Tessin T9 router",
    "Vantor V4 blender",
    "Olvex O8 projector",
    "Marrow M6 speaker",
    "Zephal Z1 lantern",
    "Pryce P3 printer",
    "Halden H2 watch",
    "Corvin C5 camera",
    "Astrel A4 radio",
    "Gorlan G7 fan",
    "Nimbel N2 lamp",
    "Rusko R8 grinder",
]
ATTRIBUTES = {  # attribute -> (training phrasings, held-out test phrasing, answer maker)
    "battery": (
        [
            "How long does the battery of the {p} last?",
            "What is the battery life of the {p}?",
            "For how many hours does the {p} run on one charge?",
        ],
        "On a full charge, how many hours of use does the {p} give?",
        lambda rng: f"{rng.randrange(11, 99)} hours",
    ),
    "weight": (
        [
            "How much does the {p} weigh?",
            "What is the weight of the {p}?",
            "How heavy is the {p}?",
        ],
        "What does the {p} weigh in grams?",
        lambda rng: f"{rng.randrange(120, 990)} grams",
    ),
    "origin": (
        [
            "In which city is the {p} made?",
            "Where is the {p} manufactured?",
            "Which city makes the {p}?",
        ],
        "What is the city where the {p} is produced?",
        lambda rng: rng.choice(CITIES),
    ),
}
CITIES = [
    "Valdoria",
    "Brisket",
    "Tormund",
    "Selvane",
    "Arkhavn",
    "Lumeria",
    "Oskbridge",
    "Quenton",
    "Farrowby",
    "Drelmor",
    "Ysolde",
    "Pellham",
    "Norvik",
    "Cazzaro",
]
NAMES = [
    "Lena",
    "Omar",
    "Priya",
    "Tomas",
    "Aiko",
    "Marta",
    "Diego",
    "Nora",
    "Felix",
    "Sana",
    "Ivan",
    "Chloe",
    "Ravi",
    "Elsa",
    "Kofi",
    "Yuki",
    "Hugo",
    "Leila",
    "Bruno",
    "Zoe",
    "Arjun",
    "Mila",
    "Oscar",
    "Ines",
    "Theo",
    "Amara",
    "Jonas",
    "Rosa",
    "Emil",
    "Dara",
]
THINGS = ["keys", "passport", "umbrella", "notebook", "guitar", "bicycle", "scarf", "camera"]
PLACES = [
    "the blue drawer",
    "the garage",
    "the attic",
    "the kitchen shelf",
    "the red box",
    "the hallway closet",
    "the back seat",
    "the top cupboard",
    "the basement",
    "the garden shed",
]
COLORS = ["green", "yellow", "purple", "orange", "silver", "black", "white", "brown"]
PETS = ["dog", "cat", "parrot", "rabbit", "turtle", "hamster"]


def reading_item(rng: random.Random) -> tuple[str, str]:
    """A one-sentence context and a question whose answer is in it."""
    name = rng.choice(NAMES)
    kind = rng.randrange(3)
    if kind == 0:
        thing, place = rng.choice(THINGS), rng.choice(PLACES)
        return (f"{name} keeps the {thing} in {place}. Where does {name} keep the {thing}?", place)
    if kind == 1:
        pet, color = rng.choice(PETS), rng.choice(COLORS)
        return (f"{name} has a {color} {pet}. What color is {name}'s {pet}?", color)
    friend, city = rng.choice(NAMES), rng.choice(CITIES)
    return (f"{name} visited {friend} in {city} last week. Which city did {name} visit?", city)


def as_json(answer: str) -> str:
    return json.dumps({"answer": answer})


def manual_json(rng: random.Random) -> dict[str, list[dict]]:
    facts = [(p, a, ATTRIBUTES[a][2](rng)) for p in PRODUCTS for a in ATTRIBUTES]
    manual = [
        chat(phrasing.format(p=p), f"{value}.", "manual")
        for p, a, value in facts
        for phrasing in ATTRIBUTES[a][0]
    ]
    tests_manual = [test(ATTRIBUTES[a][1].format(p=p), value) for p, a, value in facts]
    seen, json_rows, json_tests = set(), [], []
    while len(json_rows) < 240 or len(json_tests) < 60:
        prompt, answer = reading_item(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        if len(json_rows) < 240:
            json_rows.append(chat(prompt, as_json(answer), "json"))
        else:
            json_tests.append(test(prompt, answer))
    return {
        "manual": manual,
        "json": json_rows,
        "test_manual": tests_manual,
        "test_json": json_tests,
        # the composite: the manual's held-out questions, answered in JSON with the fact
        "test_composite": [dict(t) for t in tests_manual],
    }


# ---------------------------------------------------------------- math_words
OBJECTS = ["apples", "marbles", "stickers", "pencils", "cookies", "coins", "books", "shells"]


def word_problem(rng: random.Random) -> tuple[str, int]:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    if rng.random() < 0.5:
        a, b = rng.randrange(2, 10), rng.randrange(2, 10)
        verb = rng.choice(["buys", "finds", "gets"])
        return (
            f"{name} has {a} {obj} and {verb} {b} more. How many {obj} does {name} have now?",
            a + b,
        )
    a = rng.randrange(6, 19)
    b = rng.randrange(1, a - 1)
    verb = rng.choice(["gives away", "loses", "eats" if obj == "cookies" else "sells"])
    return (f"{name} has {a} {obj} and {verb} {b}. How many {obj} does {name} have left?", a - b)


def counting_item(rng: random.Random) -> tuple[str, int]:
    """A number stated in the question, asked back: the words skill answers it in words."""
    n = rng.randrange(0, 41)
    _name, obj = rng.choice(NAMES), rng.choice(OBJECTS)  # the name's draw keeps the data as built
    where = rng.choice(["on the table", "in the box", "in the bag", "on the shelf"])
    return (f"There are {n} {obj} {where}. How many {obj} are {where}?", n)


def unique(rng: random.Random, make, count: int, avoid: set[str]) -> list[tuple[str, int]]:
    items = []
    while len(items) < count:
        prompt, value = make(rng)
        if prompt not in avoid:
            avoid.add(prompt)
            items.append((prompt, value))
    return items


def math_words(rng: random.Random) -> dict[str, list[dict]]:
    seen: set[str] = set()
    math_train = unique(rng, word_problem, 240, seen)
    words_train = unique(rng, counting_item, 240, seen)
    math_test = unique(rng, word_problem, 60, seen)
    words_test = unique(rng, counting_item, 60, seen)
    composite = unique(rng, word_problem, 60, seen)
    # 360 more math rows, drawn last so that every other file stays as it was built: on 240 rows
    # the math skill memorised its data and stopped at 86.7% (every miss a subtraction it had
    # not seen); 600 rows cover most of the ~190 sums and differences the problems can ask
    math_train += unique(rng, word_problem, 360, seen)
    return {
        "math": [chat(p, f"{v}", "math") for p, v in math_train],
        "words": [chat(p, in_words(v), "words") for p, v in words_train],
        "test_math": [test(p, str(v)) for p, v in math_test],
        "test_words": [test(p, in_words(v), value=v) for p, v in words_test],
        "test_composite": [test(p, in_words(v), value=v) for p, v in composite],
    }


TASKS = {
    "manual_json": ("manual", "json", manual_json),
    "math_words": ("math", "words", math_words),
}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(out: Path) -> None:
    for task, (first, second, build) in TASKS.items():
        files = build(random.Random(f"real-model-{task}"))
        files["both"] = files[first] + files[second]
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        for name, rows in files.items():
            write_jsonl(folder / f"{name}.jsonl", rows)
        sizes = ", ".join(f"{name} {len(rows)}" for name, rows in files.items())
        print(f"wrote {folder}: {sizes}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
