"""Build the tiny CPU world the example YAMLs use: a base, three skill LoRAs and a data mix.

    python scripts/demo/tiny_world.py demo_out/tiny

Everything is made locally (character tokenizer, random tiny Llama, random skills); nothing
is downloaded. The builders are the test suite's own (tests/fixtures.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from fixtures import build_world, mix_rows, write_jsonl  # noqa: E402


def main(root: str) -> None:
    root_path = Path(root)
    build_world(root_path)
    write_jsonl(root_path / "data" / "mix.jsonl", mix_rows(32))
    print(f"tiny world ready in {root_path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo_out/tiny")
