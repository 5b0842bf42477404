"""What only a GPU shows (marker `gpu`): skipped without CUDA; scripts/tools/gpu_checks.sh runs
them on a lent GPU machine, then the GPU benchmark.

- fsdp2: tests/workers/fsdp2_check.py under torchrun with ONE rank (nccl): the FSDP2 code path
  (fully_shard per decoder layer and root, DTensor coefficients, collective fold, rank-0
  export) on the device, against an unsharded run of the same batches. One GPU cannot shard
  across ranks: the two-rank proof is tests/test_fsdp2.py (CPU).
- zero3: tests/workers/zero3_check.py likewise under DeepSpeed ZeRO-3, every parameter
  partitioned (needs deepspeed; two ranks: tests/test_zero3.py).
- bf16: attach_cat on a ~124M-parameter Llama built from a config, loaded in bf16 with sdpa:
  the coefficients are fp32 and the only trainable parameters, stay fp32 through AdamW steps
  under bf16 autocast, the loss stays finite, the coefficients move (tokens/s is printed);
  the export reloaded by plain PEFT on a fresh bf16 base gives the CAT logits to bf16
  tolerance (a few ulp, far below what the adapter changes).
- axolotl: `axolotl train` (launcher python) on the tiny world with bf16, sample_packing and
  sdpa attention; skipped without axolotl (the lent image has none: carry its wheels).
- qlora: attach_cat on a base loaded 4-bit (nf4) and 8-bit by bitsandbytes (fp32 compute), a
  few AdamW steps with an eval forward before each: every coefficient gets a gradient at
  every step and moves; the export reloaded by plain PEFT on a fresh quantized base gives the
  CAT logits (<= 1e-4) and equals the full-precision base's export for the same coefficients.
  Skipped without bitsandbytes.

fsdp2, zero3, bf16 and qlora each run granularity `core` (an fp32 R x R core per module, the
other code path of the fused Function) besides the per-skill granularities.

CAT_GPU_DEVICE=cpu runs them as a dry run on the CPU (gloo, tiny sizes, a few steps; the
axolotl check stays on the GPU): it shows the checks run and their assertions hold, and
proves nothing about a GPU.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path

import pytest
import torch
from compare import export_difference, largest_difference
from workers.launch import finish, launch, ranks

from axolotl_cat_plugin.core.state import is_coefficient

DEVICE = os.environ.get("CAT_GPU_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not DEVICE, reason="no CUDA device (CAT_GPU_DEVICE=cpu runs these as a CPU dry run)"
    ),
]
ON_GPU = DEVICE == "cuda"
BACKEND = "nccl" if ON_GPU else "gloo"
STEPS = 20 if ON_GPU else 3
TOLERANCE = 1e-5


def worker_runs(worker: str, world, root: Path, configs: list[str], env=None) -> Path:
    """The worker under torchrun with one rank on DEVICE, then one plain process (no process
    group, no sharding) over the same batches: root/one-rank and root/plain."""
    args = ["--device", DEVICE, "--configs", *configs]
    one_rank = launch(
        worker, world, root / "one-rank", processes=1, args=[*args, "--backend", BACKEND], env=env
    )
    print(finish(one_rank, timeout=240, name=f"{worker} under torchrun"))
    plain = launch(worker, world, root / "plain", processes=0, args=args, env=env)
    print(finish(plain, timeout=180, name=f"{worker}, one plain process"))
    return root


# ---------------------------------------------------------------- fsdp2

FSDP2_CONFIGS = ["module:free", "layer:softmax", "rank:free", "core:free"]


@pytest.fixture(scope="module")
def fsdp2(world, tmp_path_factory):
    return worker_runs("fsdp2_check.py", world, tmp_path_factory.mktemp("fsdp2"), FSDP2_CONFIGS)


@pytest.mark.parametrize("config", [spec.replace(":", "-") for spec in FSDP2_CONFIGS])
def test_fsdp2_on_the_device_fits_what_the_unsharded_run_fits(fsdp2, config):
    sharded, single = fsdp2 / "one-rank" / config, fsdp2 / "plain" / config
    (record,), (reference,) = ranks(sharded), ranks(single)
    assert record["sharded"] and record["model_type"].startswith("FSDP")
    assert all(v["dtensor"] and v["dtype"] == "torch.float32" for v in record["alphas"].values())
    assert record["fold_types"] == ["Tensor"]  # gathered: no DTensor reaches the export
    tensors, coefficients = export_difference(sharded, single)
    alphas = largest_difference(record["alpha"], reference["alpha"])
    print(
        f"{config}: {record['model_type']}, fold on {record['fold_devices']}, max difference "
        f"to unsharded: adapter {tensors:.3g}, coefficients {alphas:.3g}, "
        f"exported coefficients {coefficients:.3g}"
    )
    assert max(tensors, alphas, coefficients) <= TOLERANCE


# ---------------------------------------------------------------- zero3

ZERO3_CONFIGS = ["module:free", "layer:softmax", "model:free", "core:free"]


@pytest.fixture(scope="module")
def zero3(world, tmp_path_factory):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (carry its wheel in .whl/)")
    env = None if ON_GPU else {"DS_ACCELERATOR": "cpu"}
    root = tmp_path_factory.mktemp("zero3")
    return worker_runs("zero3_check.py", world, root, ZERO3_CONFIGS, env=env)


@pytest.mark.parametrize("config", [spec.replace(":", "-") for spec in ZERO3_CONFIGS])
def test_zero3_on_the_device_fits_what_the_plain_run_fits(zero3, config):
    partitioned, single = zero3 / "one-rank" / config, zero3 / "plain" / config
    (record,) = ranks(partitioned)
    assert record["partitioned"]
    split = record["alphas"].values()
    assert all(v["partitioned"] and v["dtype"] == "torch.float32" for v in split)
    tensors, coefficients = export_difference(partitioned, single)
    print(
        f"{config}: frozen partitioned {record['frozen_partitioned']}/{record['frozen']}, max "
        f"difference to the plain run: adapter {tensors:.3g}, coefficients {coefficients:.3g}"
    )
    assert max(tensors, coefficients) <= TOLERANCE


# ---------------------------------------------------------------- bf16

BF16_SIZES = {  # cuda: ~124M parameters, untied embeddings; cpu: a dry run
    "cuda": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "cpu": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ),
}
BF16_SKILLS = {  # name: (rank, target modules)
    "math": (8, ["q_proj", "v_proj"]),
    "code": (8, ["k_proj", "o_proj", "up_proj"]),
    "prose": (16, ["q_proj", "gate_proj", "down_proj"]),
}


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def load_bf16(folder):
    import transformers
    from packaging.version import Version
    from transformers import LlamaForCausalLM

    dtype = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    kwargs = {dtype: torch.bfloat16, "attn_implementation": "sdpa"}
    return LlamaForCausalLM.from_pretrained(folder, **kwargs).to(DEVICE)


@pytest.fixture(scope="module", params=["module", "core"])
def bf16(request, tmp_path_factory):
    """Fit on a bf16 base under autocast, export, reload with plain PEFT: what each step saw.
    Once per granularity: `module` (the paper's) and `core` (an fp32 R x R core per module)."""
    granularity = request.param
    from peft import LoraConfig, PeftModel
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from axolotl_cat_plugin.core import CatConfig, attach_cat, export_cat
    from axolotl_cat_plugin.core.format import peft_key

    out = tmp_path_factory.mktemp("bf16")
    batch, seq = (8, 512) if ON_GPU else (2, 32)
    torch.manual_seed(0)
    config = LlamaConfig(
        **BF16_SIZES[DEVICE], max_position_embeddings=2048, tie_word_embeddings=False
    )
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in base.parameters())
    base.save_pretrained(out / "base")
    skills = []
    for index, (name, (rank, targets)) in enumerate(BF16_SKILLS.items()):
        generator = torch.Generator().manual_seed(100 + index)
        tensors = {}
        for module_name, module in base.named_modules():
            if module_name.rsplit(".", 1)[-1] in targets:
                d_out, d_in = module.weight.shape
                a = torch.randn(rank, d_in, generator=generator) / d_in**0.5
                tensors[peft_key(module_name, "A")] = a
                b = torch.randn(d_out, rank, generator=generator) * 0.02
                tensors[peft_key(module_name, "B")] = b
        folder = out / "skills" / name
        lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, task_type="CAUSAL_LM")
        lora.save_pretrained(folder)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        skills.append(str(folder))
    del base

    config_cat = CatConfig(skills, dropout=0.0, granularity=granularity)
    model = attach_cat(load_bf16(out / "base"), config_cat).to(DEVICE)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    facts = {
        "attention": model.config._attn_implementation,
        "trainable": sorted(trainable),
        "dtypes_before": {p.dtype for p in trainable.values()},
        "base_dtypes": {p.dtype for n, p in model.named_parameters() if "base_layer" in n},
    }
    start = {n: p.detach().clone() for n, p in trainable.items()}
    print(
        f"base: {params / 1e6:.1f}M parameters, bf16, attention {facts['attention']}, "
        f"{len(skills)} skills, granularity {granularity}, device {DEVICE}"
    )

    generator = torch.Generator().manual_seed(0)
    warmup = 2
    data = torch.randint(4, config.vocab_size, (warmup + STEPS, batch, seq), generator=generator)
    optimizer = torch.optim.AdamW(trainable.values(), lr=0.05, weight_decay=0.0)
    model.train()
    losses = []
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + STEPS):
        if step == warmup:
            sync()
            began = time.perf_counter()
        ids = data[step].to(DEVICE)
        with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync()
    elapsed = time.perf_counter() - began
    facts["losses"] = [float(x) for x in losses]
    facts["dtypes_after"] = {p.dtype for p in trainable.values()}
    facts["moved"] = max(float((p.detach() - start[n]).abs().max()) for n, p in trainable.items())
    memory = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if ON_GPU else ""
    print(
        f"training: {STEPS} timed steps of {batch} x {seq} tokens, "
        f"{STEPS * batch * seq / elapsed:,.0f} tokens/s (forward + backward + AdamW, bf16 "
        f"autocast){memory}; losses: first {facts['losses'][0]:.4f}, "
        f"last {facts['losses'][-1]:.4f}"
    )

    export_cat(model, out / "export")
    model.eval()
    eval_ids = torch.randint(4, config.vocab_size, (2, min(seq, 128)), generator=generator)
    eval_ids = eval_ids.to(DEVICE)
    with torch.no_grad():
        facts["cat"] = model(input_ids=eval_ids).logits.float()
        reloaded = PeftModel.from_pretrained(load_bf16(out / "base"), out / "export")
        reloaded = reloaded.to(DEVICE).eval()
        facts["reloaded"] = reloaded(input_ids=eval_ids).logits.float()
        with reloaded.disable_adapter():
            facts["base"] = reloaded(input_ids=eval_ids).logits.float()
    return facts


