"""Issue 23 in the miniature: CAT fitted on a mix the skills write themselves, no skill data.

    python scripts/demo/self_mix_bench.py --out docs/measurements/self_mix_miniature.json
    python scripts/demo/self_mix_bench.py --granularity module --variants real_lm \
        --lr real_lm=0.05 --early-stop 40 --out docs/measurements/fit_fixes_miniature.json

Needs the demo's world, base and two skills (scripts/demo.sh's first stages, demo_out/). Plain
torch in one process, on the package's own API (attach_cat, build_self_mix, distill_loss,
export_cat), graded by scripts/demo/eval_composition.py's own generate/accuracy on the adapter
export_cat writes, loaded as the grader loads it. Variants:

- self_distill: per seed, a self-written mix (build_self_mix: `--pool` samples per skill from
  the `--prompts`, keep the `--keep` with the highest mean KL(skill ‖ base)), fitted with the
  distillation objective (each row's teacher the skill that wrote it);
- self_lm: the same mix, LM loss;
- real_lm: the demo's real 400-row mix (5% of each skill's data), LM loss (the demo's CAT
  core, in this harness);
- real_distill: the real mix, distilled (a row's teacher: the skill whose data it is);
- uniform: no fit, the start (core: the plain sum of the skills; module, layer, rank: their
  average).

Every fit: `--granularity` (core by default), init 1.0 (the plain sum) for core and 0.5 (the
average) for module, layer and rank, as the demo's YAMLs start them; AdamW without weight
decay, cosine schedule (scripts/demo/fit_loop.py, the real model's loop too), `--steps` x
`--batch` rows, sequences as Axolotl's completion type tokenizes them (no BOS, EOS appended,
64 tokens). The learning rate of each variant is picked on seed 0 from `--grid` by the
variant's own objective on 10% of its training rows held out (nothing reads a test), or given
with `--lr VARIANT=LR`; the seeds then fit on all rows.
Results are written after every fit, keyed "GRANULARITY/VARIANT" (the uniform start too: for
module, layer and rank it is the average). The self-written mix depends on the skills, the
options and the seed only, never the granularity: build_self_mix caches it by hash under
DEMO/self-mix, so each seed's mix is written once for all granularities. The output records the
skills' weights (sha256) and refuses to add runs of other skills to it.

Issue 19 item 4 (scripts/demo/regularize.py, as scripts/real_model/fit.py uses it): `--penalty
W` adds StartPenalty (W x the squared change of the coefficients relative to their start's
squared norm) to the objective before each backward; `--early-stop N` evaluates the variant's
own objective on held-out rows every N steps (and at step 0) and restores the coefficients at
the best value after the last step. With `--early-stop` every seed's fit holds out the same 10%
of its rows as the learning-rate pick does (the same shuffle, seed 0) and trains on the other
90%; without it the seeds fit on all rows. Such runs are keyed "GRANULARITY/VARIANT/penalty W"
or ".../early-stop N". Every run records the per-skill and composite accuracies, the fit's
seconds (held-out checks included), its last-50-step training objective and how far the
coefficients moved (relative L2 change of all coefficients from the start, min and max).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import eval_composition as grader  # noqa: E402
from fit_loop import fit_loop  # noqa: E402

from axolotl_cat_plugin import CatConfig, attach_cat, export_cat  # noqa: E402
from axolotl_cat_plugin.core.fit.distill import distill_loss, skill_names  # noqa: E402
from axolotl_cat_plugin.core.fit.self_mix import SelfMixOptions, build_self_mix  # noqa: E402
from axolotl_cat_plugin.core.state import cat_metadata, coefficient_parameters  # noqa: E402

SKILLS = ("manual", "french")
VARIANTS = ("self_distill", "self_lm", "real_lm", "real_distill", "uniform")
# one-word openings of the world's generic (pretraining) text, as in the prototype
PROMPTS = ["the", "in", "by", "we", "nobody"]
GRANULARITIES = ("module", "layer", "rank", "core")
# the starts of example_yamls/tiny-cpu/demo-cat*.yml
INIT = {"module": 0.5, "layer": 0.5, "rank": 0.5, "core": 1.0}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", default="demo_out")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--granularity", default="core", choices=GRANULARITIES)
    p.add_argument("--penalty", type=float, default=0.0, help="StartPenalty weight (0: off)")
    p.add_argument("--early-stop", type=int, default=0, help="held-out check every N steps")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--grid", nargs="+", type=float, default=[0.002, 0.01, 0.05])
    p.add_argument("--lr", action="append", default=[], help="VARIANT=LR: skip its tuning")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--pool", type=int, default=1000)
    p.add_argument("--keep", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--prompts", nargs="+", default=PROMPTS)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--out", default="docs/measurements/self_mix_miniature.json")
    return p.parse_args()


def tokenize(tokenizer, rows, seq_len):
    """(input_ids list, teacher index) per row, as Axolotl's completion type: EOS appended."""
    out = []
    for row in rows:
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        ids = (ids + [tokenizer.eos_token_id])[:seq_len]
        out.append((ids, SKILLS.index(row["skill"])))
    return out


