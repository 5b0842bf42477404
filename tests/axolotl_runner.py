"""Run the axolotl CLI as a user would, on the tiny world, with the example YAML."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "example_yamls" / "tiny-cpu" / "cat.yml"


def axolotl_command(*args: str) -> tuple[list[str], dict]:
    """The command and environment: this venv's bin on PATH (axolotl launches accelerate).
    Without the `axolotl` console script (axolotl carried as wheels unpacked onto the path, as
    on a lent GPU machine), `python -m axolotl.cli.main`."""
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ["PATH"],
        "HF_HUB_OFFLINE": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
    }
    script = os.path.join(bin_dir, "axolotl")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "axolotl.cli.main"]
    return [*command, *args], env


def axolotl(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the axolotl CLI as a user would, with this venv's bin on PATH (for accelerate)."""
    command, base_env = axolotl_command(*args)
    env = {**base_env, **(env or {})}
    result = subprocess.run(
        command,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        print(result.stdout[-6000:], result.stderr[-6000:], sep="\n")
    return result


def axolotl_torchrun(config: Path, processes: int, *, cwd: Path, env: dict | None = None):
    """`axolotl train CONFIG --launcher torchrun -- --nproc_per_node N`."""
    launch = ["--launcher", "torchrun", "--", "--nproc_per_node", str(processes)]
    return axolotl("train", str(config), *launch, cwd=cwd, env=env)


def write_config(world, folder: Path, **overrides) -> Path:
    """The example YAML pointed at this test's world, with overrides."""
    config = yaml.safe_load(EXAMPLE.read_text())
    config["base_model"] = str(world["base"])
    config["cat_merge"]["skills"] = [
        {"path": str(world["skills"]["math"]), "name": "math"},
        {"path": str(world["skills"]["code"]), "name": "code"},
        str(world["skills"]["prose"]),
    ]
    config["datasets"][0]["path"] = str(world["mix"])
    config["dataset_prepared_path"] = str(folder / "prepared")
    config["output_dir"] = str(folder / "out")
    for key, value in overrides.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path
