"""Pick the demo's learning rates without looking at any test.

    python scripts/demo/demo_tune.py            # after scripts/demo.sh has trained the skills

Every trained method (data mixing, the fresh LoRA on the mix, CAT per module, per rank and
core) trains once per rate of ONE shared grid, holding out 10% of its own training rows
(`val_set_size: 0.1`, evaluated after the last step); the rate with the lowest held-out loss
wins. The steps, batch, rank and init stay as in each YAML. Nothing here reads the manual,
french or composite tests. Runs go two at a time, one thread each (data mixing, the long one,
in its own lane); each run is kept under demo_out/tune/ and skipped when it already finished.
Writes demo_out/tune/tuning.json and prints the table; the chosen rates are then written into
the YAMLs by hand (docs/demo.md records the table).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

GRID = (0.002, 0.01, 0.05)
METHODS = ("data-mix", "mix-lora", "demo-cat", "demo-cat-rank", "demo-cat-core")
YAMLS = Path("example_yamls/tiny-cpu")
HERE = Path(__file__).resolve().parent
OUT = Path("demo_out/tune")
EVAL_LOSS = re.compile(r"'eval_loss': '?([0-9.eE+-]+)")


def tuning_yaml(method: str, rate: float) -> tuple[Path, Path]:
    text = (YAMLS / f"{method}.yml").read_text()
    steps = re.search(r"^max_steps: (\d+)$", text, re.M).group(1)
    name = f"{method}-lr{rate}"
    replacements = [
        (r"^learning_rate: .*$", f"learning_rate: {rate}"),
        (
            r"^val_set_size: 0$",
            f"val_set_size: 0.1\neval_strategy: steps\neval_steps: {steps}\n"
            "per_device_eval_batch_size: 32",
        ),
        (r"^output_dir: .*$", f"output_dir: {OUT / name}"),
        (r"^dataset_prepared_path: .*$", f"dataset_prepared_path: {OUT / 'prepared' / method}"),
    ]
    for pattern, replacement in replacements:
        text, count = re.subn(pattern, replacement, text, flags=re.M)
        if count != 1:
            sys.exit(f"{method}.yml: expected one line matching {pattern!r}")
    path = OUT / "yamls" / f"{name}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path, OUT / "logs" / f"{name}.log"


def run(method: str, rate: float, results: dict) -> None:
    yaml, log = tuning_yaml(method, rate)
    log.parent.mkdir(parents=True, exist_ok=True)
    losses = EVAL_LOSS.findall(log.read_text()) if log.exists() else []
    if not losses:
        # data-mix.yml and mix-lora.yml list demo_plugins.SeedLoraInit, which lives here
        path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
        print(f"[tune] {method} lr {rate} (log: {log})", flush=True)
        with log.open("w") as handle:
            subprocess.run(
                ["axolotl", "train", str(yaml)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                check=True,
            )
        losses = EVAL_LOSS.findall(log.read_text())
    if not losses:
        sys.exit(f"[tune] no eval_loss in {log}")
    results.setdefault(method, {})[str(rate)] = float(losses[-1])
    print(f"[tune] {method} lr {rate}: held-out loss {float(losses[-1]):.4f}", flush=True)


def lane(jobs, results) -> None:
    for method, rate in jobs:
        run(method, rate, results)


def main() -> None:
    results: dict = {}
    long = [("data-mix", rate) for rate in GRID]
    short = [(method, rate) for method in METHODS[1:] for rate in GRID]
    threads = [threading.Thread(target=lane, args=(jobs, results)) for jobs in (long, short)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    table = {
        method: {
            "held_out_loss": results[method],
            "chosen": min(results[method], key=results[method].get),
        }
        for method in METHODS
    }
    (OUT / "tuning.json").write_text(json.dumps({"grid": GRID, "methods": table}, indent=2) + "\n")
    print(f"\n{'method':<16}" + "".join(f"{'lr ' + str(r):>12}" for r in GRID) + "   chosen")
    for method, entry in table.items():
        cells = "".join(f"{entry['held_out_loss'][str(r)]:>12.4f}" for r in GRID)
        print(f"{method:<16}{cells}   {entry['chosen']}")
    print(f"wrote {OUT / 'tuning.json'}")


if __name__ == "__main__":
    main()
