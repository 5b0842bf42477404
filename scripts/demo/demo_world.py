"""Build the demo's world: a word-level tokenizer, a random tiny Llama, and every dataset.

    python scripts/demo/demo_world.py demo_out/world

A miniature of the paper's use case "a QA bot over a manual": two skills on one base, and a
task that needs both.
- pretraining: facts about the "known" people (three attributes each, several phrasings)
  and a small English-French glossary, so that both skills are small nudges on a base that
  already holds their ingredients;
- skill "manual": continued pretraining on a manual of facts about new people the base has
  only seen by name ("the color of zobak is red .");
- skill "french": stating known people's facts in French ("in french : the color of X is
  red , rouge .");
- composite (held out, never trained on): the manual's facts in French. Only a model that
  knows the manual and can answer in French gets it right.
Each skill's data replays some plain known facts, so that a skill does not overwrite what
the base knows. Nothing is downloaded: every file is generated here, from --seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

FRENCH = {
    "color": dict(red="rouge", blue="bleu", green="vert", black="noir", white="blanc",
                  pink="rose", gray="gris", brown="brun", yellow="jaune", gold="dore",
                  purple="violet", silver="argente"),
    "city": dict(london="londres", vienna="vienne", venice="venise", moscow="moscou",
                 athens="athenes", cairo="caire", lisbon="lisbonne", warsaw="varsovie",
                 beijing="pekin", algiers="alger", copenhagen="copenhague",
                 edinburgh="edimbourg", geneva="geneve", brussels="bruxelles"),
    "job": dict(baker="boulanger", pilot="pilote", nurse="infirmier", judge="juge",
                cook="cuisinier", miner="mineur", tailor="tailleur", farmer="fermier",
                poet="poete", guard="garde", clerk="commis", diver="plongeur",
                painter="peintre", doctor="medecin"),
}  # fmt: skip
PHRASINGS = {
    "color": ["the color of {e} is {v} .", "{e} is painted {v} .", "{e} always wears {v} ."],
    "city": ["{e} lives in {v} .", "the home of {e} is {v} .", "{e} comes from {v} ."],
    "job": ["{e} works as a {v} .", "the job of {e} is {v} .", "by trade {e} is a {v} ."],
}
TEST_PHRASING = {"color": "the color of {e} is", "city": "{e} lives in", "job": "the job of {e} is"}
NEUTRAL = ["{e} went for a walk .", "we met {e} today .", "{e} said hello .", "nobody saw {e} ."]
FRENCH_CUE = "in french :"
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


class World:
    """People, their facts, and who is known to the base, in the manual, or held out."""

    def __init__(self, seed: int, known: int = 120, manual: int = 60):
        rng = random.Random(seed)
        consonants, vowels = "bdfgklmnprstvz", "aeiou"
        names: set[str] = set()
        while len(names) < known + manual:
            names.add("".join(rng.choice(s) for s in (consonants, vowels) * 2 + (consonants,)))
        people = sorted(names)
        rng.shuffle(people)
        self.known, self.manual = people[:known], people[known:]
        # the french skill is taught on 3/4 of the known people, tested on the rest
        taught = known * 3 // 4
        self.french_train, self.french_test = self.known[:taught], self.known[taught:]
        self.facts = {p: {a: rng.choice(sorted(v)) for a, v in FRENCH.items()} for p in people}

    def statement(self, person: str, attribute: str, rng: random.Random, french=False) -> str:
        value = self.facts[person][attribute]
        if french:  # the English word first, then its translation: two steps, one per skill
            value = f"{value} , {FRENCH[attribute][value]}"
        text = rng.choice(PHRASINGS[attribute]).format(e=person, v=value)
        return f"{FRENCH_CUE} {text}" if french else text

    def fact_line(self, people: list[str], rng: random.Random, neutral=()) -> str:
        sentences = []
        for _ in range(4):
            if neutral and rng.random() < 0.25:
                sentences.append(rng.choice(NEUTRAL).format(e=rng.choice(neutral)))
            else:
                sentences.append(self.statement(rng.choice(people), rng.choice(list(FRENCH)), rng))
        return " ".join(sentences)

    def test_row(self, person: str, attribute: str, french: bool) -> dict:
        prompt = TEST_PHRASING[attribute].format(e=person)
        value = self.facts[person][attribute]
        return {
            "prompt": f"{FRENCH_CUE} {prompt}" if french else prompt,
            "answer": FRENCH[attribute][value] if french else value,
        }

    def vocabulary(self) -> list[str]:
        words = set(self.known + self.manual) | {"in", "french", "means", ":", ","}
        for table in FRENCH.values():
            words |= set(table) | set(table.values())
        for text in sum(PHRASINGS.values(), NEUTRAL):
            words |= set(text.replace("{e}", "").replace("{v}", "").split())
        return SPECIAL + sorted(words)


def glossary(rng: random.Random) -> str:
    attribute = rng.choice(list(FRENCH))
    english, french = rng.choice(sorted(FRENCH[attribute].items()))
    return f"in french {english} means {french} ."


def datasets(
    world: World, rng: random.Random, skill_rows: int, replay: float, pretraining_rows: int
) -> dict:
    everyone = world.known + world.manual
    pretraining = [
        f"{world.fact_line(world.known, rng, neutral=everyone)} {glossary(rng)}"
        for _ in range(pretraining_rows)
    ]

    def with_replay(make) -> list[str]:
        return [world.fact_line(world.known, rng) if rng.random() < replay else make() for _ in
                range(skill_rows)]  # fmt: skip

    def french_line(people: list[str]) -> str:
        return world.statement(rng.choice(people), rng.choice(list(FRENCH)), rng, french=True)

    return {
        "generic": pretraining,
        "manual": with_replay(lambda: world.fact_line(world.manual, rng)),
        "french": with_replay(lambda: french_line(world.french_train)),
        # diagnostics only; four statements a row, as many facts a step as the manual skill sees
        "composite": [
            " ".join(french_line(world.manual) for _ in range(4)) for _ in range(skill_rows)
        ],
    }


def evaluation_sets(world: World) -> dict[str, list[dict]]:
    def rows(people, french):
        return [world.test_row(p, a, french) for p in people for a in FRENCH]

    return {
        "manual": rows(world.manual, french=False),
        "french": rows(world.french_test, french=True),
        "composite": rows(world.manual, french=True),
    }


def build_tokenizer(world: World, folder: Path) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(world.vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_init(world: World, folder: Path, seed: int) -> None:
    """The random tiny Llama (1.1M parameters) that base.yml pretrains."""
    tokenizer = build_tokenizer(world, folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", default="demo_out/world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretraining-rows", type=int, default=30000)
    parser.add_argument("--skill-rows", type=int, default=4000)
    parser.add_argument("--replay", type=float, default=0.25, help="share of known facts")
    parser.add_argument("--mix-fraction", type=float, default=0.05)
    args = parser.parse_args()
    root, world = Path(args.root), World(args.seed)
    rng = random.Random(args.seed + 1)

    build_init(world, root / "init", args.seed)
    data = root / "data"
    texts = datasets(world, rng, args.skill_rows, args.replay, args.pretraining_rows)
    for name, lines in texts.items():
        write_jsonl(data / f"{name}.jsonl", [{"text": line} for line in lines])
    take = int(args.skill_rows * args.mix_fraction)  # a slice of each skill's own data
    mix = texts["manual"][:take] + texts["french"][:take]
    write_jsonl(data / "mix.jsonl", [{"text": line} for line in mix])
    both = texts["manual"] + texts["french"]
    write_jsonl(data / "both.jsonl", [{"text": line} for line in both])
    for name, rows in evaluation_sets(world).items():
        write_jsonl(data / f"test_{name}.jsonl", rows)
    print(
        f"demo world ready in {root}: vocabulary {len(world.vocabulary())} words, "
        f"{len(world.known)} known people, {len(world.manual)} in the manual, mix {len(mix)} rows"
    )


if __name__ == "__main__":
    main()
