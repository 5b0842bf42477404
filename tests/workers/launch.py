"""Start a worker of this folder as the tests do, wait for it, read what its ranks wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).resolve().parent


def launch(
    worker: str,
    world: dict,
    out: Path,
    *,
    processes: int,
    args: list | tuple = (),
    env: dict | None = None,
) -> subprocess.Popen:
    """Start WORKERS/worker on the test world: under torchrun with `processes` ranks, or as
    one plain process (0) with no process group; `args` follow --base, --skills and --out."""
    launcher = [sys.executable]
    if processes:
        launcher += ["-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc_per_node", str(processes)]
    skills = [str(world["skills"][name]) for name in ("math", "code", "prose")]
    command = [*launcher, str(WORKERS / worker), "--base", str(world["base"]), "--skills", *skills]
    command += ["--out", str(out), *map(str, args)]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # torchrun's default for its ranks; the same for the reference
        **(env or {}),
    }
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a timeout ends torchrun's ranks too
    )


def finish(process: subprocess.Popen, timeout: float, name: str = "") -> str:
    """Wait for a launched worker; its stdout, after asserting it exited 0."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, f"{name}:\n{stdout[-4000:]}{stderr[-6000:]}"
    return stdout


def two_ranks_and_one(
    worker: str, world: dict, root: Path, *, steps: int, timeout: float, env: dict | None = None
) -> dict[str, str]:
    """The worker under torchrun with two ranks of batch 2 (root/two) and as one plain process
    of batch 4 (root/one), side by side (they spend most of their time importing): the same
    global batches at every step. Their stdout by name."""
    processes = {
        name: launch(
            worker,
            world,
            root / name,
            processes=count,
            args=["--steps", steps, "--per-device-batch", batch],
            env=env,
        )
        for name, count, batch in (("two", 2, 2), ("one", 0, 4))
    }
    return {name: finish(process, timeout, name=name) for name, process in processes.items()}


def ranks(out: Path) -> list[dict]:
    """The rank{R}.json records a worker's ranks wrote into `out`, rank 0 first."""
    return [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
