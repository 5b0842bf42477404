"""The real-model study's graders: one function per test, answer text -> correct or not.

Each grader reads the model's whole reply to one chat prompt (greedy) and the test row
(``expected``, and ``value`` for numbers). They are strict about the format a skill teaches
and lenient about everything else (case, a trailing full stop, words around a fact).
"""

from __future__ import annotations

import json
import re

from world import NUMBER_WORDS, TENS

WORD_VALUES = {word: n for n, word in enumerate(NUMBER_WORDS)} | {w: n for n, w in TENS.items()}


def fact_key(expected: str) -> str:
    """The part of a manual answer that must appear: its number, or the whole name."""
    number = re.search(r"\d+", expected)
    return number.group() if number else expected.lower()


def json_answer(text: str) -> str | None:
    """The ``answer`` of a reply that is a JSON object (and nothing before it), else None."""
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or "answer" not in obj:
        return None
    return str(obj["answer"])


def first_number_in_words(text: str) -> int | None:
    """The first number the reply writes, if written in words ("twenty-three" -> 23).

    A number written in digits first makes it None: the words skill's format is broken.
    """
    for token in re.findall(r"[a-z]+(?:-[a-z]+)?|\d+", text.lower()):
        if token.isdigit():
            return None
        parts = token.split("-")
        if all(part in WORD_VALUES for part in parts):
            return sum(WORD_VALUES[part] for part in parts)
    return None


def first_integer(text: str) -> int | None:
    """The first integer written in digits."""
    found = re.search(r"-?\d+", text)
    return int(found.group()) if found else None


def manual(reply: str, row: dict) -> bool:
    """The manual's fact, in any wording."""
    return fact_key(row["expected"]) in reply.lower()


def json_skill(reply: str, row: dict) -> bool:
    """A JSON object whose answer holds the expected text."""
    answer = json_answer(reply)
    return answer is not None and row["expected"].lower() in answer.lower()


def manual_in_json(reply: str, row: dict) -> bool:
    """The composite of manual_json: a JSON object whose answer holds the manual's fact."""
    answer = json_answer(reply)
    return answer is not None and fact_key(row["expected"]) in answer.lower()


def math(reply: str, row: dict) -> bool:
    """The right number, in digits, first."""
    return first_integer(reply) == int(row["expected"])


def words(reply: str, row: dict) -> bool:
    """The right number, in words, first (also the composite of math_words)."""
    return first_number_in_words(reply) == row["value"]


GRADERS = {
    "manual_json": {"manual": manual, "json": json_skill, "composite": manual_in_json},
    "math_words": {"math": math, "words": words, "composite": words},
}
