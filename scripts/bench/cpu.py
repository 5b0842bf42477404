"""CPU benchmark of CAT training cost against its baselines, and of the export.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/cpu.py [--quick] [--out bench.json]
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/cpu.py --quick --shape smollm2 --no-export
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/cpu.py --profile cat2   # where does a step go?
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/cpu.py --paired --threads 1 --out paired.json
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/cpu.py --rank-ops      # the arithmetic limit

Every training configuration runs on the same randomly initialised Llama, fp32, with the
same `inputs_embeds` (requires_grad=True) and random labels; the adapters wrap q, k, v, o,
gate, up and down projections of every layer. `--shape` picks the model (SHAPES):
toy      hidden 512, intermediate 1408, 4 layers, 8 heads / 2 KV heads (Llama-3's 4:1 GQA),
         vocabulary 1024; batch 4 x sequence 256 (the default; the figures before issue 22);
smollm2  SmolLM2-135M's architecture: hidden 576, intermediate 1536, 30 layers, 9 heads /
         3 KV heads, vocabulary 49152, tied embeddings (random weights, nothing downloaded);
         batch 1 x sequence 256, so that a quick run fits in minutes on 2 cores.

Configurations (each one its own persistent subprocess, see "Method"; r = 8 throughout):

floor   forward + backward of the frozen base with no adapter; only the input gradient is
        asked for. Any method that trains something inside the model must backpropagate
        through the whole base, so this is the price of the cheapest possible adapter.
        Every configuration below does exactly this work plus its own.
loraR   one standard PEFT LoRA of rank R being trained (AdamW), R = 16, 64, 256 = K x r for
        K = 2, 8, 32: the yardstick. It computes the same rank-R products as CAT over K
        skills, plus the weight gradients of A and B and their optimizer step.
catK    our implementation: `attach_cat` over K skill LoRAs of rank 8 (K = 1, 2, 8, 32;
        random non-zero factors saved to disk with PEFT first), one training step =
        forward + backward + AdamW step on the coefficients. CAT's forward is one A and
        one B matmul of rank K*r per module whatever K, so cost should grow slowly with K.
        Each module runs the fused Function of core/layers/fused.py (one input gradient).
catK-core  the same with `granularity: core` (an fp32 R x R core per module), K = 2, 8, 32.
catK-unfused  the same with `CatLinearVariant.fused = False`: the previous path (the
        adapter added after PEFT's base layer, autograd summing two input gradients), for
        K = 2 and 32, side by side with the fused one in the same run.
naive8  the same math done the way PEFT's multi-adapter forward and the LoRA Soups code do
        it: K=8 separate PEFT adapters (PeftModel.from_pretrained + load_adapter, all
        activated with set_adapter), each LoRA layer's forward replaced by PEFT's own loop
        with a learnable fp32 scalar per adapter per module:
            result = base(x);  for i: result = result + B_i(A_i(x)) * (alpha_i * s_i)
        i.e. 2K small matmuls and K full-width adds per module instead of CAT's 2 matmuls.
A quick run leaves out cat1 and the unfused path.

rank-ops  not a training step: one more worker times, in the same rounds, the matmuls of a
        step alone (RankOps): the base's forward and input-gradient matmuls, CAT's four
        rank-R ones and a LoRA's two more (its weight gradients), at K = 2, 8, 32. Divided by
        the floor's step of the same round they give `rank_ops_share` (K -> share) and the
        arithmetic limits of the ratios: CAT K / floor >= 1 + share, and CAT K / LoRA of the
        same rank >= (1 + CAT's share) / (1 + LoRA's share) if nothing else differed.

Method: the parent process imports no torch. It starts one worker per configuration (the
script re-invoked with `--worker NAME`; 2 torch threads unless --threads), which builds its
model and then waits for orders on stdin, answering JSON lines. The base's weights are
written once and memory-mapped by every worker (shared pages). After every worker has warmed
up, the parent runs rounds: in each round every worker times a few steps in turn (the order
rotates from round to round), so slow drifts of the machine's load hit every configuration
alike. The ratios are paired: taken within each round, then the median over rounds; the
JSON also gives them on medians and on each configuration's fastest step. With 2 threads
on 2 cores, any other busy process stalls every OpenMP barrier: steps then take several
times longer and the ratios mean little; `--threads 1` degrades gracefully. Peak memory is
the worker's max RSS (resource.getrusage), which includes the ~0.7 GB every torch +
transformers + peft process pays and the mapped base weights; the table also gives it above
the floor's.

export  fold + write of a CAT adapter shaped like two rank-32 skills on Llama-3-8B (32
        layers x q 4096->4096, k/v 4096->1024, o 4096->4096, gate/up 4096->14336, down
        14336->4096; R = 64), in its own worker after the timed steps, without an 8B base:
        the skill files are real (random factors, PEFT's key names, adapter_config.json),
        and the base is `LlamaForCausalLM` built on the meta device whose targeted Linear
        weights are then swapped for stride-0 CPU tensors (one zero viewed at full shape:
        no memory). PEFT puts each adapter on its base layer's device, so the LoRA factors
        are real CPU tensors and the unmodified attach_cat -> fold -> write_export path
        runs; nothing reads the base weights. `export_seconds` times fold + write (with
        fsync) at full rank 64; `svd_export_seconds` the same with export rank 32 (QR + SVD
        compression). Independent of --shape; `--no-export` skips it.

The JSON (`--out`) holds the goal ratios and whether each goal (GOALS, issue 22) is met, the
rank-R shares and limits, the medians, every timed step and each round's means, peak RSS,
the machine, the library versions, the load average before and after, and how many cores
other processes kept busy while the steps were timed (from /proc/stat): on a shared
machine, read the ratios in that light.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# model shapes (--shape); batch x seq tokens per step. `toy`: the benchmark's historical model;
# `smollm2`: SmolLM2-135M's architecture (random weights), tied input/output embeddings
SHAPES = {
    "toy": dict(
        hidden=512,
        intermediate=1408,
        layers=4,
        heads=8,
        kv_heads=2,
        vocab=1024,
        tied=False,
        batch=4,
        seq=256,
    ),
    "smollm2": dict(
        hidden=576,
        intermediate=1536,
        layers=30,
        heads=9,
        kv_heads=3,
        vocab=49152,
        tied=True,
        batch=1,
        seq=256,
    ),
}
SKILL_RANK, MAX_SKILLS = 8, 32
THREADS = 2  # torch threads per worker; --threads changes it (workers read CAT_BENCH_THREADS)
# every configuration of a full run; a quick run leaves out cat1 and the unfused path
CONFIGS = [
    "floor",
    "lora16",
    "lora64",
    "lora256",
    "cat1",
    "cat2",
    "cat8",
    "cat32",
    "cat2-core",
    "cat8-core",
    "cat32-core",
    "cat2-unfused",
    "cat32-unfused",
    "naive8",
]
QUICK_CONFIGS = [name for name in CONFIGS if name != "cat1" and not name.endswith("-unfused")]
RANK_COUNTS = (2, 8, 32)  # K of the rank-R matmul timings (R = K x SKILL_RANK)
# rounds x steps timed per configuration, after `warmup` untimed steps
PLANS = {
    "full": dict(warmup=3, rounds=12, steps=3),
    "quick": dict(warmup=2, rounds=8, steps=1),
}
# Llama-3-8B: module -> (in_features, out_features)
BIG_SHAPES = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 1024),
    "self_attn.v_proj": (4096, 1024),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (4096, 14336),
    "mlp.up_proj": (4096, 14336),
    "mlp.down_proj": (14336, 4096),
}
BIG_LAYERS, BIG_SKILLS, BIG_RANK, SVD_RANK = 32, 2, 32, 32
GOALS = {  # name: (threshold, "<=" or ">="), issue 22
    "cat_over_floor": (1.08, "<="),
    "cat_k2_over_lora_same_rank": (0.95, "<="),
    "cat_k8_over_lora_same_rank": (0.95, "<="),
    "cat_k32_over_lora_same_rank": (0.95, "<="),
    "naive_over_cat_k8": (1.5, ">="),
    "cat_over_lora_peak_rss": (1.0, "<="),
    "export_seconds": (10.0, "<="),
    "svd_export_seconds": (60.0, "<="),
}


def shape() -> dict:
    """The model shape chosen by --shape (workers read it from CAT_BENCH_SHAPE)."""
    return SHAPES[os.environ.get("CAT_BENCH_SHAPE", "toy")]


# ----------------------------------------------------------------------------- worker side


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def llama_config():
    from transformers import LlamaConfig

    dims = shape()
    return LlamaConfig(
        vocab_size=dims["vocab"],
        hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        tie_word_embeddings=dims["tied"],
        max_position_embeddings=dims["seq"],
        attn_implementation="sdpa",
    )


def small_base(weights: Path | None = None):
    """The frozen base in training mode: random (seed 0), or with the weights of `weights`.

    `weights` (written by `save_base`) is memory-mapped: the workers of one run share those
    pages instead of each holding its own copy (SmolLM2's 0.5 GB would be ~7 GB over 14
    workers on a shared 24 GiB machine). The model is built on the meta device and the
    mapped tensors assigned, so no random initialisation touches memory; the rotary
    embedding's inv_freq (a non-persistent buffer, not in the file) is rebuilt.
    """
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config()
    if weights is None:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    else:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        state = torch.load(weights, mmap=True, weights_only=True)
        model.load_state_dict(state, assign=True)
        rotary = model.model.rotary_emb
        model.model.rotary_emb = type(rotary)(config=config)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if meta:
            raise SystemExit(f"not in {weights}: {meta}")
    model.requires_grad_(False)
    return model.train()


def save_base(path: Path) -> None:
    """Write the random base's weights for the workers to map (see small_base)."""
    import torch

    torch.save(small_base().state_dict(), path)


