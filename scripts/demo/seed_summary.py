"""One table over several demo runs (one results.json per seed): mean and range per accuracy.

    python scripts/demo/seed_summary.py demo_out/results.json demo_out/seed-*/results.json \
        --out demo_out/seeds.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from eval_composition import TESTS


def spread(values: list[float]) -> dict:
    return {"mean": mean(values), "min": min(values), "max": max(values), "values": values}


def summarize(runs: list[dict]) -> dict:
    """{method: {test: spread over runs}} for the methods every run has, with the training
    seconds' spread too where every run recorded them."""
    methods = [m for m in runs[0] if all(m in run for run in runs)]
    summary = {m: {t: spread([run[m][t] for run in runs]) for t in TESTS} for m in methods}
    for m in methods:
        seconds = [run[m].get("train_seconds") for run in runs]
        if all(isinstance(value, (int, float)) for value in seconds):
            summary[m]["train_seconds"] = spread(seconds)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json of each seed")
    parser.add_argument("--out", type=Path, default=Path("demo_out/seeds.json"))
    args = parser.parse_args()
    summary = summarize([json.loads(path.read_text()) for path in args.results])
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{len(args.results)} runs: mean accuracy (min-max)")
    width = max(14, *(len(method) + 2 for method in summary))
    print(f"{'method':<{width}}" + "".join(f"{test:>24}" for test in TESTS) + f"{'train s':>10}")
    for method, cells in summary.items():
        row = "".join(
            f"{100 * c['mean']:.1f}% ({100 * c['min']:.1f}-{100 * c['max']:.1f})".rjust(24)
            for c in (cells[test] for test in TESTS)
        )
        seconds = cells.get("train_seconds")
        train = f"{seconds['mean']:.0f}" if seconds else "-"
        print(f"{method:<{width}}{row}{train:>10}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
