"""The Hub model card (README.md) of a CAT export: pure string building from the record.

The front-matter is what the Hub indexes (base model, library, tags, datasets); the body says
which skills went in, what the coefficients came out as, how they were fitted and how to load
the adapter with PEFT, vLLM and Axolotl.
"""

from __future__ import annotations

import re

import yaml

from ..format import CatRecord
from ..granularity.base import granularity_labels
from .serving import VLLM_MAX_LORA_RANKS, saved_modules_note, vllm_max_lora_rank
from .summary import layer_table, max_svd_error, pruned, skill_names, skill_stats

TAGS = ["axolotl", "lora", "cat-merge", "lora-soups", "peft"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATA_FILE = re.compile(r"\.(jsonl?|csv|tsv|parquet|arrow|txt)(\.(gz|bz2|xz|zst))?$", re.I)
_PLACEHOLDER_ADAPTER = "path/to/this/adapter"


def looks_like_hub_id(value) -> bool:
    """`org/name` and not a data file: the Hub refuses a card whose base_model or datasets
    name a local path, so only ids that can be Hub repos go into the front-matter."""
    return isinstance(value, str) and bool(_HUB_ID.match(value)) and not _DATA_FILE.search(value)


def model_card(
    record: CatRecord,
    *,
    config: dict,
    hub_model_id: str | None = None,
    plot_file: str | None = None,
) -> str:
    """README.md for an export: `record` is cat_coefficients.json (format.CatRecord), `config`
    adapter_config.json.

    plot_file: the heatmap's file name beside the card, embedded when given.
    """
    sections = [
        _front_matter(record),
        _introduction(record, config, hub_model_id),
        _skills(record),
        _coefficients(record, plot_file),
        _layers(record),
        _training(record),
        _baselines(record),
        _usage(record, config, hub_model_id),
    ]
    return "\n\n".join(sections) + "\n"


def _front_matter(record: CatRecord) -> str:
    metadata: dict = {}
    if looks_like_hub_id(record.base_model):
        metadata["base_model"] = record.base_model
    metadata["library_name"] = "peft"
    metadata["tags"] = list(TAGS)
    datasets = [path for path in _dataset_paths(record) if looks_like_hub_id(path)]
    if datasets:
        metadata["datasets"] = datasets
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False).rstrip("\n") + "\n---"


def _introduction(record: CatRecord, config: dict, hub_model_id: str | None) -> str:
    title = hub_model_id.rsplit("/", 1)[-1] if hub_model_id else "CAT adapter"
    names = skill_names(record)
    learned = granularity_labels(record.granularity).description or "coefficients"
    return (
        f"# {title}\n\n"
        f"A LoRA adapter for `{record.base_model or 'an unrecorded base model'}` made "
        f'with CAT ("LoRA Soups", Prabhakar et al., COLING 2025) from {len(names)} frozen '
        f"skill LoRAs ({', '.join(f'`{n}`' for n in names)}): {learned} were learned and "
        "folded into the skills' factors. The result is one standard PEFT LoRA adapter of rank "
        f"{config.get('r')} (scaling 1) that loads without any CAT code."
    )


def _skills(record: CatRecord) -> str:
    rows = [
        [
            skill.get("name"),
            skill.get("source"),
            skill.get("revision") or "",
            _with_pattern(skill.get("rank"), skill.get("rank_pattern")),
            _with_pattern(skill.get("lora_alpha"), skill.get("alpha_pattern")),
            "yes" if skill.get("use_rslora") else "no",
        ]
        for skill in record.skills
    ]
    header = ["skill", "source", "revision", "r", "lora_alpha", "rsLoRA"]
    return "## Skills\n\n" + _table(header, rows)


def _coefficients(record: CatRecord, plot_file: str | None) -> str:
    labels = granularity_labels(record.granularity)
    over = labels.over
    rows = [
        [name, f"{s.mean:.4f}", f"{s.min:.4f}", f"{s.max:.4f}", str(s.count)]
        for name, s in skill_stats(record).items()
    ]
    lines = [
        "## Coefficients",
        "",
        f"Granularity `{record.granularity}`, parametrization "
        f"`{record.parametrization}`. Effective coefficient of each skill, over the "
        f"{over} it touches (1.0 everywhere would be the plain sum of the skills).",
        "",
        _table(["skill", "mean", "min", "max", over], rows),
    ]
    note = labels.card_note(record)
    if note:
        lines += ["", note]
    notes = [f"Concatenated rank {record.concatenated_rank}, exported rank {record.exported_rank}."]
    if record.prune_threshold is not None:
        notes.append(
            f"Pruned at |coefficient| < {record.prune_threshold}: {pruned(record)} removed."
        )
    error = max_svd_error(record)
    if error is not None:
        notes.append(
            f"Compressed to rank {record.export_rank} with a truncated SVD; largest "
            f"relative Frobenius error over modules {error:.2e}."
        )
    lines += ["", " ".join(notes)]
    if plot_file:
        lines += ["", f"![CAT coefficients per skill and decoder layer]({plot_file})"]
    return "\n".join(lines)


def _layers(record: CatRecord) -> str:
    rows, means = layer_table(record)
    names = skill_names(record)
    body = [
        [str(row)] + [f"{means[row][n]:.3f}" if n in means[row] else "—" for n in names]
        for row in rows
    ]
    return (
        "## Per layer\n\nMean coefficient of each skill over the layer's modules "
        "(— where the skill has no factors).\n\n" + _table(["layer", *names], body)
    )


