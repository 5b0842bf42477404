"""CPU benchmark of CAT training cost against its baselines, and of the export.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/cpu.py [--quick] [--out bench.json]
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/cpu.py --profile cat2   # where does a step go?
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/cpu.py --paired --threads 1 --out paired.json

Every training configuration runs on the same randomly initialised Llama (hidden 512,
intermediate 1408, 4 layers, 8 heads / 2 KV heads as in Llama-3's 4:1 GQA, vocabulary 1024,
fp32), batch 4 x sequence 256, with the same `inputs_embeds` (requires_grad=True) and
random labels. The adapters wrap q, k, v, o, gate, up and down projections of every layer.

Configurations (each one its own persistent subprocess, see "Method"):

floor   forward + backward of the frozen base with no adapter; only the input gradient is
        asked for. Any method that trains something inside the model must backpropagate
        through the whole base, so this is the price of the cheapest possible adapter.
        Every configuration below does exactly this work plus its own.
lora    one standard PEFT LoRA of rank R = K*r = 16 (K=2, r=8) being trained (AdamW):
        the usual alternative to CAT with the same adapter shape at K=2.
catK    our implementation: `attach_cat` over K skill LoRAs of rank 8 (K = 1, 2, 8, 32;
        random non-zero factors saved to disk with PEFT first), one training step =
        forward + backward + AdamW step on the coefficients. CAT's forward is one A and
        one B matmul of rank K*r per module whatever K, so cost should grow slowly with K.
        Each module runs the fused Function of core/fused.py (one input gradient).
catK-unfused  the same with `CatLinearVariant.fused = False`: the previous path (the
        adapter added after PEFT's base layer, autograd summing two input gradients), for
        K = 2 and 32, side by side with the fused one in the same run.
naive8  the same math done the way PEFT's multi-adapter forward and the LoRA Soups code do
        it: K=8 separate PEFT adapters (PeftModel.from_pretrained + load_adapter, all
        activated with set_adapter), each LoRA layer's forward replaced by PEFT's own loop
        with a learnable fp32 scalar per adapter per module:
            result = base(x);  for i: result = result + B_i(A_i(x)) * (alpha_i * s_i)
        i.e. 2K small matmuls and K full-width adds per module instead of CAT's 2 matmuls.

Method: the parent process imports no torch. It starts one worker per configuration (the
script re-invoked with `--worker NAME`; 2 torch threads unless --threads), which builds its
model and then waits for orders on stdin, answering JSON lines. After every worker has warmed
up, the parent runs rounds: in each round every worker times a few steps in turn (the order
rotates from round to round), so slow drifts of the machine's load hit every configuration
alike. With 2 threads on 2 cores, any other busy process stalls every OpenMP barrier: steps
then take several times longer and the ratios mean little; `--threads 1` degrades gracefully.
Reported times are medians over all timed steps. Peak memory is the worker's max RSS
(resource.getrusage), which includes the ~0.7 GB every torch + transformers + peft process
pays; the table also gives it above the floor's.

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
        compression).

The JSON (`--out`) holds the goal ratios (on medians, and again on each configuration's
fastest step), the medians, every timed step, peak RSS, the machine, the library versions,
the load average before and after, and how many cores other processes kept busy while the
steps were timed (from /proc/stat): on a shared machine, read the ratios in that light.
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
SMALL = dict(hidden=512, intermediate=1408, layers=4, heads=8, kv_heads=2, vocab=1024)
BATCH, SEQ = 4, 256
SKILL_RANK, MAX_SKILLS, LORA_RANK = 8, 32, 16
THREADS = 2  # torch threads per worker; --threads changes it (workers read CAT_BENCH_THREADS)
CONFIGS = [
    "floor",
    "lora",
    "cat1",
    "cat2",
    "cat8",
    "cat32",
    "cat2-unfused",
    "cat32-unfused",
    "naive8",
]
# rounds x steps timed per configuration, after `warmup` untimed steps
PLANS = {
    "full": dict(warmup=3, rounds=12, steps=3),
    "quick": dict(warmup=2, rounds=3, steps=2),
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
GOALS = {  # name: (threshold, "<=" or ">=")
    "cat_over_lora": (1.0, "<="),
    "cat_over_floor": (1.03, "<="),
    "cat_k8_over_k1": (1.25, "<="),
    "cat_k32_over_k1": (1.3, "<="),
    "naive_over_cat_k8": (1.5, ">="),
    "cat_over_lora_peak_rss": (1.0, "<="),
    "export_seconds": (10.0, "<="),
    "svd_export_seconds": (60.0, "<="),
}


# ----------------------------------------------------------------------------- worker side


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def small_base():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=SMALL["vocab"],
        hidden_size=SMALL["hidden"],
        intermediate_size=SMALL["intermediate"],
        num_hidden_layers=SMALL["layers"],
        num_attention_heads=SMALL["heads"],
        num_key_value_heads=SMALL["kv_heads"],
        max_position_embeddings=SEQ,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    return model.train()


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


def build_model(name: str, skills: list[str]):
    """The model of one configuration and the parameters its optimizer steps (None: floor)."""
    import types

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from torch import nn

    base = small_base()
    if name == "floor":
        return base, None
    if name == "lora":
        config = LoraConfig(
            r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=TARGETS, task_type="CAUSAL_LM"
        )
        model = get_peft_model(base, config)
    elif name.startswith("cat"):
        from axolotl_cat_plugin import CatConfig, attach_cat
        from axolotl_cat_plugin.core.layer import CatLinearVariant

        count_text, _, variant = name[3:].partition("-")
        CatLinearVariant.fused = variant != "unfused"
        count = int(count_text)
        adapters = [{"path": path, "name": f"skill{i}"} for i, path in enumerate(skills[:count])]
        model = attach_cat(base, CatConfig(skills=adapters))
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


def make_step(name: str, skills: list[str]):
    """A closure running one training step of the configuration; also returns a description."""
    import torch

    model, params = build_model(name, skills)
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(BATCH, SEQ, SMALL["hidden"], generator=generator).requires_grad_()
    labels = torch.randint(0, SMALL["vocab"], (BATCH, SEQ), generator=generator)
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

    step, info = make_step(name, json.loads(Path(skills_file).read_text()))
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
    from axolotl_cat_plugin.core.fold import fold  # the package attribute may be the submodule

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
            errors = [m["svd_relative_error"] for m in folded.record["modules"].values()]
            result["svd_max_relative_error"] = max(errors)
        del folded
        shutil.rmtree(out)
    result["export_peak_rss_mb"] = peak_rss_mb()
    return result


def run_rank_ops(args: argparse.Namespace) -> None:
    """The arithmetic floor of CAT here: the rank-R matmuls alone against the base's matmuls.

    Per decoder layer of the benchmark model, N = batch x sequence tokens, fp32, timed one
    by one (lower quartile of 20): the base's forward and input-gradient matmuls (x Wᵀ, g W)
    against the four rank-R ones any exact CAT step needs (A x, B hidden, gᵀ B, and the
    adapter's share of the input gradient), for R = K x 8 at K = 1, 2, 32.
    """
    import torch

    torch.set_num_threads(args.threads)
    tokens, hidden, inter = BATCH * SEQ, SMALL["hidden"], SMALL["intermediate"]
    kv = hidden // SMALL["heads"] * SMALL["kv_heads"]
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)]
    shapes += [(hidden, inter), (hidden, inter), (inter, hidden)]

    def timed(a, b) -> float:
        for _ in range(3):
            torch.matmul(a, b)
        times = []
        for _ in range(20):
            begin = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - begin)
        return sorted(times)[len(times) // 4]

    for count in (1, 2, 32):
        rank = count * SKILL_RANK
        base = adapter = 0.0
        for d_in, d_out in shapes:
            x, g = torch.randn(tokens, d_in), torch.randn(tokens, d_out)
            weight, h = torch.randn(d_out, d_in), torch.randn(tokens, rank)
            lora_A, lora_B = torch.randn(rank, d_in), torch.randn(d_out, rank)
            base += timed(x, weight.t()) + timed(g, weight)
            adapter += timed(x, lora_A.t()) + timed(h, lora_B.t())
            adapter += timed(g, lora_B) + timed(h, lora_A)
        print(
            f"K={count:<3} R={rank:<4} per layer: base matmuls {base * 1e3:7.2f} ms, rank-R "
            f"matmuls {adapter * 1e3:7.2f} ms ({100 * adapter / base:.1f}% of the base's)"
        )


PAIRED = ["floor", "cat1", "cat2", "cat2-unfused", "cat32", "cat32-unfused"]


def run_paired(args: argparse.Namespace) -> None:
    """Fused vs unfused vs floor in ONE process, step by step: drift cancels in each round.

    On a shared machine the separate workers' medians drift apart; here every round runs
    one step of each configuration back to back (rotating order), the ratios are taken
    within each round, and their medians reported. The unfused configurations are the same
    models as the fused ones with `CatLinearVariant.fused` switched off for their step.
    """
    import torch

    from axolotl_cat_plugin.core.layer import CatLinearVariant

    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cat-bench-") as tmp:
        skills = build_small_skills(Path(tmp))
        steps = {}
        for name in PAIRED:
            if name.endswith("-unfused"):
                continue
            steps[name] = make_step(name, skills)[0]
    CatLinearVariant.fused = True

    def run(name: str) -> float:
        CatLinearVariant.fused = not name.endswith("-unfused")
        step = steps[name.removesuffix("-unfused")]
        begin = time.perf_counter()
        step()
        return time.perf_counter() - begin

    for name in PAIRED:  # warm-up
        run(name)
        run(name)
    times = {name: [] for name in PAIRED}
    foreign = ForeignLoad([os.getpid()])
    for round_index in range(args.rounds):
        shift = round_index % len(PAIRED)
        for name in PAIRED[shift:] + PAIRED[:shift]:
            times[name].append(run(name))
    foreign_cores = foreign.cores()
    CatLinearVariant.fused = True

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    ratios = {
        "cat_over_floor": paired("cat2", "floor"),
        "unfused_cat_over_floor": paired("cat2-unfused", "floor"),
        "cat_k32_over_k1": paired("cat32", "cat1"),
        "unfused_cat_k32_over_k1": paired("cat32-unfused", "cat1"),
        "fused_over_unfused_k2": paired("cat2", "cat2-unfused"),
        "fused_over_unfused_k32": paired("cat32", "cat32-unfused"),
    }
    report = {
        **ratios,
        "mode": "paired",
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
    for name in PAIRED:
        print(f"{name:<14} {report['medians_s'][name]:>9.4f}")
    print(f"\n{'ratio (median of per-round ratios)':<36} {'fused':>8} {'unfused':>8}")
    print(
        f"{'CAT K=2 / floor':<36} {ratios['cat_over_floor']:>8.3f} "
        f"{ratios['unfused_cat_over_floor']:>8.3f}"
    )
    print(
        f"{'CAT K=32 / CAT K=1 (fused)':<36} {ratios['cat_k32_over_k1']:>8.3f} "
        f"{ratios['unfused_cat_k32_over_k1']:>8.3f}"
    )
    print(f"{'fused / unfused, K=2':<36} {ratios['fused_over_unfused_k2']:>8.3f}")
    print(f"{'fused / unfused, K=32':<36} {ratios['fused_over_unfused_k32']:>8.3f}")
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
    return {
        "cat_over_floor": ratio(seconds["cat2"], seconds["floor"]),
        "cat_over_lora": ratio(seconds["cat2"], seconds["lora"]),
        "cat_k8_over_k1": ratio(seconds["cat8"], seconds["cat1"]),
        "cat_k32_over_k1": ratio(seconds["cat32"], seconds["cat1"]),
        "naive_over_cat_k8": ratio(seconds["naive8"], seconds["cat8"]),
        # the previous (unfused) path, measured in the same rounds
        "unfused_cat_over_floor": ratio(seconds["cat2-unfused"], seconds["floor"]),
        "unfused_cat_k32_over_k1": ratio(seconds["cat32-unfused"], seconds["cat1"]),
        "fused_over_unfused_k2": ratio(seconds["cat2"], seconds["cat2-unfused"]),
        "fused_over_unfused_k32": ratio(seconds["cat32"], seconds["cat32-unfused"]),
    }


def run_parent(args: argparse.Namespace) -> None:
    plan = PLANS["quick" if args.quick else "full"]
    wall = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cat-bench-") as tmp:
        tmp = Path(tmp)
        skills_file = tmp / "skills.json"
        versions = Worker("prepare", skills_file, tmp, args.threads).ask()
        print(f"skills built ({time.perf_counter() - wall:.0f} s); starting workers", flush=True)

        workers = [Worker(name, skills_file, tmp, args.threads) for name in CONFIGS]
        ready = {w.name: w.ask() for w in workers}
        for w in workers:  # warm-up one after another so that none is timed while others build
            w.ask(f"warmup {plan['warmup']}")
        print(f"workers ready ({time.perf_counter() - wall:.0f} s); timing", flush=True)

        times: dict[str, list[float]] = {w.name: [] for w in workers}
        foreign = ForeignLoad([w.process.pid for w in workers])
        for round_index in range(plan["rounds"]):
            shift = round_index % len(workers)
            for w in workers[shift:] + workers[:shift]:
                times[w.name] += w.ask(f"time {plan['steps']}")["times"]
        foreign_cores = foreign.cores()
        peaks = {w.name: w.ask("quit")["peak_rss_mb"] for w in workers}
        for w in workers:
            w.process.wait()
        print(f"timing done ({time.perf_counter() - wall:.0f} s); export", flush=True)

        (tmp / "export").mkdir()
        export = Worker("export", tmp / "export" / "unused", tmp, args.threads)
        exported = export.ask()
        export.process.wait()

    medians = {name: statistics.median(values) for name, values in times.items()}
    minima = {name: min(values) for name, values in times.items()}
    results = {
        **time_ratios(medians),
        "cat_peak_rss_above_floor_mb": peaks["cat2"] - peaks["floor"],
        "cat_over_lora_peak_rss": ratio(peaks["cat2"], peaks["lora"]),
        "export_seconds": exported["export_seconds"],
        "svd_export_seconds": exported["svd_export_seconds"],
    }
    report = {
        **results,
        "goals": {
            key: {"goal": f"{op} {limit}", "met": bool(_meets(results[key], op, limit))}
            for key, (limit, op) in GOALS.items()
        },
        "mode": "quick" if args.quick else "full",
        "plan": plan,
        "shape": {**SMALL, "batch": BATCH, "seq": SEQ, "dtype": "float32", "targets": TARGETS},
        # the same ratios on each configuration's fastest step: less sensitive to other load
        "ratios_of_minima": time_ratios(minima),
        "medians_s": medians,
        "min_s": minima,
        "step_times_s": times,
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


def print_table(report: dict) -> None:
    medians, minima, peaks = report["medians_s"], report["min_s"], report["peak_rss_mb"]
    header = ("config", "median s", "min s", "x floor", "min x floor", "peak MB", "+floor MB")
    print("\n{:<14} {:>9} {:>8} {:>8} {:>12} {:>8} {:>10}".format(*header))
    for name in CONFIGS:
        print(
            f"{name:<14} {medians[name]:>9.4f} {minima[name]:>8.4f} "
            f"{medians[name] / medians['floor']:>8.3f} {minima[name] / minima['floor']:>12.3f} "
            f"{peaks[name]:>8.0f} {peaks[name] - peaks['floor']:>10.0f}"
        )
    ex = report["export"]
    print(
        f"\nexport, Llama-3-8B shape, K={BIG_SKILLS} x r={BIG_RANK} (R={BIG_SKILLS * BIG_RANK}):"
        f" fold {ex['export_fold_s']:.2f} s + write {ex['export_write_s']:.2f} s"
        f" ({ex['export_file_mb']:.0f} MB);\n  SVD to rank {SVD_RANK}:"
        f" fold {ex['svd_export_fold_s']:.2f} s + write {ex['svd_export_write_s']:.2f} s"
        f" ({ex['svd_export_file_mb']:.0f} MB); attach {ex['attach_s']:.1f} s;"
        f" peak RSS {ex['export_peak_rss_mb']:.0f} MB"
    )
    print(f"\n{'metric':<24} {'value':>8} {'on minima':>10}  goal")
    for key, (limit, op) in GOALS.items():
        value = report[key]
        on_minima = report["ratios_of_minima"].get(key)
        shown = f"{on_minima:>10.3f}" if on_minima is not None else " " * 10
        verdict = "ok" if report["goals"][key]["met"] else "MISSED"
        print(f"{key:<24} {value:>8.3f} {shown}  {op} {limit:<6} {verdict}")
    print(f"\n{'fused vs previous path':<24} {'fused':>8} {'unfused':>8}  (medians; on minima)")
    for label, fused, unfused in (
        ("CAT K=2 / floor", "cat_over_floor", "unfused_cat_over_floor"),
        ("CAT K=32 / K=1", "cat_k32_over_k1", "unfused_cat_k32_over_k1"),
    ):
        minima = report["ratios_of_minima"]
        print(
            f"{label:<24} {report[fused]:>8.3f} {report[unfused]:>8.3f}"
            f"  ({minima[fused]:.3f}; {minima[unfused]:.3f})"
        )
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
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about 2 minutes)")
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
    parser.add_argument("--rounds", type=int, default=20, help="rounds of --paired")
    parser.add_argument(
        "--rank-ops", action="store_true", help="time the rank-R matmuls against the base's"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--skills-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.skills_file)
    elif args.profile:
        run_profile(args.profile)
    elif args.paired:
        run_paired(args)
    elif args.rank_ops:
        run_rank_ops(args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
