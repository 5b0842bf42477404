"""The task metric beside the eval loss: greedy replies to the user's prompts, scored by the
user's grader (core/fit/graded.py, `cat_merge.grader`). The reference for what a static mix
replies is PEFT itself: the skill loaded alone as a plain LoRA."""

import pytest
from fixtures import load_base, write_jsonl
from peft import PeftModel
from pydantic import ValidationError
from transformers import AutoTokenizer

from axolotl_cat_plugin import CatConfig, attach_cat
from axolotl_cat_plugin.core.errors import CatError
from axolotl_cat_plugin.core.fit.baselines import static_coefficients
from axolotl_cat_plugin.core.fit.graded import (
    graded_score,
    greedy_replies,
    load_grader,
    read_prompts,
)
from axolotl_cat_plugin.integration.args import CatMergeConfig

PROMPTS = ["Q: 1 + 2? A:", "Write", "Q: 30 + 12? A: 30", "x"]


@pytest.fixture(scope="module")
def tokenizer(world):
    return AutoTokenizer.from_pretrained(world["base"])


@pytest.fixture(scope="module")
def cat_model(world):
    skills = [{"path": str(path), "name": name} for name, path in world["skills"].items()]
    return attach_cat(load_base(world["base"]), CatConfig(skills=skills))


def test_batched_replies_are_the_replies_one_prompt_at_a_time(world, tokenizer):
    model = load_base(world["base"])
    batched = greedy_replies(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    alone = [greedy_replies(model, tokenizer, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == alone
    assert len(set(batched)) > 1  # a degenerate model would make this test blind
    assert tokenizer.padding_side == "right"  # left as found


def test_a_static_mix_replies_as_peft_loads_that_skill(world, tokenizer, cat_model):
    reference = PeftModel.from_pretrained(load_base(world["base"]), str(world["skills"]["math"]))
    expected = greedy_replies(reference, tokenizer, PROMPTS, max_new_tokens=6)
    rows = [{"prompt": p, "expected": e} for p, e in zip(PROMPTS, expected, strict=True)]

    def same(reply, row):
        return reply == row["expected"]

    with static_coefficients(cat_model, [1.0, 0.0, 0.0]):  # math alone
        assert graded_score(cat_model, tokenizer, rows, same, max_new_tokens=6) == 1.0
    with static_coefficients(cat_model, [0.0, 1.0, 0.0]):  # code alone: other replies
        assert graded_score(cat_model, tokenizer, rows, same, max_new_tokens=6) < 1.0


def test_partial_scores_are_averaged_and_out_of_range_refused(world, tokenizer):
    model = load_base(world["base"])
    rows = [{"prompt": p, "weight": w} for p, w in zip(PROMPTS, [0.0, 0.5, 1.0, 0.5], strict=True)]
    assert graded_score(model, tokenizer, rows, lambda reply, row: row["weight"]) == 0.5
    with pytest.raises(CatError, match="returned 2"):
        graded_score(model, tokenizer, rows, lambda reply, row: 2)


def test_grader_specs(tmp_path):
    grader = tmp_path / "my_grader.py"
    grader.write_text("def exact(reply, row):\n    return reply == row['answer']\n")
    assert load_grader(f"{grader}:exact")("7", {"answer": "7"}) is True
    assert load_grader("difflib:get_close_matches")  # an importable module
    with pytest.raises(CatError, match="expected module:function"):
        load_grader("exact")
    with pytest.raises(CatError, match="no file"):
        load_grader(f"{tmp_path}/missing.py:exact")
    with pytest.raises(CatError, match="has no function 'nope'"):
        load_grader(f"{grader}:nope")
    with pytest.raises(CatError, match="importing no_such_module_here failed"):
        load_grader("no_such_module_here:f")


def test_prompts_file_errors_name_the_line(tmp_path):
    good = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": 1}, {"prompt": "b"}])
    assert read_prompts(good) == [{"prompt": "a", "answer": 1}, {"prompt": "b"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"question": "b"}\n')
    with pytest.raises(CatError, match=r"bad.jsonl:2: each row needs"):
        read_prompts(bad)
    bad.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(CatError, match=r"bad.jsonl:2: not JSON"):
        read_prompts(bad)
    with pytest.raises(CatError, match="no file"):
        read_prompts(tmp_path / "missing.jsonl")


def test_config_checks_the_grader_before_any_compute(world, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    block = {"skills": [str(world["skills"]["math"])]}
    config = CatMergeConfig.model_validate(
        {**block, "grader": {"prompts": str(prompts), "function": "difflib:get_close_matches"}}
    )
    assert config.grader.max_new_tokens == 32
    with pytest.raises(ValidationError, match="grader.*no file"):
        CatMergeConfig.model_validate(
            {**block, "grader": {"prompts": str(tmp_path / "x.jsonl"), "function": "a:b"}}
        )
    with pytest.raises(ValidationError, match="has no function"):
        CatMergeConfig.model_validate(
            {**block, "grader": {"prompts": str(prompts), "function": "difflib:nope"}}
        )
