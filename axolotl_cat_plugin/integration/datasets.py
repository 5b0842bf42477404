"""The datasets of a cat_merge run that writes its own mix or distills (plugin.load_datasets).

A thin layer: the core writes the mix (core/fit/self_mix.py) and computes the loss
(core/fit/distill.py); Axolotl loads and tokenizes every dataset as it would any other. For
`objective: distill` the rows of each skill (the `skill` column) are tokenized as a dataset of
their own and given the teacher column core.fit.distill.TEACHER_KEY (Axolotl's tokenization
keeps only what it writes), then the skills' datasets are concatenated and shuffled.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from pathlib import Path

import torch
from axolotl.utils.dict import DictDefault

from ..core.errors import CatError
from ..core.fit.distill import SKILL_COLUMN, TEACHER_KEY

LOG = logging.getLogger(__name__)


def load_cat_datasets(cfg, block):
    """Axolotl's TrainDatasetMeta for a run with cat_merge.self_mix or objective distill,
    else None (Axolotl's own loading). cfg.datasets becomes what was trained on."""
    if block.self_mix is None and block.objective == "lm":
        return None
    datasets = [DictDefault(dict(entry)) for entry in cfg.datasets or []]
    if block.self_mix is not None:
        path, chat = write_self_mix(cfg, block)
        entry = {"path": str(path), "ds_type": "json", "type": "completion"}
        if chat:
            entry = {**entry, "type": "chat_template", "field_messages": "messages"}
        datasets = [DictDefault(entry)]
    if block.objective == "lm":
        return _load(cfg, datasets)
    return _load_by_teacher(cfg, block, datasets)


def mix_folder(cfg, block) -> Path:
    """Where the self-written mix and the per-skill splits go: self_mix.dir, else
    output_dir/self_mix."""
    folder = block.self_mix.dir if block.self_mix is not None else None
    return Path(folder or Path(cfg.output_dir) / "self_mix")


def write_self_mix(cfg, block) -> tuple[Path, bool]:
    """Build the CAT model from the base (on the GPU when there is one), write the mix with
    the core, free the model. Returns (JSONL path, whether its rows are chat messages)."""
    from axolotl.loaders import load_tokenizer
    from transformers import AutoModelForCausalLM

    from ..core import attach_cat
    from ..core.fit.self_mix import build_self_mix, uses_chat

    tokenizer = load_tokenizer(cfg)
    options = block.self_mix.to_core()
    dtype = torch.bfloat16 if cfg.bf16 is True and torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        cfg.base_model, dtype=dtype, trust_remote_code=bool(cfg.trust_remote_code)
    )
    if torch.cuda.is_available():
        model = model.to(f"cuda:{torch.cuda.current_device()}")
    try:
        cat = attach_cat(model, block.to_core())
        path = build_self_mix(cat, tokenizer, mix_folder(cfg, block), options)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    LOG.info("cat_merge.self_mix: training on %s", path)
    return path, uses_chat(tokenizer, options)


def _load(cfg, datasets):
    from axolotl.common.datasets import load_datasets

    cfg.datasets = datasets
    cfg.total_num_tokens = cfg.total_supervised_tokens = None  # counted for these datasets
    return load_datasets(cfg=cfg)


def _load_by_teacher(cfg, block, datasets):
    from axolotl.common.datasets import TrainDatasetMeta
    from axolotl.utils.trainer import calculate_total_num_steps
    from datasets import concatenate_datasets

    names = [skill.name for skill in block.to_core().skills]
    folder = mix_folder(cfg, block) / "by_skill"
    splits = [split_by_skill(entry, names, folder) for entry in datasets]
    train, evaluation = [], []
    for index, name in enumerate(names):
        entries = [DictDefault({**entry, "path": str(split[name])}) for entry, split in
                   zip(datasets, splits, strict=True) if name in split]  # fmt: skip
        if not entries:
            LOG.warning("cat_merge.objective distill: no row names the skill %r", name)
            continue
        meta = _load(cfg, entries)
        train.append(_with_teacher(meta.train_dataset, index))
        if meta.eval_dataset is not None:
            evaluation.append(_with_teacher(meta.eval_dataset, index))
    cfg.datasets = datasets
    train_dataset = concatenate_datasets(train).shuffle(seed=cfg.seed or 42)
    eval_dataset = concatenate_datasets(evaluation) if evaluation else None
    cfg.total_num_tokens = cfg.total_supervised_tokens = None
    steps = calculate_total_num_steps(cfg, train_dataset)
    return TrainDatasetMeta(train_dataset, eval_dataset, steps)


def _with_teacher(dataset, index: int):
    return dataset.add_column(TEACHER_KEY, [index] * len(dataset))


def split_by_skill(entry, names: list[str], folder: Path) -> dict[str, Path]:
    """{skill: JSONL of the entry's rows whose `skill` column names it}, cached by content.

    Raises CatError for a dataset that is no local JSON/JSONL file, a row without the column
    and a row naming no skill of the run (the file and line are named).
    """
    source = Path(str(entry.get("path")))
    if not source.is_file():
        raise CatError(
            f"cat_merge.objective: distill reads each row's `{SKILL_COLUMN}` column from local "
            f"JSON/JSONL files; {source} is not one (datasets entry path)"
        )
    text = source.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON list of rows
        rows = json.loads(stripped)
        lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        rows = [json.loads(line) for line in lines]
    by_skill: dict[str, list[str]] = {}
    for number, (row, line) in enumerate(zip(rows, lines, strict=True), 1):
        skill = row.get(SKILL_COLUMN) if isinstance(row, dict) else None
        if skill not in names:
            raise CatError(
                f"{source} row {number}: `{SKILL_COLUMN}` is {skill!r}; with objective distill "
                f"every row must name the skill it comes from, one of {names}"
            )
        by_skill.setdefault(skill, []).append(line)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for skill, chosen in by_skill.items():
        path = folder / f"{source.stem}-{digest}-{skill}.jsonl"
        if not path.is_file():
            path.write_text("".join(line + "\n" for line in chosen))
        written[skill] = path
    return written
