"""GPU throughput and memory of fitting CAT vs training a LoRA vs the frozen-base floor.

For a lent H100: a ~1B-parameter Llama built from a config (random weights, nothing
downloaded), bf16, sdpa attention (flash backend), sequence 2048. Needs only torch,
transformers, peft and this package (`pip install --no-deps .`).

    python scripts/bench_gpu.py --out bench_gpu.json

Configurations, each a separate model on the GPU, timed in interleaved rounds (medians):
- floor: forward + backward of the frozen base with input-embedding gradients only;
- lora:  one standard PEFT LoRA of rank K*r (K=2, r=8) being trained;
- cat K: CAT over K skills of rank r (K = 2, 4, 8), training the coefficients.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from axolotl_cat_plugin import CatConfig, attach_cat

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(args) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=max(1, args.hidden // 512),
        max_position_embeddings=args.seq,
        attn_implementation="sdpa",
    )


def base_model(args, device) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(args)).to(torch.bfloat16)
    model.requires_grad_(False)
    return model


def save_skills(args, folder: Path, count: int) -> list[str]:
    """Skill LoRAs with random non-zero factors, written as ordinary PEFT adapter folders."""
    config = llama_config(args)
    kv = config.num_key_value_heads * (args.hidden // config.num_attention_heads)
    shapes = {  # module -> (d_in, d_out)
        "self_attn.q_proj": (args.hidden, args.hidden),
        "self_attn.k_proj": (args.hidden, kv),
        "self_attn.v_proj": (args.hidden, kv),
        "self_attn.o_proj": (args.hidden, args.hidden),
        "mlp.gate_proj": (args.hidden, args.intermediate),
        "mlp.up_proj": (args.hidden, args.intermediate),
        "mlp.down_proj": (args.intermediate, args.hidden),
    }
    paths = []
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(args.layers):
            for module, (d_in, d_out) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.{module}"
                tensors[f"{key}.lora_A.weight"] = (
                    torch.randn(args.rank, d_in, generator=generator) * 0.01
                )
                tensors[f"{key}.lora_B.weight"] = (
                    torch.randn(d_out, args.rank, generator=generator) * 0.01
                )
        skill = folder / f"skill{i}"
        LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS).save_pretrained(
            skill
        )
        save_file(tensors, str(skill / "adapter_model.safetensors"))
        paths.append(str(skill))
    return paths


def build(name: str, args, device, skills: list[str]):
    model = base_model(args, device)
    if name == "floor":
        return model, []
    if name == "lora":
        rank = 2 * args.rank
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS)
        model = get_peft_model(model, config)
    else:
        count = int(name.split("k")[1])
        model = attach_cat(model, CatConfig(adapters=skills[:count]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, trainable


def step_seconds(model, trainable, optimizer, args, device, steps: int) -> list[float]:
    embed = model.get_input_embeddings()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, 32000, (args.batch, args.seq), device=device)
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            embeds = embed(ids).detach().requires_grad_(not trainable)
            loss = model(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="bench_gpu.json")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test with tiny sizes")
    args = parser.parse_args()
    device = torch.device(args.device)
    memory = torch.cuda if device.type == "cuda" else None
    names = ["floor", "lora", "cat_k2", "cat_k4", "cat_k8"]

    with tempfile.TemporaryDirectory() as tmp:
        skills = save_skills(args, Path(tmp), 8)
        models = {}
        for name in names:
            model, trainable = build(name, args, device, skills)
            optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
            step_seconds(model, trainable, optimizer, args, device, 2)  # warm-up
            models[name] = (model, trainable, optimizer)
        params = sum(p.numel() for p in models["floor"][0].parameters())

        times = {name: [] for name in names}
        for _ in range(args.rounds):  # interleaved rounds: drift hits every configuration
            for name in names:
                times[name] += step_seconds(*models[name], args, device, args.steps)

        peaks = {}
        for name in names:
            if memory is not None:
                memory.reset_peak_memory_stats()
            step_seconds(*models[name], args, device, 1)
            peaks[name] = memory.max_memory_allocated() / 2**30 if memory else float("nan")

    tokens = args.batch * args.seq
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "device": torch.cuda.get_device_name() if memory else "cpu",
        "versions": {"torch": torch.__version__},
        "model_parameters": params,
        "shape": vars(args),
        "median_step_seconds": medians,
        "tokens_per_second": {name: tokens / m for name, m in medians.items()},
        "peak_gib": peaks,
        "cat_k2_over_floor": medians["cat_k2"] / medians["floor"],
        "cat_k2_over_lora": medians["cat_k2"] / medians["lora"],
        "cat_k8_over_k2": medians["cat_k8"] / medians["cat_k2"],
        "cat_k2_over_lora_peak": peaks["cat_k2"] / peaks["lora"],
    }
    print(f"{result['device']}, {params / 1e9:.2f}B parameters, bf16, sdpa, seq {args.seq}")
    print(f"{'config':<8} {'step s':>8} {'tokens/s':>10} {'peak GiB':>9}")
    for name in names:
        print(
            f"{name:<8} {medians[name]:>8.4f} {tokens / medians[name]:>10.0f} {peaks[name]:>9.2f}"
        )
    for key in ("cat_k2_over_floor", "cat_k2_over_lora", "cat_k8_over_k2", "cat_k2_over_lora_peak"):
        print(f"{key}: {result[key]:.3f}")
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