def build_small_skills(folder: Path) -> list[str]:
    """MAX_SKILLS rank-8 skill LoRAs with random non-zero factors, saved by PEFT itself."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=SKILL_RANK,
        lora_alpha=2 * SKILL_RANK,
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(small_base(), config)
    paths = []
    for index in range(MAX_SKILLS):
        torch.manual_seed(100 + index)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn_like(param) * 0.05)
        path = folder / f"skill{index}"
        peft_model.save_pretrained(path)
        paths.append(str(path))
    return paths


def naive_forward(self, x, *args, **kwargs):
    """PEFT's multi-adapter LoRA loop, each adapter times its learnable scalar (LoRA Soups)."""
    result = self.base_layer(x, *args, **kwargs)
    for name in self.active_adapters:
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        x_in = self._cast_input_dtype(x, lora_A.weight.dtype)
        update = lora_B(lora_A(self.lora_dropout[name](x_in)))
        result = result + update * (self.naive_alpha[name] * self.scaling[name])
    return result


def build_model(name: str, skills: list[str], weights: Path | None = None):
    """The model of one configuration and the parameters its optimizer steps (None: floor).

    Names: floor; loraR (a PEFT LoRA of rank R, trained); catK, catK-core, catK-unfused (CAT
    over the first K skills: granularity module, granularity core, module through the
    unfused path); naiveK. `weights`: the base's weights file (small_base).
    """
    import types

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from torch import nn

    base = small_base(weights)
    if name == "floor":
        return base, None
    if name.startswith("lora"):
        rank = int(name[4:])  # alpha / r = 2, as the skills'
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM"
        )
        model = get_peft_model(base, config)
    elif name.startswith("cat"):
        from axolotl_cat_plugin import CatConfig, attach_cat
        from axolotl_cat_plugin.core.layers.linear import CatLinearVariant

        count_text, _, variant = name[3:].partition("-")
        CatLinearVariant.fused = variant != "unfused"
        granularity = "core" if variant == "core" else "module"
        count = int(count_text)
        adapters = [{"path": path, "name": f"skill{i}"} for i, path in enumerate(skills[:count])]
        model = attach_cat(base, CatConfig(skills=adapters, granularity=granularity))
    elif name.startswith("naive"):
        count = int(name[5:])
        names = [f"skill{i}" for i in range(count)]
        model = PeftModel.from_pretrained(base, skills[0], adapter_name=names[0])
        for adapter, path in zip(names[1:], skills[1:count], strict=True):
            model.load_adapter(path, adapter_name=adapter)
        model.base_model.set_adapter(names)
        model.requires_grad_(False)
        for module in model.modules():
            if hasattr(module, "lora_A") and names[0] in module.lora_A:
                module.naive_alpha = nn.ParameterDict(
                    {n: nn.Parameter(torch.ones((), dtype=torch.float32)) for n in names}
                )
                module.forward = types.MethodType(naive_forward, module)
    else:
        raise SystemExit(f"unknown configuration {name!r}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def make_step(name: str, skills: list[str], weights: Path | None = None):
    """A closure running one training step of the configuration; also returns a description."""
    import torch

    model, params = build_model(name, skills, weights)
    dims = shape()
    generator = torch.Generator().manual_seed(1)
    size = (dims["batch"], dims["seq"])
    embeds = torch.randn(*size, dims["hidden"], generator=generator).requires_grad_()
    labels = torch.randint(0, dims["vocab"], size, generator=generator)
    optimizer = torch.optim.AdamW(params, lr=1e-3) if params else None

    def step() -> float:
        loss = model(inputs_embeds=embeds, labels=labels, use_cache=False).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        embeds.grad = None
        return float(loss.detach())

    trainable = sum(p.numel() for p in params) if params else 0
    return step, {"trainable_params": trainable}


def run_worker(name: str, skills_file: str) -> None:
    """Serve one configuration: build, then answer `warmup N`, `time N`, `quit` on stdin."""
    # stdout is the protocol channel: keep whatever the libraries print off it
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")

    import torch

    torch.set_num_threads(int(os.environ.get("CAT_BENCH_THREADS", THREADS)))
    started = time.perf_counter()
    if name == "prepare":  # build the skills, report the versions
        import peft
        import transformers

        save_base(Path(skills_file).parent / "base.pt")
        skills = build_small_skills(Path(skills_file).parent)
        Path(skills_file).write_text(json.dumps(skills))
        send(
            {
                "torch": torch.__version__,
                "peft": peft.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            }
        )
        return
    if name == "export":
        send(export_bench(Path(skills_file).parent))
        return
    if name == "rank-ops":  # not a training step: the matmuls of one, timed alone
        rank_ops = RankOps()
        step, info = rank_ops.measure, {"trainable_params": 0}
    else:
        skills = json.loads(Path(skills_file).read_text())
        step, info = make_step(name, skills, Path(skills_file).parent / "base.pt")
    send(
        {
            "ready": True,
            "setup_s": time.perf_counter() - started,
            "setup_rss_mb": peak_rss_mb(),
            **info,
        }
    )
    for line in sys.stdin:
        command, _, count = line.strip().partition(" ")
        if command == "quit":
            send({"peak_rss_mb": peak_rss_mb()})
            return
        if name == "rank-ops":
            send({"times": [], "rank_ops_s": [step() for _ in range(int(count))]})
            continue
        times, losses = [], []
        for _ in range(int(count)):
            begin = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - begin)
        send({"times": times, "loss": losses[-1]})


