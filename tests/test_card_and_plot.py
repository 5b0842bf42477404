"""The export's model card (README.md) and coefficient plot, and what a Hub push uploads.

Card contents are checked on hand-written records (every number known in advance); the
export, the plugin's card handling and the push run on the tiny world.
"""

import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import load_base
from huggingface_hub import HfApi, constants
from huggingface_hub.hf_api import RepoUrl
from peft import PeftModel
from transformers import Trainer, TrainingArguments

from axolotl_cat_plugin import CatConfig, attach_cat, export_cat
from axolotl_cat_plugin.core.export.card import TAGS, model_card
from axolotl_cat_plugin.core.export.plot import coefficient_heatmap
from axolotl_cat_plugin.core.export.serving import VLLM_MAX_LORA_RANKS, vllm_max_lora_rank
from axolotl_cat_plugin.core.format import CatRecord
from axolotl_cat_plugin.core.state import is_coefficient
from axolotl_cat_plugin.integration.trainer import CatModelCardMixin

PNG = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parent.parent
TOKENS = torch.tensor([[1, 10, 20, 30, 40, 50, 60, 70]])


def record(**overrides) -> CatRecord:
    """Two skills on two layers: math on q/v of both, code on q of layer 1 only."""
    base = {
        "format_version": 2,
        "skills": [
            {
                "name": "math",
                "source": "org/math-lora",
                "revision": "v1",
                "rank": 8,
                "lora_alpha": 16,
            },
            {
                "name": "code",
                "source": "./skills/code",
                "rank": 4,
                "lora_alpha": 4,
                "use_rslora": True,
            },
        ],
        "granularity": "module",
        "parametrization": "free",
        "base_model": "meta-llama/Llama-3.1-8B",
        "concatenated_rank": 12,
        "exported_rank": 12,
        "export_rank": None,
        "prune_threshold": None,
        "training": {
            "datasets": [{"path": "org/mix", "type": "completion"}, {"path": "./data/x.jsonl"}],
            "steps": 40,
            "learning_rate": 0.05,
        },
        "modules": {
            "model.layers.0.self_attn.q_proj": {"coefficients": {"math": 0.5}, "rank": 8},
            "model.layers.0.self_attn.v_proj": {"coefficients": {"math": 1.5}, "rank": 8},
            "model.layers.1.self_attn.q_proj": {
                "coefficients": {"math": 1.0, "code": -0.25},
                "rank": 12,
            },
            "model.layers.1.self_attn.v_proj": {"coefficients": {"math": 2.0}, "rank": 8},
        },
    }
    return CatRecord.from_dict({**base, **overrides}, "a hand-written record")


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def adapters(world):
    return [{"path": str(path), "name": name} for name, path in world["skills"].items()]


