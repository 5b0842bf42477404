"""Issue 19 item 3 in the miniature: how much data each method needs to compose the skills.

    OMP_NUM_THREADS=1 python scripts/demo/data_curve.py \
        --out docs/measurements/data_curve_miniature.json \
        --figure docs/measurements/data_curve_miniature.png

Needs the demo's world, base and two skills (demo_out/). For each fraction f of the skills'
data (`--fractions`, in this order), the mix is the first round(f x rows) rows of each skill's
data (world/data/{manual,french}.jsonl) after one fixed shuffle (random.Random(1234), manual's
rows then french's): the same rows for every method and seed, and each fraction's rows hold the
smaller fractions' (nested). The 5% rows are 200 per skill as in the demo's mix.jsonl, but not
the same rows (mix.jsonl takes each file's first 200). Methods, on the same rows, the LM loss:

- cat_core: CAT granularity core, init 1.0, lr 0.01 (example_yamls/tiny-cpu/demo-cat-core.yml);
- cat_module: CAT per module (the default), init 0.5, lr 0.05 (demo-cat.yml);
- mix_lora: a fresh PEFT LoRA, r = the skills' total rank, lora_alpha = 2r, their
  target_modules, lr 0.01 and 20 warmup steps as example_yamls/tiny-cpu/mix-lora.yml;
- mix_lora_lr0.002: the same at lr 0.002 (not run by default: `--methods mix_lora_lr0.002`).

Every fit: scripts/demo/self_mix_bench.py's fit (AdamW without weight decay, cosine schedule,
`--batch` rows a step, the seed orders the batches; mix_lora's seed also draws its init) for
`--steps` steps, `--long-steps` at fractions of `--long-from` or more, then its grade (the
adapter written to a folder and scored by scripts/demo/eval_composition.py's generate/accuracy:
manual, french, composite). The JSON is rewritten after every fit, keyed
runs[method][fraction][seed "N"], with each run's fit and grade seconds; runs already in it are
kept and skipped, and it refuses runs of other skills (sha256 of the skills' weights). The
figure: composite against % of each skill's rows, log x, each seed a dot, the mean a line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from self_mix_bench import INIT, SKILLS, fit, grade, moved, tokenize  # noqa: E402

from axolotl_cat_plugin import CatConfig, attach_cat  # noqa: E402
from axolotl_cat_plugin.core.state import cat_metadata, coefficient_parameters  # noqa: E402

ROWS_SEED = 1234  # the one shuffle of each skill's rows (as scripts/real_model/fit.py's mix)
# method: (granularity or None for the fresh LoRA, learning rate, warmup steps), from the
# demo's YAMLs: demo-cat-core.yml, demo-cat.yml, mix-lora.yml
METHODS = {"cat_core": ("core", 0.01, 0), "cat_module": ("module", 0.05, 0)}
METHODS["mix_lora"] = (None, 0.01, 20)
# mix_lora at the lower rate of the demo's grid: on the 20% rows (seed 0) its held-out loss
# (rows 800-899 of each skill, outside every mix) was 1.015 against 1.388 at 0.01
METHODS["mix_lora_lr0.002"] = (None, 0.002, 20)
LABELS = {"cat_core": "CAT core", "cat_module": "CAT per module", "mix_lora": "fresh LoRA, lr 0.01"}
LABELS["mix_lora_lr0.002"] = "fresh LoRA, lr 0.002"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", default="demo_out")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["cat_core", "cat_module", "mix_lora"],
        choices=list(METHODS),
    )
    p.add_argument("--fractions", nargs="+", type=float, default=[0.05, 0.01, 0.025, 0.1, 0.2])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--long-steps", type=int, default=800)
    p.add_argument("--long-from", type=float, default=0.2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--deadline", type=float, default=0, help="Unix time: start no fit after it")
    p.add_argument("--out", default="docs/measurements/data_curve_miniature.json")
    p.add_argument("--figure", default="docs/measurements/data_curve_miniature.png")
    return p.parse_args()


def shuffled(data: Path) -> dict[str, list[dict]]:
    """Each skill's rows (with their `skill`) in the one fixed order the fractions cut."""
    rng = random.Random(ROWS_SEED)
    rows = {}
    for skill in SKILLS:
        lines = (data / f"{skill}.jsonl").read_text().splitlines()
        rng.shuffle(lines)
        rows[skill] = [{**json.loads(line), "skill": skill} for line in lines]
    return rows


