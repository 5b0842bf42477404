"""Fit CAT without Axolotl: TRL's SFTTrainer on the coefficients, then one standard adapter.

    python scripts/examples/fit_cat_trl.py --base meta-llama/Llama-3.1-8B \\
        --skill math=./skills/math --skill code=./skills/code \\
        --data mix.jsonl --out out/cat --steps 200 --lr 1e-3

--data is a local JSON-lines file with a "text" field. Everything CAT-specific is three calls:
attach_cat (frozen skills + trainable fp32 coefficients), any trainer, export_cat.
"""

import argparse
import logging
import tempfile

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from axolotl_cat_plugin import CatConfig, attach_cat, export_cat
from axolotl_cat_plugin.core import cat_metadata


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="base model (Hub id or folder)")
    parser.add_argument("--skill", action="append", required=True, help="PATH or NAME=PATH")
    parser.add_argument("--data", required=True, help='JSON-lines file with a "text" field')
    parser.add_argument("--out", required=True, help="where the adapter is written")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the coefficients")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--granularity", default="module")
    parser.add_argument("--parametrization", default="free")
    quantize = parser.add_mutually_exclusive_group()
    quantize.add_argument(
        "--load-in-4bit", action="store_true", help="quantize the base with bitsandbytes (nf4)"
    )
    quantize.add_argument(
        "--load-in-8bit", action="store_true", help="quantize the base with bitsandbytes (int8)"
    )
    return parser.parse_args()


def skill(entry: str):
    name, sep, path = entry.partition("=")
    return {"path": path, "name": name} if sep and name and "/" not in name else entry


def quantized(args) -> dict:
    """from_pretrained options for a bitsandbytes base (QLoRA style); {} for full precision."""
    if not (args.load_in_4bit or args.load_in_8bit):
        return {}
    from transformers import BitsAndBytesConfig

    if args.load_in_4bit:
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {
        "quantization_config": config,
        "device_map": {"": 0} if torch.cuda.is_available() else "cpu",
    }


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the library's progress lines
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32, **quantized(args))
    model = attach_cat(
        base,
        CatConfig(
            skills=[skill(entry) for entry in args.skill],
            granularity=args.granularity,
            parametrization=args.parametrization,
        ),
    )  # only the CAT coefficients have requires_grad

    with tempfile.TemporaryDirectory() as scratch:  # the trainer saves nothing we keep
        trainer = SFTTrainer(
            model=model,
            processing_class=AutoTokenizer.from_pretrained(args.base),
            train_dataset=load_dataset("json", data_files=args.data, split="train"),
            args=SFTConfig(
                output_dir=scratch,
                max_steps=args.steps,
                learning_rate=args.lr,
                per_device_train_batch_size=args.batch_size,
                logging_steps=max(1, args.steps // 10),
                save_strategy="no",
                report_to="none",
                # mixed precision only where the GPU has it; the coefficients stay fp32
                bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
            ),
        )
        trainer.train()

    # what the model card says about the fit
    cat_metadata(model).extra["training"] = {
        "datasets": [{"path": args.data, "type": "text"}],
        "steps": trainer.state.global_step,
        "learning_rate": args.lr,
        "trainer": "trl.SFTTrainer",
    }
    export_cat(model, args.out)


if __name__ == "__main__":
    main()