def fitted_cat_model(world, seed=0):
    """A CAT model whose coefficients moved away from 1, as after training."""
    model = attach_cat(load_base(world["base"]), CatConfig(skills=adapters(world)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_coefficient(name):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return model


def test_front_matter_names_the_base_peft_the_tags_and_hub_datasets_only():
    meta = front_matter(model_card(record(), config={"r": 12}))
    assert meta["base_model"] == "meta-llama/Llama-3.1-8B"
    assert meta["library_name"] == "peft"
    assert meta["tags"] == TAGS
    assert meta["datasets"] == ["org/mix"]  # the local file would make the Hub refuse the card


def test_front_matter_leaves_out_local_paths_the_hub_would_refuse():
    local = record(base_model="/models/llama", training={"datasets": [{"path": "data/x.jsonl"}]})
    meta = front_matter(model_card(local, config={"r": 12}))
    assert "base_model" not in meta and "datasets" not in meta
    assert "/models/llama" in model_card(local, config={"r": 12})  # still said in the body


def test_card_lists_skills_coefficients_per_layer_and_the_fit():
    card = model_card(record(), config={"r": 12}, hub_model_id="me/cat-soup")
    assert "| math | org/math-lora | v1 | 8 | 16 | no |" in card
    assert "| code | ./skills/code |  | 4 | 4 | yes |" in card
    # math over its 4 modules: mean (0.5 + 1.5 + 1 + 2) / 4, min 0.5, max 2
    assert "| math | 1.2500 | 0.5000 | 2.0000 | 4 |" in card
    assert "| code | -0.2500 | -0.2500 | -0.2500 | 1 |" in card
    assert "| 0 | 1.000 | — |" in card  # layer 0: math (0.5 + 1.5) / 2, no code
    assert "| 1 | 1.500 | -0.250 |" in card
    assert "- steps: 40" in card and "- learning rate (coefficients): 0.05" in card
    assert 'PeftModel.from_pretrained(base, "me/cat-soup")' in card
    assert "axolotl merge-lora config.yml --lora-model-dir me/cat-soup" in card


def test_granularity_rank_summarises_over_components():
    rank_record = record(
        granularity="rank",
        modules={"model.layers.0.self_attn.q_proj": {"coefficients": {"math": [0.0, 1.0, 2.0]}}},
    )
    card = model_card(rank_record, config={"r": 3})
    assert "| skill | mean | min | max | components |" in card
    assert "| math | 1.0000 | 0.0000 | 2.0000 | 3 |" in card


@pytest.mark.parametrize(
    ("rank", "max_lora_rank"), [(1, 1), (3, 8), (8, 8), (12, 16), (96, 128), (257, 320)]
)
def test_vllm_line_rounds_the_rank_up_to_a_size_vllm_accepts(rank, max_lora_rank):
    card = model_card(record(), config={"r": rank})
    assert (
        f"--enable-lora --lora-modules cat=path/to/this/adapter --max-lora-rank {max_lora_rank}\n"
        in card
    )


def test_the_readme_names_the_sizes_and_the_rounding_the_code_uses():
    readme = " ".join((REPO / "docs" / "output.md").read_text().split())
    sizes = re.search(r"vLLM allows only ([\d, ]+),", readme).group(1)
    assert tuple(int(size) for size in sizes.split(",")) == VLLM_MAX_LORA_RANKS
    rank, max_rank = re.search(r"r = (\d+) needs `--max-lora-rank (\d+)`", readme).groups()
    assert vllm_max_lora_rank(int(rank)) == int(max_rank)


def test_a_rank_above_vllms_largest_says_how_to_export_smaller():
    card = model_card(record(), config={"r": 600})
    assert "--max-lora-rank 512" in card and "axolotl-cat export RUN_DIR --rank 512" in card


def test_matplotlib_is_a_dependency_not_an_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "matplotlib" in project["dependencies"]
    assert project["optional-dependencies"]["plots"] == []  # an empty alias, for old commands


def test_heatmap_is_a_png():
    assert coefficient_heatmap(record()).startswith(PNG)
    assert coefficient_heatmap(record(granularity="rank")).startswith(PNG)


def test_without_matplotlib_there_is_no_plot_and_one_info_line(monkeypatch, caplog):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level("INFO", logger="axolotl_cat_plugin"):
        assert coefficient_heatmap(record()) is None
    assert [r.message for r in caplog.records if "matplotlib" in r.message] == [
        "CAT: matplotlib is not installed, so the export has no coefficient plot"
    ]


def test_export_cat_writes_the_card_and_the_plot(world, tmp_path):
    out = export_cat(fitted_cat_model(world), tmp_path / "out")
    card = (out / "README.md").read_text()
    assert front_matter(card)["library_name"] == "peft"
    for name in world["skills"]:
        assert f"| {name} |" in card
    assert (out / "cat_coefficients.png").read_bytes().startswith(PNG)
    assert "](cat_coefficients.png)" in card


# --- the Axolotl plugin's card: written with the export, kept through Axolotl's own card ---


def plugin_cfg(world, out: Path, **extra):
    from axolotl.utils.dict import DictDefault

    return DictDefault(
        {
            "adapter": "cat_merge",
            "cat_merge": {"skills": adapters(world)},
            "output_dir": str(out),
            "datasets": [{"path": "org/mix", "type": "completion"}],
            "learning_rate": 0.01,
            **extra,
        }
    )


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_after_post_train_axolotls_save_and_card_leave_the_export_as_written(world, tmp_path):
    """One writer per folder: post_train writes the export; what Axolotl does next (the
    model's save_pretrained, the trainer's model card, post_train again) changes nothing."""
    from axolotl_cat_plugin.integration.plugin import CatMergePlugin

    out = tmp_path / "out"
    plugin, cfg, model = CatMergePlugin(), plugin_cfg(world, out), fitted_cat_model(world)
    trainer = CatTrainerStandIn(
        model=model, args=TrainingArguments(output_dir=str(out), report_to="none", use_cpu=True)
    )
    plugin.post_trainer_create(cfg, trainer)
    plugin.post_train(cfg, model)
    written = digests(out)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(written)
    model.save_pretrained(str(out))  # axolotl.train.save_trained_model
    trainer.create_model_card(model_name="x")  # axolotl.train.create_model_card
    plugin.post_train(cfg, model)  # Axolotl's second call
    assert digests(out) == written

    elsewhere = tmp_path / "copy"
    model.save_pretrained(str(elsewhere))  # another folder gets the same export
    assert digests(elsewhere) == written


class CatTrainerStandIn(CatModelCardMixin, Trainer):
    """transformers' Trainer with CatTrainer's model-card behaviour and the attribute by which
    the plugin recognises CatTrainer (AxolotlTrainer itself needs a whole Axolotl config)."""

    def cat_baselines(self, grader=None):
        return None

    def cat_movement(self):
        return None


def test_hub_push_uploads_card_and_adapter_offline_at_the_api_boundary(
    world, tmp_path, monkeypatch
):
    """Offline: nothing reaches the network. Runs what `axolotl train` does with hub_model_id
    set (post_train, save, then create_model_card -> Trainer.push_to_hub, then post_train
    again) and stops at the huggingface_hub API boundary: HfApi.create_repo and
    HfApi.upload_folder are replaced by recorders of what would have been uploaded."""
    uploads = []

    def record_upload(self, *, repo_id, folder_path, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.is_file()}
        uploads.append({"repo_id": repo_id, "files": files})

    def record_repo(self, repo_id, **kwargs):
        return RepoUrl(f"{constants.ENDPOINT}/{repo_id}")

    monkeypatch.setattr(HfApi, "upload_folder", record_upload)
    monkeypatch.setattr(HfApi, "create_repo", record_repo)

    from axolotl_cat_plugin.integration.plugin import CatMergePlugin

    out = tmp_path / "out"
    cfg = plugin_cfg(world, out, hub_model_id="me/cat-soup")
    model = fitted_cat_model(world)
    with torch.no_grad():
        expected = model(input_ids=TOKENS).logits
    args = TrainingArguments(
        output_dir=str(out), hub_model_id="me/cat-soup", report_to="none", use_cpu=True
    )
    trainer = CatTrainerStandIn(model=model, args=args)
    plugin = CatMergePlugin()
    plugin.post_trainer_create(cfg, trainer)
    plugin.post_train(cfg, trainer.model)  # axolotl.train.execute_training
    trainer.save_model()  # save_trained_model
    trainer.push_to_hub()  # create_model_card, with hub_model_id set
    plugin.post_train(cfg, model)  # the end of axolotl.train.train

    assert [upload["repo_id"] for upload in uploads] == ["me/cat-soup"]
    files = uploads[0]["files"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert "cat_coefficients.json" in files
    card = files["README.md"].decode()
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and "cat-merge" in meta["tags"]
    assert meta["datasets"] == ["org/mix"]
    assert 'PeftModel.from_pretrained(base, "me/cat-soup")' in card
    uploaded = tmp_path / "uploaded"
    uploaded.mkdir()
    for name, content in files.items():
        (uploaded / name).write_bytes(content)
    assert json.loads(files["cat_coefficients.json"])["skills"][0]["name"] == "math"
    reloaded = PeftModel.from_pretrained(load_base(world["base"]), uploaded)
    with torch.no_grad():
        assert (reloaded(input_ids=TOKENS).logits - expected).abs().max() <= 1e-5


def test_card_says_the_objective_and_that_the_skills_wrote_the_mix():
    training = {
        "datasets": [{"path": "out/self_mix/self_mix-0123.jsonl"}],
        "steps": 400,
        "objective": "distill",
        "self_mix": {"pool": 1000, "keep": 200},
    }
    card = model_card(record(training=training), config={"r": 12})
    assert "- objective: distill" in card
    assert "written by the skills themselves, no skill data (1000 samples per skill" in card
    assert "self_mix: " not in card  # the mapping itself is not dumped as a line


def test_baselines_with_a_grader_show_both_metrics_and_are_judged_by_the_grader():
    methods = [
        {"method": "math alone", "weights": [1, 0], "eval_loss": 1.2, "graded": 0.25},
        {"method": "uniform sum", "weights": [1, 1], "eval_loss": 0.9, "graded": 0.5},
        {"method": "CAT (fitted)", "weights": None, "eval_loss": 1.0, "graded": 0.75},
    ]
    baselines = {
        "metric": "graded",
        "methods": methods,
        "best_static": "uniform sum",
        "cat_beats_best_static": True,
        "eval_rows_from": "training_mix",
        "rows_evaluated": 8,
        "grader": {"function": "g.py:score", "prompts": "p.jsonl"},
        "prompts_graded": 4,
    }
    card = " ".join(model_card(record(baselines=baselines), config={"r": 12}).split())
    assert "| method | eval loss | graded |" in card
    assert "| CAT (fitted) | 1.0000 | 0.7500 |" in card
    assert "By the graded score, the fitted CAT beats the best static mix (uniform sum)" in card
    assert "`g.py:score` on greedy replies to the 4 prompts of `p.jsonl`" in card
    # a grader alone (no eval split): one column
    alone = {
        **baselines,
        "methods": [{k: v for k, v in m.items() if k != "eval_loss"} for m in methods],
    }
    card = " ".join(model_card(record(baselines=alone), config={"r": 12}).split())
    assert "| method | graded |" in card and "| uniform sum | 0.5000 |" in card
