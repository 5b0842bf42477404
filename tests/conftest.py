import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from fixtures import build_world, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny Llama base and three skill LoRAs of different ranks, alphas and targets."""
    return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="session")
def e2e_world(world, tmp_path_factory):
    """The world plus the small data mix the end-to-end runs fit coefficients on."""
    rows = [{"text": f"Q: {a} + {b}? A: {a} + {b} = {a + b}"} for a in range(8) for b in range(4)]
    return {**world, "mix": write_jsonl(tmp_path_factory.mktemp("data") / "mix.jsonl", rows)}