def collate(items, pad):
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad)
    labels = torch.full((len(items), width), -100)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (ids, _) in enumerate(items):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    teachers = torch.tensor([t for _, t in items])
    return input_ids, mask, labels, teachers


def objective_sum(model, batch, objective):
    """(summed loss over the counted tokens, their count) for one batch."""
    input_ids, mask, labels, teachers = batch
    count = int((labels[:, 1:] != -100).sum())
    if objective == "distill":
        return distill_loss(model, input_ids, labels, teachers, mask, num_items_in_batch=1), count
    return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss * count, count


def split(rows):
    """(train, held-out) rows: the same 10% for every seed (shuffled with seed 0)."""
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    cut = len(rows) // 10
    return [rows[i] for i in order[cut:]], [rows[i] for i in order[:cut]]


def moved(model, initial):
    """How far the coefficients moved: relative L2 change of all of them, min and max value."""
    now = coefficient_parameters(model)
    flat = torch.cat([now[n].detach().flatten() for n in initial])
    start = torch.cat([initial[n].flatten() for n in initial])
    change = float((flat - start).norm() / start.norm())
    return {"relative_change": round(change, 4), "min": float(flat.min()), "max": float(flat.max())}


def fit(
    model, initial, items, objective, lr, args, seed, pad, penalty=0.0, stop=None,
    parameters=coefficient_parameters, warmup=0,
):  # fmt: skip
    """Fit the coefficients from `initial`; returns (last-50-step mean objective, early-stop
    record or None). stop: (every N steps, held-out items) for early stopping. parameters:
    {name: tensor} of what is trained (the CAT coefficients; scripts/demo/data_curve.py passes
    a fresh LoRA's), warmup: linear warmup steps before the cosine decay."""
    with torch.no_grad():
        for name, param in parameters(model).items():
            param.copy_(initial[name])
    named = parameters(model)

    def batch_loss(chosen):
        loss, count = objective_sum(model, collate([items[i] for i in chosen], pad), objective)
        return loss / count

    early_stop = None
    if stop:
        every, val = stop

        def evaluate():
            value = held_out(model.eval(), val, objective, pad)
            model.train()
            return value

        early_stop = (every, evaluate)
    model.train()
    losses, stopping = fit_loop(
        named, batch_loss, rows=len(items), steps=args.steps, batch=args.batch, lr=lr,
        seed=seed, warmup=warmup, penalty=penalty, early_stop=early_stop,
    )  # fmt: skip
    model.eval()
    record = None
    if stopping:
        record = {
            "every": stopping.every,
            "history": stopping.history,
            "kept_step": stopping.best_step,
            "kept_value": round(stopping.best_value, 4),
        }
    return sum(losses[-50:]) / len(losses[-50:]), record


@torch.no_grad()
def held_out(model, items, objective, pad, batch=32):
    total = count = 0.0
    for start in range(0, len(items), batch):
        loss, n = objective_sum(model, collate(items[start : start + batch], pad), objective)
        total, count = total + float(loss), count + n
    return total / count


def grade(model, tokenizer, args, folder, export=export_cat):
    """The grader's accuracies of the adapter `export` (export_cat by default) writes to
    `folder`, loaded as the grader loads it: {test: accuracy %}."""
    export(model, folder)
    graded = grader.load(f"{args.demo}/base", str(folder))
    left = AutoTokenizer.from_pretrained(f"{args.demo}/base", padding_side="left")
    tests = Path(args.demo) / "world" / "data"
    result = {}
    for test in grader.TESTS:
        rows = grader.read_jsonl(tests / f"test_{test}.jsonl")
        answers = grader.generate(graded, left, [r["prompt"] for r in rows], 200, 6)
        result[test] = round(100 * grader.accuracy(rows, answers), 1)
    return result