def test_bf16_base_runs_sdpa_and_only_the_fp32_coefficients_train(bf16):
    assert bf16["attention"] == "sdpa"
    assert bf16["trainable"] and all(is_coefficient(n) for n in bf16["trainable"])
    assert bf16["dtypes_before"] == {torch.float32}
    assert bf16["base_dtypes"] == {torch.bfloat16}


def test_bf16_autocast_fit_stays_finite_and_fp32_and_moves_the_coefficients(bf16):
    assert all(map(math.isfinite, bf16["losses"]))
    assert bf16["dtypes_after"] == {torch.float32}
    assert bf16["moved"] > 1e-2, f"the coefficients moved by {bf16['moved']:.3g} only"


def test_bf16_export_reloaded_by_plain_peft_gives_the_cat_logits(bf16):
    # bf16 tolerance: both models round every layer's output to bf16, and one rounding that
    # goes the other way in an early layer spreads to every later one; so they differ by a few
    # units in the last place (ulp) of the logits. On the CPU the ~124M model gives 2 ulp at
    # most, 0.3 on average, where the adapter itself moves the logits by ~12 ulp on average.
    cat, reloaded, base = bf16["cat"], bf16["reloaded"], bf16["base"]
    ulp = 2.0 ** (math.floor(math.log2(float(cat.abs().max()))) - 7)  # bf16: 8-bit mantissa
    error = float((cat - reloaded).abs().max()) / ulp
    mean_error = float((cat - reloaded).abs().mean()) / ulp
    mean_effect = float((cat - base).abs().mean()) / ulp
    agree = float((cat.argmax(-1) == reloaded.argmax(-1)).float().mean())
    print(
        f"logits, in bf16 ulp of the largest logit ({ulp:.3g}): CAT vs reloaded export max "
        f"|diff| {error:.2f}, mean {mean_error:.3f}; the adapter's own effect (CAT vs base) "
        f"mean {mean_effect:.2f}; top-1 agreement {agree:.4f}"
    )
    assert mean_effect > 2, "the adapter changes the logits (mean > 2 ulp)"
    assert error <= 8 and mean_error <= 1, "the reloaded export matches (max <= 8 ulp, mean <= 1)"