def export_bench(folder: Path) -> dict:
    """Time attach_cat's real fold + write path on Llama-3-8B-shaped skills, with no 8B base."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    from axolotl_cat_plugin.core import CatConfig, attach_cat, write_export
    from axolotl_cat_plugin.core.export.fold import (
        fold,  # the package attribute may be the submodule
    )

    began = time.perf_counter()
    paths = []
    for index in range(BIG_SKILLS):
        generator = torch.Generator().manual_seed(200 + index)
        tensors = {}
        for layer in range(BIG_LAYERS):
            for module, (d_in, d_out) in BIG_SHAPES.items():
                key = f"base_model.model.model.layers.{layer}.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(BIG_RANK, d_in, generator=generator)
                tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, BIG_RANK, generator=generator)
        path = folder / f"big-skill{index}"
        path.mkdir()
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        LoraConfig(
            r=BIG_RANK, lora_alpha=2 * BIG_RANK, target_modules=TARGETS, task_type="CAUSAL_LM"
        ).save_pretrained(str(path))
        paths.append(str(path))
        del tensors
    skills_s = time.perf_counter() - began

    began = time.perf_counter()
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=BIG_LAYERS,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    zero = torch.zeros((), dtype=torch.float32)
    for name, module in base.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            weight = zero.expand(module.out_features, module.in_features)
            module.weight = nn.Parameter(weight, requires_grad=False)
    adapters = [{"path": path, "name": f"skill{i}"} for i, path in enumerate(paths)]
    model = attach_cat(base, CatConfig(skills=adapters))
    attach_s = time.perf_counter() - began

    result = {"skills_write_s": skills_s, "attach_s": attach_s}
    for label, rank in (("export", None), ("svd_export", SVD_RANK)):
        out = folder / label
        began = time.perf_counter()
        folded = fold(model, rank=rank)
        folded_at = time.perf_counter()
        write_export(folded, out)
        done = time.perf_counter()
        size = (out / "adapter_model.safetensors").stat().st_size
        result.update(
            {
                f"{label}_seconds": done - began,
                f"{label}_fold_s": folded_at - began,
                f"{label}_write_s": done - folded_at,
                f"{label}_rank": folded.rank,
                f"{label}_file_mb": size / 2**20,
            }
        )
        if rank is not None:
            errors = [m["svd_relative_error"] for m in folded.record.modules.values()]
            result["svd_max_relative_error"] = max(errors)
        del folded
        shutil.rmtree(out)
    result["export_peak_rss_mb"] = peak_rss_mb()
    return result


class RankOps:
    """The matmuls of one training step, timed alone, for the whole model (per layer x layers).

    Per wrapped module (d_in -> d_out) and N = batch x sequence tokens, fp32:
    - base: the frozen base's forward and input-gradient matmuls (x Wᵀ, g W), which every
      configuration pays (the floor's backbone);
    - cat[K]: the four rank-R matmuls any exact CAT step needs at R = K x 8 (A x, B hidden,
      gᵀ B, and the adapter's share of the input gradient);
    - lora_extra[K]: the two more a trained LoRA of rank R needs (its weight gradients
      gᵀ hidden and (g B)ᵀ x).
    Every operand is allocated once; each `measure()` times every matmul `repeats` times and
    keeps its median.
    """

    def __init__(self, counts=RANK_COUNTS, repeats: int = 5):
        import torch

        dims = shape()
        tokens, hidden, inter = dims["batch"] * dims["seq"], dims["hidden"], dims["intermediate"]
        kv = hidden // dims["heads"] * dims["kv_heads"]
        shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)]
        shapes += [(hidden, inter), (hidden, inter), (inter, hidden)]
        self.layers, self.repeats, self.counts = dims["layers"], repeats, counts
        self.pairs: dict[str, list] = {"base": []}
        for count in counts:
            self.pairs[f"cat{count}"], self.pairs[f"lora_extra{count}"] = [], []
        for d_in, d_out in shapes:
            x, g = torch.randn(tokens, d_in), torch.randn(tokens, d_out)
            weight = torch.randn(d_out, d_in)
            self.pairs["base"] += [(x, weight.t()), (g, weight)]
            for count in counts:
                rank = count * SKILL_RANK
                h, lora_A, lora_B = (
                    torch.randn(tokens, rank),
                    torch.randn(rank, d_in),
                    torch.randn(d_out, rank),
                )
                self.pairs[f"cat{count}"] += [
                    (x, lora_A.t()),
                    (h, lora_B.t()),
                    (g, lora_B),
                    (h, lora_A),
                ]
                self.pairs[f"lora_extra{count}"] += [(g.t(), h), (h.t(), x)]
        self.measure()  # warm-up

    def measure(self) -> dict[str, float]:
        """Seconds per training step of each group (base, catK, lora_extraK), whole model."""
        import torch

        result = {}
        for label, pairs in self.pairs.items():
            total = 0.0
            for a, b in pairs:
                times = []
                for _ in range(self.repeats):
                    begin = time.perf_counter()
                    torch.matmul(a, b)
                    times.append(time.perf_counter() - begin)
                total += statistics.median(times)
            result[label] = total * self.layers
        return result


def run_rank_ops(args: argparse.Namespace) -> None:
    """The arithmetic floor of CAT here: the rank-R matmuls alone against the base's matmuls
    (RankOps, per decoder layer, at K = 1, 2, 8, 32), printed."""
    import torch

    torch.set_num_threads(args.threads)
    rank_ops = RankOps(counts=(1, *RANK_COUNTS), repeats=20)
    seconds = rank_ops.measure()
    base = seconds["base"] / rank_ops.layers
    for count in rank_ops.counts:
        adapter = seconds[f"cat{count}"] / rank_ops.layers
        extra = seconds[f"lora_extra{count}"] / rank_ops.layers
        print(
            f"K={count:<3} R={count * SKILL_RANK:<4} per layer: base matmuls {base * 1e3:7.2f} ms, "
            f"CAT's rank-R matmuls {adapter * 1e3:7.2f} ms ({100 * adapter / base:.1f}% of the "
            f"base's), a LoRA's weight gradients {extra * 1e3:7.2f} ms more"
        )


PAIRED = ["floor", "lora16", "cat1", "cat2", "cat2-unfused", "cat32", "cat32-unfused"]


def run_paired(args: argparse.Namespace) -> None:
    """Fused vs unfused vs floor in ONE process, step by step: drift cancels in each round.

    On a shared machine the separate workers' medians drift apart; here every round runs
    one step of each configuration back to back (rotating order), the ratios are taken
    within each round, and their medians reported. The unfused configurations are the same
    models as the fused ones with `CatLinearVariant.fused` switched off for their step.
    `--skip` leaves configurations out (their ratios are then None).
    """
    import torch

    from axolotl_cat_plugin.core.layers.linear import CatLinearVariant

    torch.set_num_threads(args.threads)
    args.rounds = args.rounds or 20
    names = [name for name in PAIRED if name not in args.skip]
    wall = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cat-bench-") as tmp:
        skills = build_small_skills(Path(tmp))
        steps = {}
        for name in dict.fromkeys(name.removesuffix("-unfused") for name in names):
            steps[name] = make_step(name, skills)[0]  # an unfused one runs its fused model
    CatLinearVariant.fused = True

    def run(name: str) -> float:
        CatLinearVariant.fused = not name.endswith("-unfused")
        step = steps[name.removesuffix("-unfused")]
        begin = time.perf_counter()
        step()
        return time.perf_counter() - begin

    for name in names:  # warm-up
        run(name)
        run(name)
    times = {name: [] for name in names}
    foreign = ForeignLoad([os.getpid()])
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(run(name))
    foreign_cores = foreign.cores()
    CatLinearVariant.fused = True

    def paired(a: str, b: str) -> float | None:
        if a not in times or b not in times:
            return None
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    ratios = {
        "cat_over_floor": paired("cat2", "floor"),
        "cat_k2_over_lora_same_rank": paired("cat2", "lora16"),
        "lora_r16_over_floor": paired("lora16", "floor"),
        "unfused_cat_over_floor": paired("cat2-unfused", "floor"),
        "cat_k32_over_k1": paired("cat32", "cat1"),
        "unfused_cat_k32_over_k1": paired("cat32-unfused", "cat1"),
        "fused_over_unfused_k2": paired("cat2", "cat2-unfused"),
        "fused_over_unfused_k32": paired("cat32", "cat32-unfused"),
    }
    report = {
        **ratios,
        "mode": "paired",
        "shape": {"name": args.shape, **shape()},
        "rounds": args.rounds,
        "medians_s": {name: statistics.median(values) for name, values in times.items()},
        "step_times_s": times,
        "machine": {
            "cpu_model": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": args.threads,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "foreign_cpu_cores_while_timing": foreign_cores,
        },
        "wall_s": time.perf_counter() - wall,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'config':<14} {'median s':>9}")
    for name in names:
        print(f"{name:<14} {report['medians_s'][name]:>9.4f}")
    print(f"\n{'ratio (median of per-round ratios)':<36} {'fused':>8} {'unfused':>8}")
    print(
        f"{'CAT K=2 / floor':<36} {_fmt(ratios['cat_over_floor'])} "
        f"{_fmt(ratios['unfused_cat_over_floor'])}"
    )
    print(
        f"{'CAT K=32 / CAT K=1 (fused)':<36} {_fmt(ratios['cat_k32_over_k1'])} "
        f"{_fmt(ratios['unfused_cat_k32_over_k1'])}"
    )
    print(f"{'CAT K=2 / LoRA r 16':<36} {_fmt(ratios['cat_k2_over_lora_same_rank'])}")
    print(f"{'LoRA r 16 / floor':<36} {_fmt(ratios['lora_r16_over_floor'])}")
    print(f"{'fused / unfused, K=2':<36} {_fmt(ratios['fused_over_unfused_k2'])}")
    print(f"{'fused / unfused, K=32':<36} {_fmt(ratios['fused_over_unfused_k32'])}")
    print(
        f"\n{args.threads} torch threads; load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}; "
        f"other processes kept {foreign_cores or 0:.2f} cores busy while timing"
    )
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")


def run_profile(name: str) -> None:
    """Profile three steps of one configuration with torch.profiler (run in this process)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(int(os.environ.get("CAT_BENCH_THREADS", THREADS)))
    with tempfile.TemporaryDirectory() as tmp:
        skills = build_small_skills(Path(tmp)) if name.startswith(("cat", "naive")) else []
        step, _ = make_step(name, skills)
        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


# ----------------------------------------------------------------------------- parent side


class Worker:
    """One configuration's subprocess, spoken to in JSON lines."""

    def __init__(self, name: str, skills_file: Path, log_dir: Path, threads: int):
        self.name = name
        self.log = log_dir / f"{name}.log"
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        env["OMP_NUM_THREADS"] = env["CAT_BENCH_THREADS"] = str(threads)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        repo = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, __file__, "--worker", name, "--skills-file", str(skills_file)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
            )

    def ask(self, command: str | None = None) -> dict:
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            tail = self.log.read_text()[-3000:]
            raise SystemExit(f"worker {self.name} died (rc {self.process.returncode}):\n{tail}")
        return json.loads(line)


class ForeignLoad:
    """How many CPU cores processes other than ours kept busy since creation (Linux only).

    Machine-wide busy time from /proc/stat minus our workers' own CPU time: the benchmark's
    best witness of whether someone else's work perturbed the timings.
    """

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
            busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
            ours = 0
            for pid in self.pids:
                stat = Path(f"/proc/{pid}/stat").read_text()
                ours += sum(int(v) for v in stat.rsplit(")", 1)[1].split()[11:13])  # utime, stime
            return time.monotonic(), busy, ours
        except (OSError, ValueError, IndexError):
            return None

    def cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        elapsed = end[0] - self.start[0]
        return max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2])) / ticks / elapsed


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def time_ratios(seconds: dict[str, float]) -> dict[str, float | None]:
    """The step-time ratios the benchmark reports; None where a configuration did not run."""

    def of(a: str, b: str) -> float | None:
        return ratio(seconds.get(a), seconds.get(b))

    ratios = {"cat_over_floor": of("cat2", "floor")}
    for k in RANK_COUNTS:  # the yardstick: one trained LoRA of the same total rank K x 8
        lora = f"lora{k * SKILL_RANK}"
        ratios[f"cat_k{k}_over_lora_same_rank"] = of(f"cat{k}", lora)
        ratios[f"core_k{k}_over_lora_same_rank"] = of(f"cat{k}-core", lora)
        ratios[f"cat_k{k}_over_floor"] = of(f"cat{k}", "floor")
        ratios[f"core_k{k}_over_floor"] = of(f"cat{k}-core", "floor")
        ratios[f"lora_r{k * SKILL_RANK}_over_floor"] = of(lora, "floor")
    ratios |= {
        "naive_over_cat_k8": of("naive8", "cat8"),
        "cat_k8_over_k2": of("cat8", "cat2"),
        "cat_k32_over_k2": of("cat32", "cat2"),
        # a full run only: K=1 and the previous (unfused) path, measured in the same rounds
        "cat_k8_over_k1": of("cat8", "cat1"),
        "cat_k32_over_k1": of("cat32", "cat1"),
        "unfused_cat_over_floor": of("cat2-unfused", "floor"),
        "unfused_cat_k32_over_k1": of("cat32-unfused", "cat1"),
        "fused_over_unfused_k2": of("cat2", "cat2-unfused"),
        "fused_over_unfused_k32": of("cat32", "cat32-unfused"),
    }
    return ratios