def main():
    args = parse_args()
    torch.manual_seed(0)
    base = f"{args.demo}/base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    skills = [{"path": f"{args.demo}/skill-{s}", "name": s} for s in SKILLS]
    granularity, init = args.granularity, INIT[args.granularity]
    model = attach_cat(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        CatConfig(skills=skills, granularity=granularity, init=init),
    )
    assert tuple(skill_names(model)) == SKILLS
    model.eval()
    initial = {n: p.detach().clone() for n, p in coefficient_parameters(model).items()}
    pad = tokenizer.pad_token_id
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    per_run = ("out", "lr", "variants", "seeds", "granularity", "penalty", "early_stop")
    stamp = {s["name"]: s["weights_sha256"] for s in cat_metadata(model).skills}
    earlier = results.get("settings", {}).get("skills_sha256", stamp)
    if earlier != stamp:
        raise SystemExit(f"{out}: its runs used other skills ({earlier}) than {args.demo} "
                         f"({stamp}): write to another --out")  # fmt: skip
    results["settings"] = {k: v for k, v in vars(args).items() if k not in per_run}
    results["settings"]["skills_sha256"] = stamp
    results.setdefault("runs", {})
    results.setdefault("lr", {})
    fixed_lr = {v: float(lr) for v, lr in (e.split("=") for e in args.lr)}
    suffix = (f"/penalty {args.penalty}" if args.penalty else "") + (
        f"/early-stop {args.early_stop}" if args.early_stop else ""
    )
    real = [json.loads(line) for line in (Path(args.demo) / "world/data/mix.jsonl").open()]
    half = len(real) // 2  # mix.jsonl: the manual's rows, then as many of french's
    real = [{**row, "skill": SKILLS[0] if i < half else SKILLS[1]} for i, row in enumerate(real)]
    mixes = {}

    def mix(seed):
        if seed not in mixes:
            started = time.time()
            options = SelfMixOptions(
                prompts=args.prompts, pool=args.pool, keep=args.keep, seed=seed,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, batch_size=250, chat=False,
            )  # fmt: skip
            path = build_self_mix(model, tokenizer, Path(args.demo) / "self-mix", options)
            rows = [json.loads(line) for line in path.open()]
            mixes[seed] = rows
            seconds = round(time.time() - started, 1)
            entry = results.setdefault("mixes", {}).get(str(seed), {})
            if entry.get("path") != str(path):  # keep the seconds of the build, not of a read
                results["mixes"][str(seed)] = {"path": str(path), "seconds": seconds}
            print(f"[bench] self-written mix seed {seed}: {path} ({seconds} s)", flush=True)
        return mixes[seed]

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            name = f"{granularity}/{variant}"
            if variant == "uniform":
                results["runs"][name] = {"-": grade(model, tokenizer, args, Path(tmp) / "u")}
                print(f"[bench] {name}: {results['runs'][name]}", flush=True)
                save()
                continue
            objective = variant.split("_")[1]

            def rows_for(seed, variant=variant):
                return mix(seed) if variant.startswith("self") else real

            if variant in fixed_lr:
                results["lr"][name] = {"chosen": fixed_lr[variant], "given": True}
            elif name not in results["lr"] or results["lr"][name].get("grid") != args.grid:
                train, val = (tokenize(tokenizer, r, args.seq_len) for r in split(rows_for(0)))
                scores = {}
                for lr in args.grid:
                    started = time.time()
                    fit(model, initial, train, objective, lr, args, 0, pad)
                    scores[lr] = held_out(model, val, objective, pad)
                    seconds = time.time() - started
                    print(f"[bench] tune {name} lr {lr}: held-out {objective} "
                          f"{scores[lr]:.4f} ({seconds:.0f} s)", flush=True)  # fmt: skip
                chosen = min(scores, key=scores.get)
                results["lr"][name] = {"grid": args.grid, "held_out": scores, "chosen": chosen}
                save()
            lr = results["lr"][name]["chosen"]
            for seed in args.seeds:
                key = f"seed {seed}"
                if key in results["runs"].get(name + suffix, {}):
                    continue
                rows = rows_for(seed)
                stop = None
                if args.early_stop:
                    rows, val = split(rows)
                    stop = (args.early_stop, tokenize(tokenizer, val, args.seq_len))
                items = tokenize(tokenizer, rows, args.seq_len)
                started = time.time()
                final, record = fit(
                    model, initial, items, objective, lr, args, seed, pad, args.penalty, stop
                )
                seconds = round(time.time() - started, 1)
                scores = grade(model, tokenizer, args, Path(tmp) / f"{variant}-{seed}")
                run = {
                    **scores,
                    "lr": lr,
                    "init": init,
                    "fit_seconds": seconds,
                    "final_loss": round(final, 4),
                    "moved": moved(model, initial),
                    **({"penalty": args.penalty} if args.penalty else {}),
                    **({"early_stop": record} if record else {}),
                }
                results["runs"].setdefault(name + suffix, {})[key] = run
                print(f"[bench] {name + suffix} seed {seed}: {run}", flush=True)
                save()
    summary = {}
    for name, runs in results["runs"].items():
        composite = [r["composite"] for r in runs.values()]
        summary[name] = {
            "composite_mean": round(sum(composite) / len(composite), 1),
            "composite": composite,
            "runs": len(composite),
        }
        for skill in SKILLS:
            summary[name][f"{skill}_mean"] = round(
                sum(r[skill] for r in runs.values()) / len(composite), 1
            )
    results["summary"] = summary
    save()
    print(json.dumps(summary, indent=2))
    assert all(math.isfinite(v["composite_mean"]) for v in summary.values())


if __name__ == "__main__":
    main()