# ---------------------------------------------------------------- axolotl


def test_axolotl_train_with_bf16_sample_packing_and_sdpa(world, tmp_path):
    if not ON_GPU:
        pytest.skip("bf16 with sample packing is the GPU's configuration")
    if importlib.util.find_spec("axolotl") is None:
        pytest.skip("axolotl is not installed (carry it and its missing dependencies in .whl/)")
    from axolotl_runner import axolotl, write_config
    from fixtures import mix_rows, write_jsonl

    mix = write_jsonl(tmp_path / "mix.jsonl", mix_rows(32))
    config = write_config(
        {**world, "mix": mix},
        tmp_path,
        bf16=True,
        sample_packing=True,
        attn_implementation="sdpa",
        max_steps=10,
    )
    result = axolotl("train", str(config), "--launcher", "python", cwd=tmp_path)
    log = result.stdout + result.stderr
    progress = [line for line in log.splitlines() if "'loss'" in line or "train_runtime" in line]
    print("\n".join(progress[-3:]))
    assert result.returncode == 0, log[-6000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / "cat_coefficients.json").exists()


# ---------------------------------------------------------------- qlora

QLORA_SIZES = {
    "cpu": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=128),
    "cuda": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, vocab_size=8192),
}
QLORA_STEPS = 5 if ON_GPU else 3