def fresh_lora(base: str, skills: list[str], seed: int):
    """A fresh PEFT LoRA of the skills' total rank (lora_alpha = 2r), its init drawn by seed."""
    from peft import LoraConfig, PeftConfig, get_peft_model

    configs = [PeftConfig.from_pretrained(path) for path in skills]
    rank = sum(c.r for c in configs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=configs[0].target_modules)
    return get_peft_model(model, config), rank


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def draw(runs: dict, path: Path) -> None:
    """Composite against % of each skill's rows: each seed a dot, the mean a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 3.4))
    ticks = set()
    for method, fractions in runs.items():
        points = {float(f): [r["composite"] for r in s.values()] for f, s in fractions.items()}
        xs = sorted(points)
        ticks.update(xs)
        means = [statistics.mean(points[x]) for x in xs]
        (line,) = axes.plot([100 * x for x in xs], means, marker="o", label=LABELS[method])
        for x in xs:
            dots = points[x]
            axes.scatter([100 * x] * len(dots), dots, color=line.get_color(), alpha=0.35, s=12)
    axes.set_xscale("log")
    axes.set_xticks([100 * t for t in sorted(ticks)], [f"{100 * t:g}" for t in sorted(ticks)])
    axes.minorticks_off()
    axes.set_xlabel("% of each skill's rows in the fitting mix")
    axes.set_ylabel("composite accuracy %")
    axes.set_title("miniature: composite against the data the fit sees", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main():
    args = parse_args()
    torch.set_num_threads(1)
    base = f"{args.demo}/base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad = tokenizer.pad_token_id
    paths = [f"{args.demo}/skill-{s}" for s in SKILLS]
    skills = [{"path": path, "name": s} for path, s in zip(paths, SKILLS, strict=True)]
    cats = {}
    for method in args.methods:
        granularity = METHODS[method][0]
        if granularity:
            model = attach_cat(
                AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                CatConfig(skills=skills, granularity=granularity, init=INIT[granularity]),
            ).eval()
            initial = {n: p.detach().clone() for n, p in coefficient_parameters(model).items()}
            cats[method] = (model, initial)
    probe = next(iter(cats.values()))[0] if cats else attach_cat(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), CatConfig(skills=skills)
    )  # fmt: skip
    stamp = {s["name"]: s["weights_sha256"] for s in cat_metadata(probe).skills}
    out, figure = Path(args.out), Path(args.figure)
    results = json.loads(out.read_text()) if out.is_file() else {}
    earlier = results.get("settings", {}).get("skills_sha256", stamp)
    if earlier != stamp:
        raise SystemExit(f"{out}: its runs used other skills ({earlier}) than {args.demo}: "
                         f"write to another --out")  # fmt: skip
    rows = shuffled(Path(args.demo) / "world" / "data")
    results["settings"] = {
        **{k: v for k, v in vars(args).items() if k not in ("out", "figure", "deadline")},
        "rows_seed": ROWS_SEED,
        "rows_per_skill": {str(f): round(f * len(rows[SKILLS[0]])) for f in args.fractions},
        "methods": {
            m: {"granularity": g, "init": INIT[g] if g else None, "lr": lr, "warmup": w}
            for m, (g, lr, w) in METHODS.items()
        },
        "skills_sha256": stamp,
        "note": "the 5% rows are 200 per skill after the shuffle, not the demo's mix.jsonl",
    }
    runs = results.setdefault("runs", {})

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        draw({m: runs[m] for m in METHODS if runs.get(m)}, figure)

    with tempfile.TemporaryDirectory() as tmp:
        for fraction in args.fractions:
            count = round(fraction * len(rows[SKILLS[0]]))
            mix = [row for skill in SKILLS for row in rows[skill][:count]]
            items = tokenize(tokenizer, mix, args.seq_len)
            steps = args.long_steps if fraction >= args.long_from else args.steps
            run_args = argparse.Namespace(**{**vars(args), "steps": steps})
            for seed in args.seeds:
                for method in args.methods:
                    done = runs.get(method, {}).get(str(fraction), {})
                    if str(seed) in done:
                        continue
                    if args.deadline and time.time() > args.deadline:
                        print(f"[curve] deadline: {method} {fraction} seed {seed} not run")
                        continue
                    granularity, lr, warmup = METHODS[method]
                    started = time.time()
                    if granularity:
                        model, initial = cats[method]
                        fit(model, initial, items, "lm", lr, run_args, seed, pad)
                        extra = {"moved": moved(model, initial)}
                        export = None
                    else:
                        model, rank = fresh_lora(base, paths, seed)
                        initial = {n: p.detach().clone() for n, p in trainable(model).items()}
                        fit(model, initial, items, "lm", lr, run_args, seed, pad,
                            parameters=trainable, warmup=warmup)  # fmt: skip
                        extra = {"r": rank, "lora_alpha": 2 * rank}
                        export = type(model).save_pretrained
                    fit_seconds = round(time.time() - started, 1)
                    started = time.time()
                    folder = Path(tmp) / f"{method}-{fraction}-{seed}"
                    kwargs = {"export": export} if export else {}
                    scores = grade(model, tokenizer, run_args, folder, **kwargs)
                    run = {
                        **scores,
                        "rows_per_skill": count,
                        "steps": steps,
                        "fit_seconds": fit_seconds,
                        "grade_seconds": round(time.time() - started, 1),
                        **extra,
                    }
                    runs.setdefault(method, {}).setdefault(str(fraction), {})[str(seed)] = run
                    print(f"[curve] {method} {fraction} seed {seed}: {run}", flush=True)
                    save()
    results["summary"] = {
        m: {f: statistics.mean(r["composite"] for r in s.values()) for f, s in runs[m].items()}
        for m in runs
    }
    save()
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
