"""CAT on a bitsandbytes 4-bit / 8-bit base (QLoRA users), on the GPU or as a CPU dry run.

    python scripts/qlora_check.py --device cuda --out /tmp/qlora      (scripts/tools/gpu_checks.sh)
    python scripts/qlora_check.py --device cpu --size tiny --out /tmp/qlora

For each of nf4 and int8: a Llama built from a config is saved, two skill LoRAs are made on
it, the base is loaded quantized by bitsandbytes on the device, attach_cat wraps it, and a few
AdamW steps run with an eval forward before each (bitsandbytes repacks 4-bit weights for CPU
inference, after which no gradient flows back; attach_cat turns that off). Checks, one line
each: every coefficient gets a gradient at every step and moves; the export reloaded by plain
PEFT on a fresh quantized base gives the CAT model's logits (fp32 compute, <= 1e-4); the
exported tensors are byte for byte those the same coefficients give on the full-precision
base. Exits 1 on any failure, 3 when bitsandbytes is not installed.
"""

import argparse
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from axolotl_cat_plugin import CatConfig, attach_cat, export_cat

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=128),
    "full": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, vocab_size=8192),
}
failures = []


def check(ok: bool, what: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        failures.append(what)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="full", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("  bitsandbytes is not installed: nothing to check (carry its wheel in .whl/)")
        return 3
    from transformers import BitsAndBytesConfig

    out = Path(args.out)
    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[args.size], num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(out / "base")
    skills = []
    for seed, targets in ((1, ["q_proj", "v_proj", "down_proj"]), (2, ["q_proj", "up_proj"])):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        peft_model = get_peft_model(model, lora)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn_like(param) * 0.05)
        peft_model.save_pretrained(out / f"skill{seed}")
        skills.append(str(out / f"skill{seed}"))

    device_map = {"": 0} if args.device == "cuda" else "cpu"
    ids = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    for mode, quantization in (
        ("nf4", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
        ("int8", dict(load_in_8bit=True)),
    ):
        print(f"[qlora] {mode}", flush=True)

        options = {**quantization}
        if mode == "nf4":
            options["bnb_4bit_compute_dtype"] = torch.float32

        def load(options=options):
            return AutoModelForCausalLM.from_pretrained(
                out / "base",
                dtype=torch.float32,
                quantization_config=BitsAndBytesConfig(**options),
                device_map=device_map,
            )

        model = attach_cat(load(), CatConfig(adapters=skills))
        alphas = [p for n, p in model.named_parameters() if n.endswith("cat_alpha")]
        start = [a.detach().clone() for a in alphas]
        optimizer = torch.optim.AdamW(alphas, lr=0.05, weight_decay=0.0)
        every_step = True
        for _ in range(args.steps):
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)  # an evaluation between steps
            model.train()
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            every_step &= all(a.grad is not None and bool(a.grad.abs().sum() > 0) for a in alphas)
            optimizer.step()
        check(every_step, f"all {len(alphas)} coefficients get a gradient at every step")
        moved = all(bool((a - s).abs().max() > 0) for a, s in zip(alphas, start, strict=True))
        check(moved, "every coefficient moved")

        model.eval()
        with torch.no_grad():
            cat_logits = model(input_ids=ids).logits.float()
        export_cat(model, out / f"export-{mode}")
        reloaded = PeftModel.from_pretrained(load(), out / f"export-{mode}").eval()
        from axolotl_cat_plugin.core.quantized import keep_gradients_through_4bit_layers

        keep_gradients_through_4bit_layers(reloaded)  # the same bitsandbytes kernel as CAT's
        with torch.no_grad():
            error = float((reloaded(input_ids=ids).logits.float() - cat_logits).abs().max())
        check(error <= 1e-4, f"plain PEFT on a fresh {mode} base matches (max |diff| {error:.2e})")

        full = attach_cat(
            AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32),
            CatConfig(adapters=skills),
        )
        full_alphas = [p for n, p in full.named_parameters() if n.endswith("cat_alpha")]
        with torch.no_grad():
            for mine, theirs in zip(full_alphas, alphas, strict=True):
                mine.copy_(theirs.cpu())
        export_cat(full, out / f"full-{mode}")
        ours = load_file(str(out / f"export-{mode}" / "adapter_model.safetensors"))
        theirs = load_file(str(out / f"full-{mode}" / "adapter_model.safetensors"))
        same = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        check(same, "the export equals the full-precision fit's with the same coefficients")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
