"""`axolotl cat ...`: the `axolotl-cat` commands inside Axolotl's own CLI.

Registered through Axolotl's `axolotl.cli_commands` entry-point group (pyproject.toml), which
Axolotl resolves lazily; the arguments go untouched to `axolotl-cat`'s parser, so both spell
the same commands and options.
"""

from __future__ import annotations

import click

from ..cli import main


@click.command(
    name="cat",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,  # --help goes to axolotl-cat's own parser, which knows the options
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def cat(args: tuple[str, ...]) -> None:
    """CAT (LoRA Soups): inspect, export again, or merge baselines (axolotl-cat)."""
    raise SystemExit(main(list(args), prog="axolotl cat"))
