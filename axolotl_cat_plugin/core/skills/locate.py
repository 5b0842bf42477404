"""Where a skill's files are: a local adapter folder, or a Hub repo downloaded to the cache.

Raises CatError naming the skill and the path for a missing folder, a file given instead of a
folder, a folder without adapter files, and a Hub id that cannot be downloaded (saying
whether HF_HUB_OFFLINE is why).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..config import SkillSpec
from ..errors import CatError
from ..format import BIN_WEIGHTS_FILE, CONFIG_FILE, WEIGHTS_FILE

_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def is_hub_id(path: str) -> bool:
    """Whether `path` names a Hub repo (org/name or name) rather than a local folder."""
    looks_local = path.startswith((".", "/", "~")) or not _REPO_ID.match(path)
    return not looks_local and not Path(path).expanduser().exists()


def locate(spec: SkillSpec) -> tuple[Path, Path]:
    """The local folder holding the skill and its weights file, fetched from the Hub if need be."""
    folder = Path(spec.path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise CatError(f"skill {spec.name!r}: {spec.path} is a file; give the adapter's folder")
        if not (folder / CONFIG_FILE).is_file():
            raise CatError(
                f"skill {spec.name!r}: no {CONFIG_FILE} in {folder}; is this a PEFT adapter folder?"
            )
        for weights_name in (WEIGHTS_FILE, BIN_WEIGHTS_FILE):
            if (folder / weights_name).is_file():
                return folder, folder / weights_name
        raise CatError(
            f"skill {spec.name!r}: {folder} has {CONFIG_FILE} but no {WEIGHTS_FILE} or "
            f"{BIN_WEIGHTS_FILE}"
        )
    if not is_hub_id(spec.path):
        raise CatError(f"skill {spec.name!r}: path {spec.path} does not exist")
    return download(spec)


def download(spec: SkillSpec) -> tuple[Path, Path]:
    """(folder, weights file) of a Hub skill in the local cache, fetched (at spec.revision)
    with huggingface_hub; safetensors first, then PEFT's older .bin."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(spec.path, filename, revision=spec.revision))

    where = f"Hub repo {spec.path!r}" + (f" at revision {spec.revision!r}" if spec.revision else "")
    try:
        config_file = fetch(CONFIG_FILE)
        try:
            weights_file = fetch(WEIGHTS_FILE)
        except EntryNotFoundError:
            weights_file = fetch(BIN_WEIGHTS_FILE)
    except Exception as error:  # noqa: BLE001 - every Hub failure becomes one clear message
        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set (offline mode) and it is not in the local Hub cache"
        else:
            why = "offline, gated, private or misspelled?"
        raise CatError(
            f"skill {spec.name!r}: no local folder {spec.path!r}, and could not download it "
            f"from the {where}: {why} ({type(error).__name__}: {error})"
        ) from error
    return config_file.parent, weights_file
