"""GPU throughput and memory of fitting CAT vs training a LoRA vs the frozen-base floor.

For a lent H100/H200 (one run, a few minutes): a ~1B-parameter Llama built from a config
(hidden 2048, intermediate 5632, 18 layers; random weights, nothing downloaded), bf16, sdpa
attention, sequence 2048, batch 4. Needs only torch, transformers, peft and this package
(`pip install --no-deps .`, or the repo on PYTHONPATH).

    python scripts/bench/gpu.py                 # writes docs/measurements/bench_gpu_<gpu>.json
    python scripts/bench/gpu.py --smoke         # tiny sizes on the CPU: checks the script runs

Configurations, each a separate model on the device, timed in interleaved rounds (medians):
- floor:        forward + backward of the frozen base with input-embedding gradients only;
- lora_kK:      one standard PEFT LoRA of rank K x r (= CAT over K skills' concatenated
                rank R), trained: the yardstick at K = 2, 8, 32;
- cat_kK:       CAT over K skills of rank r (K = 2, 8, 32; r = 16), training the
                coefficients through the fused Function (core/layers/fused.py);
- cat_kK_core:  the same with `granularity: core` (an R x R core per module);
- cat_k2_unfused: CAT K=2 through the previous path (`CatLinearVariant.fused = False`).
One step = forward + backward + AdamW (floor: no optimizer).

The JSON holds the ratios (cat_over_floor, cat_kK_over_lora_same_rank and
core_kK_over_lora_same_rank for K = 2, 8, 32, cat_k32_over_k2, peak_cat_over_floor,
peak_cat_over_lora and the fused/unfused comparison) with the goals of issue 22 and whether
each is met, the medians and every step time, the peaks, and a torch.profiler table (top
kernels by device time; CPU time with --smoke) of one step of floor, lora_k2, cat_k2,
cat_k2_core and cat_k2_unfused.

Peak memory of a configuration: what that model owns when its step starts (parameters,
buffers, gradients, optimizer state) plus the largest growth during the step, so the other
models resident on the device do not count.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from axolotl_cat_plugin import CatConfig, attach_cat
from axolotl_cat_plugin.core.layers.linear import CatLinearVariant

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COUNTS = (2, 8, 32)  # K, skills composed
NAMES = [
    "floor",
    *(f"lora_k{k}" for k in COUNTS),
    *(f"cat_k{k}" for k in COUNTS),
    *(f"cat_k{k}_core" for k in COUNTS),
    "cat_k2_unfused",
]
PROFILED = ["floor", "lora_k2", "cat_k2", "cat_k2_core", "cat_k2_unfused"]
GOALS = {  # issue 22, on a GPU: name -> (limit, "<=" or ">=")
    "cat_over_floor": (1.15, "<="),
    **{f"cat_k{k}_over_lora_same_rank": (0.85, "<=") for k in COUNTS},
    "peak_cat_over_floor": (1.05, "<="),
}
SMOKE = dict(hidden=64, intermediate=160, layers=2, head_dim=16, seq=32, batch=2, rounds=1, steps=1)
REPO = Path(__file__).resolve().parents[2]


def llama_config(args) -> LlamaConfig:
    heads = args.hidden // args.head_dim
    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
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
    kv = config.num_key_value_heads * args.head_dim
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
    count = int(re.match(r"(?:lora|cat)_k(\d+)", name).group(1))
    if name.startswith("lora"):
        rank = count * args.rank  # the concatenated rank of CAT over `count` skills
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS)
        model = get_peft_model(model, config)
    else:
        granularity = "core" if name.endswith("_core") else "module"
        model = attach_cat(model, CatConfig(skills=skills[:count], granularity=granularity))
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, trainable


class Config:
    """One configuration: its model, optimizer, and whether CAT takes the fused path."""

    def __init__(self, name, args, device, skills):
        self.name = name
        self.model, self.trainable = build(name, args, device, skills)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4) if self.trainable else None
        self.fused = not name.endswith("_unfused")

    def owned_bytes(self) -> int:
        tensors = {id(t): t for t in self.model.parameters()}
        tensors.update({id(t): t for t in self.model.buffers()})
        tensors.update({id(p.grad): p.grad for p in self.model.parameters() if p.grad is not None})
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                tensors.update({id(t): t for t in state.values() if torch.is_tensor(t)})
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def steps(self, args, device, count: int) -> list[float]:
        CatLinearVariant.fused = self.fused
        embed = self.model.get_input_embeddings()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        times = []
        for _ in range(count):
            ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
            sync()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                embeds = embed(ids).detach().requires_grad_(not self.trainable)
                loss = self.model(inputs_embeds=embeds, labels=ids).loss
            loss.backward()
            if self.optimizer is not None:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - start)
        return times


def profile_table(config: Config, args, device) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        sort = "self_device_time_total"  # the kernels' own GPU time
    with profile(activities=activities) as prof:
        config.steps(args, device, 1)
    return prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows)


def default_out(device_name: str, smoke: bool) -> Path:
    if smoke:
        return Path("bench_gpu_smoke.json")
    slug = next(
        (tag for tag in ("h200", "h100", "a100", "l40s", "a10g") if tag in device_name.lower()),
        re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_"),
    )
    return REPO / "docs" / "measurements" / f"bench_gpu_{slug}.json"


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "MISSED")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16, help="rank r of every skill")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--out", help="default: docs/measurements/bench_gpu_<gpu>.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes on the CPU: only checks the script runs"
    )
    args = parser.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.vocab, args.rank, args.device = 256, 4, "cpu"
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    memory = torch.cuda if on_gpu else None
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    out = Path(args.out) if args.out else default_out(device_name, args.smoke)
    began = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        skills = save_skills(args, Path(tmp), 32)
        configs = {}
        for name in NAMES:
            configs[name] = Config(name, args, device, skills)
            configs[name].steps(args, device, 2)  # warm-up (and the optimizer's state)
            print(f"built and warmed up {name} ({time.perf_counter() - began:.0f} s)", flush=True)
    params = sum(p.numel() for p in configs["floor"].model.parameters())

    times = {name: [] for name in NAMES}
    for round_index in range(args.rounds):  # interleaved, rotating: drift hits every config
        shift = round_index % len(NAMES)
        for name in NAMES[shift:] + NAMES[:shift]:
            times[name] += configs[name].steps(args, device, args.steps)

    peaks = {}
    for name in NAMES:
        config = configs[name]
        if memory is not None:
            memory.synchronize()
            before = memory.memory_allocated()
            memory.reset_peak_memory_stats()
            owned = config.owned_bytes()
        config.steps(args, device, 1)
        if memory is not None:
            peaks[name] = (owned + memory.max_memory_allocated() - before) / 2**30
        else:
            peaks[name] = None

    profiles = {name: profile_table(configs[name], args, device) for name in PROFILED}
    CatLinearVariant.fused = True

    tokens = args.batch * args.seq
    medians = {name: statistics.median(values) for name, values in times.items()}

    def peak_ratio(a, b):
        return peaks[a] / peaks[b] if peaks[a] is not None and peaks[b] else None

    ratios = {
        "cat_over_floor": medians["cat_k2"] / medians["floor"],
        "cat_k32_over_k2": medians["cat_k32"] / medians["cat_k2"],
        "cat_k8_over_k2": medians["cat_k8"] / medians["cat_k2"],
        **{
            f"{kind}_k{k}_over_lora_same_rank": medians[f"cat_k{k}{suffix}"] / medians[f"lora_k{k}"]
            for k in COUNTS
            for kind, suffix in (("cat", ""), ("core", "_core"))
        },
        **{f"core_k{k}_over_floor": medians[f"cat_k{k}_core"] / medians["floor"] for k in COUNTS},
        "peak_cat_over_floor": peak_ratio("cat_k2", "floor"),
        "peak_cat_over_lora": peak_ratio("cat_k2", "lora_k2"),
        **{
            f"peak_cat_k{k}_over_lora_same_rank": peak_ratio(f"cat_k{k}", f"lora_k{k}")
            for k in COUNTS
        },
        "peak_core_over_floor": peak_ratio("cat_k2_core", "floor"),
        "unfused_cat_over_floor": medians["cat_k2_unfused"] / medians["floor"],
        "fused_over_unfused_k2": medians["cat_k2"] / medians["cat_k2_unfused"],
    }
    goals = {}
    for key, (limit, op) in GOALS.items():
        value = ratios[key]
        met = None if value is None else (value <= limit if op == "<=" else value >= limit)
        goals[key] = {"goal": f"{op} {limit}", "met": met}
    result = {
        **ratios,
        "goals": goals,
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name,
        "smoke": args.smoke,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
        "model_parameters": params,
        "shape": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "skills": {
            "rank": args.rank,
            "counts": list(COUNTS),
            "lora_ranks": {f"lora_k{k}": k * args.rank for k in COUNTS},
        },
        "median_step_seconds": medians,
        "step_seconds": times,
        "tokens_per_second": {name: tokens / m for name, m in medians.items()},
        "peak_gib": peaks,
        "profiles": profiles,
        "wall_s": time.perf_counter() - began,
    }
    print(f"{device_name}, {params / 1e6:.1f}M parameters, bf16, sdpa, seq {args.seq}")
    print(f"{'config':<15} {'step s':>8} {'tokens/s':>10} {'peak GiB':>9}")
    for name in NAMES:
        peak = f"{peaks[name]:>9.2f}" if peaks[name] is not None else f"{'-':>9}"
        print(f"{name:<15} {medians[name]:>8.4f} {tokens / medians[name]:>10.0f} {peak}")
    for key, value in ratios.items():
        goal = goals.get(key)
        verdict = "" if goal is None else f"  (goal {goal['goal']}: {_verdict(goal['met'])})"
        print((f"{key}: {value:.3f}" if value is not None else f"{key}: -") + verdict)
    for name, table in profiles.items():
        print(f"\n--- profile of one {name} step ---\n{table}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
