"""The self-written mix: each skill's samples, scored by KL(skill ‖ base) against PEFT's models."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures import load_base
from peft import PeftModel
from test_exactness import cat_model, randomize
from tokenizers import decoders
from transformers import AutoTokenizer

from axolotl_cat_plugin import CatConfig, CatError, attach_cat
from axolotl_cat_plugin.cli import main
from axolotl_cat_plugin.core.fit import self_mix
from axolotl_cat_plugin.core.fit.self_mix import SelfMixOptions, build_self_mix
from axolotl_cat_plugin.core.state import coefficient_parameters

SKILLS = ("math", "code", "prose")
OPTIONS = dict(prompts=["Q: ", "def "], pool=6, keep=2, max_new_tokens=5, batch_size=4)


def tokenizer_of(world, chat=False):
    tokenizer = AutoTokenizer.from_pretrained(world["base"])
    tokenizer.backend_tokenizer.decoder = decoders.Fuse()  # characters decode without spaces
    if chat:
        tokenizer.chat_template = (
            "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}"
        )
    return tokenizer


def peft_log_probs(world, skill, ids):
    model = load_base(world["base"])
    if skill:
        model = PeftModel.from_pretrained(model, world["skills"][skill])
    with torch.no_grad():
        return F.log_softmax(model(input_ids=ids).logits.float(), -1)


def spy_on_pools(monkeypatch):
    """{skill: the samples sample_pool drew} once build_self_mix has run."""
    drawn, real = {}, self_mix.sample_pool

    def spy(model, tokenizer, fed, options, skill, seed):
        drawn[skill] = real(model, tokenizer, fed, options, skill, seed)
        return drawn[skill]

    monkeypatch.setattr(self_mix, "sample_pool", spy)
    return drawn


def test_mix_keeps_the_samples_each_skill_departs_most_on(world, tmp_path, monkeypatch):
    model = cat_model(world)
    randomize(model)
    model.train()
    before = {n: p.detach().clone() for n, p in coefficient_parameters(model).items()}
    rng = torch.get_rng_state()
    tokenizer = tokenizer_of(world)
    drawn = spy_on_pools(monkeypatch)
    path = build_self_mix(model, tokenizer, tmp_path, SelfMixOptions(**OPTIONS))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["skill"] for row in rows] == [s for s in SKILLS for _ in range(2)]
    for name, param in coefficient_parameters(model).items():
        assert torch.equal(param.detach(), before[name]), name
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert tokenizer.padding_side == tokenizer_of(world).padding_side

    for row in rows:
        # the kept sample, its text, and its score: the mean over its generated tokens of
        # KL(skill ‖ base), computed here with PEFT's skill model and the plain base
        (sample,) = [s for s in drawn[row["skill"]] if s["kl"] == row["kl"]]
        prompt = tokenizer(row["prompt"])["input_ids"]
        assert row["text"] == tokenizer.decode(prompt + sample["new_ids"], skip_special_tokens=True)
        ids = torch.tensor([prompt + sample["new_ids"]])
        skill_lp = peft_log_probs(world, row["skill"], ids)[0, len(prompt) - 1 : -1]
        base_lp = peft_log_probs(world, None, ids)[0, len(prompt) - 1 : -1]
        expected = (skill_lp.exp() * (skill_lp - base_lp)).sum(-1).mean()
        assert row["kl"] == pytest.approx(float(expected), rel=1e-3, abs=1e-7)
    scores = [row["kl"] for row in rows]
    assert len(set(scores)) == len(scores) and min(scores) > 0


def test_the_top_k_are_kept_and_the_file_is_cached_by_hash(world, tmp_path, monkeypatch):
    model = cat_model(world)
    tokenizer = tokenizer_of(world)
    drawn = spy_on_pools(monkeypatch)
    path = build_self_mix(model, tokenizer, tmp_path, SelfMixOptions(**OPTIONS))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for skill in SKILLS:
        best = sorted((s["kl"] for s in drawn[skill]), reverse=True)[:2]
        assert [r["kl"] for r in rows if r["skill"] == skill] == pytest.approx(best, abs=1e-6)
    monkeypatch.setattr(self_mix, "sample_pool", None)  # a second build must not sample
    assert build_self_mix(model, tokenizer, tmp_path, SelfMixOptions(**OPTIONS)) == path
    changed = self_mix.mix_hash(model, tokenizer, SelfMixOptions(**{**OPTIONS, "seed": 1}))
    assert changed not in path.name


def test_chat_template_gives_chat_rows_and_shipped_questions(world, tmp_path):
    model = cat_model(world)
    tokenizer = tokenizer_of(world, chat=True)
    options = SelfMixOptions(pool=2, keep=1, max_new_tokens=3)
    path = build_self_mix(model, tokenizer, tmp_path, options)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(SKILLS)
    for row in rows:
        assert row["prompt"] in self_mix.GENERIC_QUESTIONS
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert "text" not in row


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(pool=2, keep=3), "keep \\(3\\) is larger than pool \\(2\\)"),
        (dict(top_p=0.0), "top_p"),
        (dict(prompts=[]), "prompts is an empty list"),
        (dict(chat=True), "no chat_template"),
    ],
)
def test_unusable_options_are_refused(world, tmp_path, options, message):
    with pytest.raises(CatError, match=message):
        build_self_mix(cat_model(world), tokenizer_of(world), tmp_path, SelfMixOptions(**options))


def test_cli_self_mix_writes_what_the_api_writes(world, tmp_path, capsys):
    skills = [f"{name}={world['skills'][name]}" for name in SKILLS[:2]]
    small = ["--pool", "3", "--keep", "2", "--max-new-tokens", "4", "--seed", "5"]
    status = main(["self-mix", "--base", str(world["base"]), "--out", str(tmp_path / "cli"),
                   "--prompt", "Q: ", "--prompt", "def ", *small, *skills])  # fmt: skip
    assert status == 0
    written = capsys.readouterr().out.split("wrote ")[-1].strip()
    model = attach_cat(
        load_base(world["base"]),
        CatConfig(skills=[{"path": str(world["skills"][n]), "name": n} for n in SKILLS[:2]]),
    )
    options = SelfMixOptions(prompts=["Q: ", "def "], pool=3, keep=2, max_new_tokens=4, seed=5)
    path = build_self_mix(model, AutoTokenizer.from_pretrained(world["base"]), tmp_path, options)
    assert Path(written).name == path.name
    assert Path(written).read_text() == path.read_text()
    assert main(["self-mix", "--base", str(world["base"]), "--out", str(tmp_path),
                 "--pool", "1", "--keep", "2", *skills]) == 2  # fmt: skip
    assert "keep (2) is larger than pool (1)" in capsys.readouterr().err


def test_scores_do_not_depend_on_how_many_rows_are_scored_at_once(world):
    model = cat_model(world)
    ids = torch.tensor([[0, 0, 56, 81, 98, 43], [17, 18, 19, 98, 86, 56], [0, 56, 81, 98, 4, 5]])
    mask = (ids != 0).long()
    one = self_mix.token_kl(model, ids, mask, "code", rows=1)
    together = self_mix.token_kl(model, ids, mask, "code", rows=8)
    assert one.shape == (3, 5) and torch.allclose(one, together, atol=1e-6)
