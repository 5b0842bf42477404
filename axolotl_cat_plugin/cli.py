"""`axolotl-cat`: inspect a CAT export, export a finished fit again, or build merge baselines.

    axolotl-cat inspect OUT_DIR
    axolotl-cat export RUN_DIR [--rank K] [--prune-threshold T] --out DIR [--base BASE]
    axolotl-cat merge --method concat --weights 0.6 0.4 --base BASE --out DIR math=./a code=./b
    axolotl-cat self-mix --base BASE --out DIR [--pool N --keep K ...] math=./a code=./b
    axolotl-cat base-from-gguf MODEL.gguf --out DIR

Only argument parsing and terminal output live here; the work is done by the core.
Errors a user can fix print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .core.errors import CatError

LOGGER = "axolotl_cat_plugin"


def build_parser(prog: str = "axolotl-cat") -> argparse.ArgumentParser:
    """The argparse parser of `axolotl-cat` (inspect, export, merge, self-mix,
    base-from-gguf)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Inspect, re-export or statically merge CAT (LoRA Soups) adapters.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect", help="show the skills and coefficients of an export folder"
    )
    inspect.add_argument(
        "out_dir", metavar="OUT_DIR", help="a folder holding cat_coefficients.json"
    )

    export = commands.add_parser(
        "export",
        help="export a finished fit again (SVD-compressed, pruned), without retraining",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="the fit's export folder")
    export.add_argument("--rank", type=int, help="compress every module to this rank (SVD)")
    export.add_argument(
        "--prune-threshold",
        type=float,
        help="drop a skill's block from a module where |coefficient| is below this",
    )
    export.add_argument("--out", required=True, help="where to write (may be RUN_DIR)")
    export.add_argument("--base", help="the base model (default: the one the record names)")

    from .core.merge.methods import METHODS  # torch-free: the registry's own words

    merge = commands.add_parser(
        "merge",
        help="merge skill LoRAs with fixed weights through PEFT (baselines for CAT)",
        description="Static merges through PEFT's add_weighted_adapter. Give the skills "
        "last, after --out (or after --), as PATH or NAME=PATH. The output folder holds the "
        "adapter and merge_record.json (the method, what it computes, the weights, and how far "
        "the result is from the weighted sum of the skills' updates).",
        epilog="what each --method computes (v_i = w_i s_i, s_i the skill's scaling):\n"
        + "\n".join(f"  {name}: {method.computes}" for name, method in METHODS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument(
        "--method",
        required=True,
        help=f"one of {', '.join(METHODS)} (see below); only concat is exactly the weighted "
        "sum of the skills' updates; `concat` was called `cat` before 0.2",
    )
    merge.add_argument(
        "--weights", required=True, type=float, nargs="+", help="one weight per skill"
    )
    merge.add_argument("--density", type=float, help="fraction of entries kept (ties, dare)")
    merge.add_argument("--seed", type=int, default=0, help="dare's random drop")
    merge.add_argument("--base", required=True, help="the base model the skills were trained on")
    merge.add_argument("--out", required=True, help="where to write the merged adapter")
    merge.add_argument("skills", nargs="+", metavar="SKILL", help="PATH or NAME=PATH")
    _add_self_mix(commands)
    _add_base_from_gguf(commands)
    return parser


def _add_base_from_gguf(commands) -> None:
    gguf = commands.add_parser(
        "base-from-gguf",
        help="write a base model folder from a GGUF file (its weights de-quantized, fp32)",
        description="For a base published only as GGUF: transformers de-quantizes it (needs "
        "`pip install gguf`) and the weights, tokenizer and chat template are written as a "
        "model folder to train skills, fit CAT and load the export on.",
    )
    gguf.add_argument("gguf_file", metavar="GGUF", help="a .gguf file (Llama, Qwen2, ...)")
    gguf.add_argument("--out", required=True, help="the model folder to write")


def _add_self_mix(commands) -> None:
    # no defaults here: what is not given takes core.fit.self_mix.SelfMixOptions' (imports torch)
    mix = commands.add_parser(
        "self-mix",
        help="write a fitting mix from the skills themselves (no skill data), as JSONL",
        description="Sample a pool per skill from base + that skill alone, keep the samples "
        "where the skill departs most from the base (mean KL(skill || base) per token), and "
        "write them as a JSONL dataset with a `skill` column (cat_merge.self_mix does the same "
        "inside `axolotl train`). Give the skills last, as PATH or NAME=PATH.",
    )
    mix.add_argument("--base", required=True, help="the base model the skills were trained on")
    mix.add_argument("--out", required=True, help="the folder the JSONL goes to")
    mix.add_argument("--prompt", action="append", help="a prompt (repeat; default: shipped)")
    mix.add_argument("--prompts-file", help="a text file, one prompt per line")
    mix.add_argument("--pool", type=int, help="samples drawn per skill")
    mix.add_argument("--keep", type=int, help="samples kept per skill")
    mix.add_argument("--max-new-tokens", type=int, help="length of a sample")
    mix.add_argument("--temperature", type=float, help="sampling temperature")
    mix.add_argument("--top-p", type=float, help="nucleus sampling")
    mix.add_argument("--seed", type=int, help="the sampling's seed")
    mix.add_argument("--batch-size", type=int, help="prompts per generate call")
    mix.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the chat template (default: when the tokenizer has one)",
    )
    mix.add_argument("skills", nargs="+", metavar="SKILL", help="PATH or NAME=PATH")


def main(argv: list[str] | None = None, *, prog: str = "axolotl-cat") -> int:
    """Run one command; returns the exit status (2 for a CatError or OSError, printed as
    one line on stderr)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command == "merge":  # checked here: the method registry imports torch and peft
        from .core.merge.methods import METHODS, RENAMED_METHODS

        if args.method not in METHODS and args.method not in RENAMED_METHODS:
            parser.error(
                f"argument --method: invalid choice: {args.method!r} "
                f"(choose from {', '.join(sorted(METHODS))})"
            )
    _show_library_logs()
    try:
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "export":
            return _export(args)
        if args.command == "self-mix":
            return _self_mix(args)
        if args.command == "base-from-gguf":
            return _base_from_gguf(args)
        return _merge(args)
    except (CatError, OSError) as error:
        message = " ".join(str(error).split())  # one line, whatever the message holds
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


def _inspect(args) -> int:
    from rich.console import Console

    from .report import show_export

    show_export(args.out_dir, Console())
    return 0


def _export(args) -> int:
    from .core.reexport import reexport

    written = reexport(
        args.run_dir,
        args.out,
        rank=args.rank,
        prune_threshold=args.prune_threshold,
        base_model=args.base,
        option_names=("--rank", "--prune-threshold"),
    )
    print(f"wrote {written}")
    return 0


def _base_from_gguf(args) -> int:
    from .core.gguf_base import base_folder_from_gguf

    print(f"wrote {base_folder_from_gguf(args.gguf_file, args.out)}")
    return 0


def _merge(args) -> int:
    skills = [_skill(entry) for entry in args.skills]
    _refuse_duplicate_names(skills)  # before the base loads; in the CLI's words, not the YAML's
    from .core.merge.run import merge_skills

    written = merge_skills(
        _load_base(args.base),
        skills,
        args.weights,
        args.out,
        method=args.method,
        density=args.density,
        seed=args.seed,
    )
    print(f"wrote {written}")
    return 0


def _self_mix(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from .core import CatConfig, attach_cat
    from .core.fit.self_mix import SelfMixOptions, build_self_mix

    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as lines:
            prompts += [line.rstrip("\n") for line in lines if line.strip()]
    given = {
        key: getattr(args, key)
        for key in ("pool", "keep", "max_new_tokens", "temperature", "top_p", "seed", "batch_size")
        if getattr(args, key) is not None
    }
    options = SelfMixOptions(prompts=prompts or None, chat=args.chat, **given)
    options.check()  # before loading anything
    model = _load_base(args.base)
    if torch.cuda.is_available():
        model = model.cuda()
    skills = [_skill(entry) for entry in args.skills]
    cat = attach_cat(model, CatConfig(skills=skills))
    written = build_self_mix(cat, AutoTokenizer.from_pretrained(args.base), args.out, options)
    print(f"wrote {written}")
    return 0


def _load_base(base: str):
    import torch
    from transformers import AutoModelForCausalLM

    # fp32 on the CPU: merges are exact there, whatever dtype the base was saved in
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def _refuse_duplicate_names(skills: list) -> None:
    from .core.config import default_skill_name

    names = [s["name"] if isinstance(s, dict) else default_skill_name(s) for s in skills]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise CatError(
            f"SKILL arguments: two skills are named {duplicates[0]!r} (a folder's name is the "
            "skill's name); give each a distinct name as NAME=PATH"
        )


def _skill(entry: str) -> str | dict:
    """NAME=PATH, or a PATH whose folder (or repo) name becomes the skill's name."""
    name, sep, path = entry.partition("=")
    if sep and name and "/" not in name:
        return {"path": path, "name": name}
    return entry


def _show_library_logs() -> None:
    """Our INFO lines (what was read, written, refused) on stderr, once per process."""
    logger = logging.getLogger(LOGGER)
    if any(getattr(handler, "_axolotl_cat", False) for handler in logger.handlers):
        return
    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False)
    handler._axolotl_cat = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