@pytest.fixture(scope="module")
def qlora_world(tmp_path_factory):
    """A Llama built from a config and two skill LoRAs on it, saved in full precision."""
    pytest.importorskip("bitsandbytes", reason="carry its wheel in .whl/")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = tmp_path_factory.mktemp("qlora")
    torch.manual_seed(0)
    config = LlamaConfig(**QLORA_SIZES[DEVICE], num_attention_heads=4, num_key_value_heads=2)
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
    ids = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    return {"root": out, "skills": skills, "ids": ids.to(DEVICE)}


@pytest.mark.parametrize("granularity", ["module", "core"])
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_qlora_fits_exports_and_reloads_on_a_quantized_base(qlora_world, mode, granularity):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from axolotl_cat_plugin import CatConfig, attach_cat, export_cat
    from axolotl_cat_plugin.core.layers.quantized import keep_gradients_through_4bit_layers

    out, skills, ids = qlora_world["root"], qlora_world["skills"], qlora_world["ids"]
    options = {  # fp32 compute
        "nf4": dict(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
        "int8": dict(load_in_8bit=True),
    }[mode]

    def load():
        return AutoModelForCausalLM.from_pretrained(
            out / "base",
            dtype=torch.float32,
            quantization_config=BitsAndBytesConfig(**options),
            device_map={"": 0} if ON_GPU else "cpu",
        )

    model = attach_cat(load(), CatConfig(skills=skills, granularity=granularity))
    alphas = [p for n, p in model.named_parameters() if is_coefficient(n)]
    start = [a.detach().clone() for a in alphas]
    optimizer = torch.optim.AdamW(alphas, lr=0.05, weight_decay=0.0)
    every_step = True
    for _ in range(QLORA_STEPS):
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)  # an evaluation between steps
        model.train()
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        every_step &= all(a.grad is not None and bool(a.grad.abs().sum() > 0) for a in alphas)
        optimizer.step()
    assert every_step, f"not all {len(alphas)} coefficients got a gradient at every step"
    assert all(bool((a - s).abs().max() > 0) for a, s in zip(alphas, start, strict=True))

    model.eval()
    with torch.no_grad():
        cat_logits = model(input_ids=ids).logits.float()
    export = out / f"export-{mode}-{granularity}"
    export_cat(model, export)
    reloaded = PeftModel.from_pretrained(load(), export).eval()
    keep_gradients_through_4bit_layers(reloaded)  # the same bitsandbytes kernel as CAT's
    with torch.no_grad():
        error = float((reloaded(input_ids=ids).logits.float() - cat_logits).abs().max())
    print(f"{mode}, {granularity}: plain PEFT on a fresh {mode} base, max |diff| {error:.2e}")
    assert error <= 1e-4

    full = attach_cat(
        AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32),
        CatConfig(skills=skills, granularity=granularity),
    )
    full_alphas = [p for n, p in full.named_parameters() if is_coefficient(n)]
    with torch.no_grad():
        for mine, theirs in zip(full_alphas, alphas, strict=True):
            mine.copy_(theirs.cpu())
    export_cat(full, out / f"full-{mode}-{granularity}")
    ours = load_file(str(export / "adapter_model.safetensors"))
    theirs = load_file(str(out / f"full-{mode}-{granularity}" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
