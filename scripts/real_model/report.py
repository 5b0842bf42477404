"""Gather one real-model task's scores into docs/measurements/real_model_<task>.json and a table.

    python scripts/real_model/report.py --task math_words --run real_model_out/math_words \
        --out docs/measurements/real_model_math_words.json

Per method: each seed's accuracies (both skills' tests and the composite), the update size,
the training seconds (the stage's wall time), and for fits the held-out losses and how far
the coefficients moved (fit.json). Methods trained once (skills, merges, data mixing) have
one entry under seed "-". The printed table gives the composite's mean and range over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from grade import GRADERS

ORDER = [
    "base",
    "uniform",
    "average",
    "ties",
    "dare",
    "data-mix",
    "mix_lora",
    "mix_lora_lr0.002",
    "cat_core_random",
    "cat_module",
    "cat_layer",
    "cat_rank",
    "cat_core",
    "cat_module_init1",
    "cat_module_distill",
    "cat_module_selfmix",
    "cat_layer_selfmix",
    "cat_rank_selfmix",
    "cat_core_selfmix",
    "cat_module_l2sp",
    "cat_module_early",
    "cat_core_l2sp",
    "cat_core_early",
]
# the data curve: these methods on other shares of the skills' rows (METHOD_fFRACTION)
CURVE = {"cat_module": "CAT per module", "mix_lora_lr0.002": "fresh LoRA (mix_lora)"}
MAIN_FRACTION = 0.1  # the share the main table's fits see
# the candidates a `granularity: auto` would fit on the user's mix (issue 19, item 5)
AUTO_CANDIDATES = ["cat_module", "cat_layer", "cat_rank", "cat_core"]


def gather(run: Path, task: str) -> dict:
    """{method: {seed: entry}} from scores.json, fit.json and the stage timings."""
    scores = json.loads((run / "scores.json").read_text())
    tests = list(GRADERS[task])
    methods: dict[str, dict] = {}
    for name, result in scores.items():
        seed, method = "-", name
        if name.startswith("seed-"):
            seed, method = name.split("/", 1)
            seed = seed.removeprefix("seed-")
        method = method.removeprefix("merges/")
        folder = run / name if name != "base" else None
        entry = {test: result[test] for test in tests}
        entry["update_ratio"] = result.get("update_ratio")
        entry["samples"] = {t: result[f"{t}_samples"] for t in tests}
        if folder is not None and (folder / ".stage-seconds").is_file():
            entry["train_seconds"] = int((folder / ".stage-seconds").read_text())
        if folder is not None and (folder / "fit.json").is_file():
            fit = json.loads((folder / "fit.json").read_text())
            entry["fit"] = {k: fit[k] for k in fit if k != "skills"}
        methods.setdefault(method, {})[seed] = entry
    return methods


def pick_by_held_out_loss(methods: dict, family: str) -> str | None:
    """Of the runs of one method at several learning rates (``family``, ``family_lr...``),
    the one with the lowest mean held-out loss after the fit (rows of the skills' data outside
    the mix: no test is read)."""
    runs = {
        name: [e["fit"]["held_out_loss_after"] for e in seeds.values() if "fit" in e]
        for name, seeds in methods.items()
        if (name == family or name.startswith(f"{family}_lr")) and "_f0." not in name
    }
    runs = {name: losses for name, losses in runs.items() if losses}
    return min(runs, key=lambda n: statistics.mean(runs[n])) if runs else None


def auto_pick(methods: dict) -> dict:
    """What picking the CAT variant by held-out loss (the rows of the skills' data outside the
    mix, as a ``granularity: auto`` on the user's own mix would) gives, seed by seed: the pick,
    its composite, the best variant's composite by the test, and whether they match."""
    # every seed any candidate has (none yet while a cold run is still at its skills)
    seeds = sorted(set().union(*(methods[m] for m in AUTO_CANDIDATES if m in methods)) - {"-"})
    by_seed = {}
    for seed in seeds:
        runs = {
            m: methods[m][seed]
            for m in AUTO_CANDIDATES
            if m in methods and "fit" in methods[m].get(seed, {})
        }
        if len(runs) < 2:
            continue
        pick = min(runs, key=lambda m: runs[m]["fit"]["held_out_loss_after"])
        best = max(runs[m]["composite"] for m in runs)
        by_seed[seed] = {
            "held_out_loss": {m: runs[m]["fit"]["held_out_loss_after"] for m in runs},
            "pick": pick,
            "pick_composite": runs[pick]["composite"],
            "best_composite": best,
            "best": sorted(m for m in runs if runs[m]["composite"] == best),
            "matches": runs[pick]["composite"] == best,
        }
    return by_seed


def curve(methods: dict) -> dict:
    """{method: {fraction: [composite of each seed]}} for the CURVE methods, the main table's
    runs at MAIN_FRACTION included."""
    points: dict[str, dict[float, list[float]]] = {}
    for name, seeds in methods.items():
        method, _, share = name.partition("_f")
        if method not in CURVE or (share and not share.startswith("0.")):
            continue
        fraction = float(share) if share else MAIN_FRACTION
        values = [entry["composite"] for entry in seeds.values()]
        points.setdefault(method, {})[fraction] = values
    return {m: dict(sorted(f.items())) for m, f in points.items() if len(f) > 1}


def draw_curve(points: dict, task: str, path: Path) -> None:
    """Composite against the share of the skills' rows, each seed a dot, the mean a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.2))
    for method, fractions in points.items():
        xs = [100 * f for f in fractions]
        means = [statistics.mean(v) for v in fractions.values()]
        (line,) = axes.plot(xs, means, marker="o", label=CURVE[method])
        for x, values in zip(xs, fractions.values(), strict=True):
            axes.scatter([x] * len(values), values, color=line.get_color(), alpha=0.35, s=12)
    axes.set_xscale("log")
    shares = sorted({100 * f for fractions in points.values() for f in fractions})
    axes.set_xticks(shares, [f"{x:g}" for x in shares])
    axes.minorticks_off()
    axes.set_xlabel("% of each skill's rows in the fitting mix")
    axes.set_ylabel("composite accuracy %")
    axes.set_title(f"{task}: the same steps, less or more data")
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(methods: dict, task: str, picked: str | None = None) -> str:
    """A markdown table: each test's mean, the composite's range and each seed's composite."""
    tests = list(GRADERS[task])
    known = [m for m in ORDER if m in methods]
    curves = {f"{m}_f{f}" for m, fs in curve(methods).items() for f in fs}
    others = [m for m in methods if m not in ORDER and m not in curves]
    names = others + known + sorted(curves & set(methods))  # the skills first, the curve last
    names = [n for n in names if n == "base"] + [n for n in names if n != "base"]
    lines = [
        "| method | " + " | ".join(tests) + " | composite (each seed) | ‖ΔW‖/‖W‖ | train s |",
        "|---|" + "---|" * (len(tests) + 3),
    ]
    for name in names:
        seeds = methods[name]
        cells = []
        for test in tests:
            values = [entry[test] for entry in seeds.values()]
            mean = statistics.mean(values)
            spread = f" ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else ""
            cells.append(f"{mean:.1f}%{spread}")
        each = " / ".join(f"{entry['composite']:.1f}" for _, entry in sorted(seeds.items()))
        ratios = [e["update_ratio"] for e in seeds.values() if e.get("update_ratio") is not None]
        ratio = f"{statistics.mean(ratios):.3f}" if ratios else "-"
        times = [e["train_seconds"] for e in seeds.values() if "train_seconds" in e]
        seconds = f"{statistics.mean(times):.0f}" if times else "-"
        label = name
        if name.startswith("mix_lora") and name not in curves:
            label += " (picked)" if name == picked else " (not picked: higher held-out loss)"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {each} | {ratio} | {seconds} |")
    return "\n".join(lines)


def main() -> None:
    """Command line: write --out and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, choices=sorted(GRADERS))
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--figure", type=Path, help="where the data curve goes (when measured)")
    args = parser.parse_args()
    methods = gather(args.run, args.task)
    picked = pick_by_held_out_loss(methods, "mix_lora")
    auto = auto_pick(methods)
    record = {
        "task": args.task,
        "mix_lora_picked_by_held_out_loss": picked,
        "auto_pick_by_held_out_loss": auto,
        "curve": {m: {str(f): v for f, v in fs.items()} for m, fs in curve(methods).items()},
        "methods": methods,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{args.task} (accuracy %, mean over seeds (min-max); composite per seed):")
    print(table(methods, args.task, picked))
    print(f"mix_lora's learning rate, picked by held-out loss: {picked}")
    points = curve(methods)
    if points and args.figure is not None:
        draw_curve(points, args.task, args.figure)
        print(f"the data curve: {args.figure}")
    for seed, run in auto.items():
        print(
            f"seed {seed}: the lowest held-out loss picks {run['pick']} (composite "
            f"{run['pick_composite']:.1f}); the test's best: {', '.join(run['best'])} "
            f"({run['best_composite']:.1f})"
        )


if __name__ == "__main__":
    main()