def _training(record: CatRecord) -> str:
    training = record.training
    lines = ["## How it was fitted", ""]
    if training is None:
        lines.append(
            f"Granularity `{record.granularity}`, parametrization "
            f"`{record.parametrization}`; no training record was saved with this export."
        )
        return "\n".join(lines)
    datasets = _dataset_paths(record)
    lines += [
        f"- datasets: {', '.join(f'`{d}`' for d in datasets) if datasets else 'not recorded'}",
        f"- steps: {training.get('steps', 'not recorded')}",
        f"- learning rate (coefficients): {training.get('learning_rate', 'not recorded')}",
        f"- granularity: `{record.granularity}`",
        f"- parametrization: `{record.parametrization}`",
    ]
    for key, value in training.items():
        if key not in ("datasets", "steps", "learning_rate") and _is_scalar(value):
            lines.append(f"- {key.replace('_', ' ')}: {value}")
    mix = training.get("self_mix")
    if isinstance(mix, dict):  # core/fit/self_mix.py: no skill data was used
        lines.append(
            f"- mix: written by the skills themselves, no skill data ({mix.get('pool')} samples "
            f"per skill, the {mix.get('keep')} with the highest KL(skill || base) kept)"
        )
    return "\n".join(lines)


TEST = "`test_datasets`"
OWN = (
    "rows split off the fit's own mix (`val_set_size`), i.e. from the skills' own training data: "
    "a static mix that replays what the skills memorised scores well there, which need not hold "
    "on the task you compose them for; give `test_datasets` the skills never saw, or a "
    "`grader`, for a fairer comparison"
)


def _baselines(record: CatRecord) -> str:
    baselines = record.baselines
    if baselines is None or not baselines.get("methods"):
        return (
            "## Against static merges\n\nNot measured: the run had no eval split "
            "(`val_set_size` or `test_datasets`) and no `grader`."
        )
    columns = [key for key in ("eval_loss", "graded") if key in baselines["methods"][0]]
    rows = [[row["method"], *(f"{row[c]:.4f}" for c in columns)] for row in baselines["methods"]]
    said = []
    if "eval_loss" in columns:
        own = baselines.get("eval_rows_from") != "test_datasets"
        said.append(f"Eval loss on {baselines.get('rows_evaluated')} rows: {OWN if own else TEST}.")
    if "graded" in columns:
        grader, count = baselines.get("grader") or {}, baselines.get("prompts_graded")
        said.append(f"Graded: the mean score (0 to 1) of `{grader.get('function')}` on greedy "
                    f"replies to the {count} prompts of `{grader.get('prompts')}`.")  # fmt: skip
    metric = "graded score" if baselines.get("metric") == "graded" else "eval loss"
    verdict = "beats" if baselines.get("cat_beats_best_static") else "does not beat"
    return (
        f"## Against static merges\n\n{' '.join(said)} The same skills with fixed weights are "
        f"set in place of the fitted ones. By the {metric}, the fitted CAT {verdict} the best "
        f"static mix ({baselines.get('best_static')}).\n\n"
        + _table(["method", *(c.replace("_", " ") for c in columns)], rows)
    )


def _usage(record: CatRecord, config: dict, hub_model_id: str | None) -> str:
    base = record.base_model or "BASE_MODEL"
    adapter = hub_model_id or _PLACEHOLDER_ADAPTER
    rank = int(config.get("r") or record.exported_rank or 1)
    max_rank = vllm_max_lora_rank(rank)
    if max_rank is None:
        vllm_note = (
            f"The adapter's rank {rank} is above vLLM's largest --max-lora-rank "
            f"({VLLM_MAX_LORA_RANKS[-1]}): re-export it smaller first, e.g. "
            f"`axolotl-cat export RUN_DIR --rank {VLLM_MAX_LORA_RANKS[-1]} --out DIR`."
        )
        max_rank = VLLM_MAX_LORA_RANKS[-1]
    else:
        vllm_note = (
            f"--max-lora-rank must be at least the adapter's rank ({rank}); {max_rank} is the "
            "smallest size vLLM accepts that fits."
        )
    if record.saved_modules:
        vllm_note += " " + saved_modules_note(record)
    return "\n".join(
        [
            "## How to use it",
            "",
            "PEFT:",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{adapter}")',
            "```",
            "",
            "vLLM:",
            "",
            "```bash",
            f"vllm serve {base} --enable-lora --lora-modules cat={adapter} "
            f"--max-lora-rank {max_rank}",
            "```",
            "",
            vllm_note,
            "",
            "Axolotl, merged into the base weights (the CAT config it was fitted with, or any "
            f"config with `base_model: {base}` and `adapter: lora`):",
            "",
            "```bash",
            f"axolotl merge-lora config.yml --lora-model-dir {adapter}",
            "```",
        ]
    )


def _dataset_paths(record: CatRecord) -> list[str]:
    paths = []
    for dataset in (record.training or {}).get("datasets") or []:
        path = dataset.get("path") if isinstance(dataset, dict) else dataset
        if isinstance(path, str) and path not in paths:
            paths.append(path)
    return paths


def _with_pattern(value, pattern) -> str:
    if not pattern:
        return str(value)
    return f"{value} ({', '.join(f'{key}: {v}' for key, v in pattern.items())})"


def _is_scalar(value) -> bool:
    return isinstance(value, (str, int, float, bool))


def _table(header: list[str], rows: list[list]) -> str:
    lines = [_row(header), "|" + "|".join("---" for _ in header) + "|"]
    lines += [_row(row) for row in rows]
    return "\n".join(lines)


def _row(cells: list) -> str:
    # a | inside a cell (a path, a name) would split the Markdown row
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"