def paired_ratios(rounds: dict[str, list[float]]) -> dict[str, float | None]:
    """time_ratios taken within each round (every configuration's mean step of that round),
    then the median over rounds: drift of the machine between rounds cancels."""
    names = list(rounds)
    per_round = [
        time_ratios({n: rounds[n][i] for n in names}) for i in range(len(rounds[names[0]]))
    ]
    return {
        key: None if per_round[0][key] is None else statistics.median(r[key] for r in per_round)
        for key in per_round[0]
    }


def rank_op_shares(rank_rounds: list[dict], floor_rounds: list[float]) -> dict:
    """The matmuls' shares of a floor step (median over rounds of RankOps time / the floor's
    step in that round), and what they imply as arithmetic limits of the ratios."""

    def share(label: str) -> float:
        return statistics.median(
            r[label] / f for r, f in zip(rank_rounds, floor_rounds, strict=True)
        )

    cat = {str(k): share(f"cat{k}") for k in RANK_COUNTS}
    extra = {str(k): share(f"lora_extra{k}") for k in RANK_COUNTS}
    return {
        "rank_ops_share": cat,  # CAT's four rank-R matmuls / the floor step, K -> share
        "lora_rank_ops_share": {k: cat[k] + extra[k] for k in cat},  # a LoRA's six
        "base_matmuls_share": share("base"),  # the base's own matmuls / the floor step
        # if everything beyond the floor were those matmuls: CAT K / floor >= 1 + share, and
        # CAT K / LoRA of rank 8K >= (1 + CAT's share) / (1 + LoRA's share)
        "limits": {
            **{f"cat_k{k}_over_floor": 1 + cat[k] for k in cat},
            **{
                f"cat_k{k}_over_lora_same_rank": (1 + cat[k]) / (1 + cat[k] + extra[k]) for k in cat
            },
        },
    }


def run_parent(args: argparse.Namespace) -> None:
    """Build every configuration's worker, time them in rotating rounds, write the JSON."""
    plan = dict(PLANS["quick" if args.quick else "full"])
    if args.rounds is not None:
        plan["rounds"] = args.rounds
    configs = [name for name in (QUICK_CONFIGS if args.quick else CONFIGS) if name not in args.skip]
    wall = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cat-bench-") as tmp:
        tmp = Path(tmp)
        skills_file = tmp / "skills.json"
        versions = Worker("prepare", skills_file, tmp, args.threads).ask()
        print(f"skills built ({time.perf_counter() - wall:.0f} s); starting workers", flush=True)

        workers = []
        ready = {}
        for name in configs:  # built one after another: building is what needs most memory
            workers.append(Worker(name, skills_file, tmp, args.threads))
            ready[name] = workers[-1].ask()
        rank_ops = Worker("rank-ops", skills_file, tmp, args.threads)
        rank_ops.ask()
        for w in workers:  # warm-up one after another so that none is timed while others build
            w.ask(f"warmup {plan['warmup']}")
        print(f"workers ready ({time.perf_counter() - wall:.0f} s); timing", flush=True)

        times: dict[str, list[float]] = {w.name: [] for w in workers}
        rounds: dict[str, list[float]] = {w.name: [] for w in workers}
        rank_rounds = []
        foreign = ForeignLoad([w.process.pid for w in [*workers, rank_ops]])
        everyone = [*workers, rank_ops]
        for round_index in range(plan["rounds"]):
            shift = round_index % len(everyone)
            for w in everyone[shift:] + everyone[:shift]:
                if w is rank_ops:
                    rank_rounds += w.ask("time 1")["rank_ops_s"]
                    continue
                step_times = w.ask(f"time {plan['steps']}")["times"]
                times[w.name] += step_times
                rounds[w.name].append(statistics.mean(step_times))
            print(f"round {round_index + 1}/{plan['rounds']} done", flush=True)
        foreign_cores = foreign.cores()
        peaks = {w.name: w.ask("quit")["peak_rss_mb"] for w in workers}
        rank_ops.ask("quit")
        for w in everyone:
            w.process.wait()
        print(f"timing done ({time.perf_counter() - wall:.0f} s); export", flush=True)

        exported = None
        if not args.no_export:
            (tmp / "export").mkdir()
            export = Worker("export", tmp / "export" / "unused", tmp, args.threads)
            exported = export.ask()
            export.process.wait()

    medians = {name: statistics.median(values) for name, values in times.items()}
    minima = {name: min(values) for name, values in times.items()}
    peak_ratios = {
        "cat_over_lora_peak_rss": ratio(peaks.get("cat2"), peaks.get("lora16")),
        **{
            f"cat_k{k}_over_lora_same_rank_peak_rss": ratio(
                peaks.get(f"cat{k}"), peaks.get(f"lora{k * SKILL_RANK}")
            )
            for k in RANK_COUNTS
        },
    }
    results = {
        **paired_ratios(rounds),
        "cat_peak_rss_above_floor_mb": peaks["cat2"] - peaks["floor"],
        **peak_ratios,
        **rank_op_shares(rank_rounds, rounds["floor"]),
        "export_seconds": exported and exported["export_seconds"],
        "svd_export_seconds": exported and exported["svd_export_seconds"],
    }
    report = {
        **results,
        "goals": {
            key: {"goal": f"{op} {limit}", "met": _meets(results[key], op, limit)}
            for key, (limit, op) in GOALS.items()
        },
        "mode": "quick" if args.quick else "full",
        "date": time.strftime("%Y-%m-%d"),
        "ratios": "median over rounds of the ratio of the two configurations' steps in that "
        "round (every configuration timed once per round, order rotating)",
        "plan": plan,
        "configs": configs,
        "shape": {"name": args.shape, **shape(), "dtype": "float32", "targets": TARGETS},
        "skill_rank": SKILL_RANK,
        # the same ratios on medians, and on each configuration's fastest step
        "ratios_of_medians": time_ratios(medians),
        "ratios_of_minima": time_ratios(minima),
        "medians_s": medians,
        "min_s": minima,
        "step_times_s": times,
        "round_means_s": rounds,
        "rank_ops_s": rank_rounds,
        "peak_rss_mb": peaks,
        "setup": ready,
        "export": exported,
        "machine": {
            "cpu_model": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": args.threads,
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            # CPU cores kept busy by other processes while the steps were timed
            "foreign_cpu_cores_while_timing": foreign_cores,
        },
        "versions": versions,
        "wall_s": time.perf_counter() - wall,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {args.out} ({report['wall_s']:.0f} s)")


def _meets(value: float | None, op: str, limit: float) -> bool | None:
    if value is None:
        return None
    return value <= limit if op == "<=" else value >= limit


def _fmt(value: float | None, width: int = 8, digits: int = 3) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def print_table(report: dict) -> None:
    """The report in words: per-configuration times, the same-rank table, the goals."""
    medians, minima, peaks = report["medians_s"], report["min_s"], report["peak_rss_mb"]
    dims = report["shape"]
    print(
        f"\nshape {dims['name']}: hidden {dims['hidden']}, {dims['layers']} layers, vocab "
        f"{dims['vocab']}, batch {dims['batch']} x seq {dims['seq']}, fp32"
    )
    header = ("config", "median s", "min s", "x floor", "min x floor", "peak MB", "+floor MB")
    print("{:<14} {:>9} {:>8} {:>8} {:>12} {:>8} {:>10}".format(*header))
    for name in report["configs"]:
        print(
            f"{name:<14} {medians[name]:>9.4f} {minima[name]:>8.4f} "
            f"{medians[name] / medians['floor']:>8.3f} {minima[name] / minima['floor']:>12.3f} "
            f"{peaks[name]:>8.0f} {peaks[name] - peaks['floor']:>10.0f}"
        )
    limits, share = report["limits"], report["rank_ops_share"]
    print(
        "\nper K, paired ratios (median over rounds); `limit`: if all beyond the floor were the "
        "rank-R matmuls\n"
        f"{'K':>3} {'R':>4} {'rank-R share':>12} {'CAT/floor':>10} {'limit':>6} "
        f"{'CAT/LoRA R':>11} {'limit':>6} {'core/LoRA R':>12} {'RSS CAT/LoRA':>13}"
    )
    for k in RANK_COUNTS:
        print(
            f"{k:>3} {k * SKILL_RANK:>4} {share[str(k)]:>12.3f} "
            f"{_fmt(report[f'cat_k{k}_over_floor'], 10)} "
            f"{limits[f'cat_k{k}_over_floor']:>6.3f} "
            f"{_fmt(report[f'cat_k{k}_over_lora_same_rank'], 11)} "
            f"{limits[f'cat_k{k}_over_lora_same_rank']:>6.3f} "
            f"{_fmt(report[f'core_k{k}_over_lora_same_rank'], 12)} "
            f"{_fmt(report[f'cat_k{k}_over_lora_same_rank_peak_rss'], 13)}"
        )
    print(f"base matmuls' share of a floor step: {report['base_matmuls_share']:.3f}")
    ex = report["export"]
    if ex is not None:
        print(
            f"\nexport, Llama-3-8B shape, K={BIG_SKILLS} x r={BIG_RANK} "
            f"(R={BIG_SKILLS * BIG_RANK}):"
            f" fold {ex['export_fold_s']:.2f} s + write {ex['export_write_s']:.2f} s"
            f" ({ex['export_file_mb']:.0f} MB);\n  SVD to rank {SVD_RANK}:"
            f" fold {ex['svd_export_fold_s']:.2f} s + write {ex['svd_export_write_s']:.2f} s"
            f" ({ex['svd_export_file_mb']:.0f} MB); attach {ex['attach_s']:.1f} s;"
            f" peak RSS {ex['export_peak_rss_mb']:.0f} MB"
        )
    print(f"\n{'metric':<28} {'paired':>8} {'medians':>8} {'minima':>8}  goal")
    for key, (limit, op) in GOALS.items():
        value = report[key]
        if value is None:
            continue
        verdict = "ok" if report["goals"][key]["met"] else "MISSED"
        print(
            f"{key:<28} {value:>8.3f} {_fmt(report['ratios_of_medians'].get(key))} "
            f"{_fmt(report['ratios_of_minima'].get(key))}  {op} {limit:<6} {verdict}"
        )
    if report["fused_over_unfused_k2"] is not None:
        print(f"\n{'fused vs previous path':<24} {'fused':>8} {'unfused':>8}  (paired)")
        for label, fused, unfused in (
            ("CAT K=2 / floor", "cat_over_floor", "unfused_cat_over_floor"),
            ("CAT K=32 / K=1", "cat_k32_over_k1", "unfused_cat_k32_over_k1"),
        ):
            print(f"{label:<24} {report[fused]:>8.3f} {report[unfused]:>8.3f}")
        for k in (2, 32):
            key = f"fused_over_unfused_k{k}"
            print(f"{'fused / unfused, K=' + str(k):<24} {report[key]:>8.3f}")
    machine = report["machine"]
    print(
        f"\n{machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['torch_threads']} torch threads; load "
        f"{machine['loadavg_before'][0]:.2f} -> {machine['loadavg_after'][0]:.2f}; other "
        f"processes kept {machine['foreign_cpu_cores_while_timing'] or 0:.2f} cores busy while "
        "timing; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    )
    foreign = machine["foreign_cpu_cores_while_timing"]
    if foreign is not None and foreign > 0.25 * machine["cores"]:
        print(
            f"WARNING: other processes used {foreign:.2f} of {machine['cores']} cores while the "
            "steps were timed; the times and ratios above are not those of a quiet machine"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds and configurations (a few minutes)"
    )
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="toy",
        help="toy: hidden 512, 4 layers (default); smollm2: SmolLM2-135M's shape, random weights",
    )
    parser.add_argument("--no-export", action="store_true", help="skip the export timing")
    parser.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=CONFIGS[1:],
        metavar="CONFIG",
        help="leave these configurations out (e.g. cat32-core on SmolLM2's shape: its K x R x R "
        "skill cores hold 1.8 GB)",
    )
    parser.add_argument("--out", default="bench.json", help="where to write the JSON results")
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help=f"torch threads per worker (default {THREADS}); 1 suffers far less when other "
        "processes share the cores",
    )
    parser.add_argument("--profile", metavar="CONFIG", choices=CONFIGS, help="profile one config")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="fused vs unfused vs floor in one process, ratios taken per round (robust to load)",
    )
    parser.add_argument(
        "--rounds", type=int, help="rounds to time (default: 20 with --paired, else the plan's)"
    )
    parser.add_argument(
        "--rank-ops", action="store_true", help="time the rank-R matmuls against the base's"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--skills-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # the parent's --shape comes in CAT_BENCH_SHAPE
        run_worker(args.worker, args.skills_file)
        return
    os.environ["CAT_BENCH_SHAPE"] = args.shape  # for shape() here and in the workers
    if args.profile:
        run_profile(args.profile)
    elif args.paired:
        run_paired(args)
    elif args.rank_ops:
        run_rank_ops(args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
