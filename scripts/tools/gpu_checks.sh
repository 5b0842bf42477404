#!/usr/bin/env bash
# CAT checks for a lent single-GPU machine (an H100; torch, transformers, peft and accelerate
# installed, no axolotl, no network), in a few minutes. Run from anywhere; it works in the repo.
#
#   scripts/tools/gpu_checks.sh                        the GPU (cuda, nccl, the ~124M-parameter model)
#   PYTHON=.venv/bin/python scripts/tools/gpu_checks.sh --device cpu
#                                                a dry run of the same Python on the CPU (gloo,
#                                                a tiny model, no install)
#   OUT=/tmp/x scripts/tools/gpu_checks.sh             keep the outputs there (default: a temp folder)
#
# What each check proves (one PASS/FAIL line each, and a summary at the end):
#   install   `pip install --no-deps .` works with the image's own packages (GPU runs only;
#             if it fails, the other checks import the package from the repo instead)
#   fsdp2     tests/workers/fsdp2_check.py under torchrun with ONE rank (nccl on the GPU): the FSDP2
#             code path (fully_shard per decoder layer and root, DTensor coefficients, collective
#             fold, rank-0 export) on CUDA, against an unsharded run of the same batches. One
#             GPU cannot shard across ranks: the two-rank proof is tests/test_fsdp2.py (CPU).
#   zero3     tests/workers/zero3_check.py under torchrun with ONE rank (nccl on the GPU), DeepSpeed
#             ZeRO-3 with every parameter partitioned: the fold gathers factors and coefficients
#             with GatheredParameters, against a plain run of the same batches. Needs deepspeed
#             (carry its wheel: .whl/ is installed first when present). Two ranks: CPU tests.
#   bf16      attach_cat on a Llama built from a config (~124M parameters; tiny on the CPU),
#             loaded in bf16 with sdpa attention: the coefficients are fp32 and the only
#             trainable parameters, stay fp32 through a few AdamW steps under bf16 autocast,
#             the loss stays finite and the coefficients move; tokens/s is reported. The export
#             reloaded with plain PEFT on a fresh bf16 base gives the CAT model's logits to bf16
#             tolerance (a few ulp of the logits, far below what the adapter changes).
#   axolotl   `axolotl train` (axolotl.cli.main, launcher python) on the tiny world with bf16,
#             sample_packing and sdpa attention, on the GPU; SKIP without axolotl (carry it
#             and its missing dependencies as wheels in .whl/).
#   qlora     scripts/qlora_check.py: attach_cat on a Llama loaded 4-bit (nf4) and 8-bit by
#             bitsandbytes on the device (fp32 compute), a few AdamW steps with an eval forward
#             before each: every coefficient gets a gradient at every step and moves; the export
#             reloaded by plain PEFT on a fresh quantized base gives the CAT logits (<= 1e-4); the
#             exported tensors equal those of the same coefficients on the full-precision base.
#             Needs bitsandbytes (carry its wheel in .whl/); without it the check says SKIP.
#             The CPU dry run (--device cpu) is what tests/test_real_skills.py also covers.
# Throughput is a separate run: python scripts/bench/gpu.py (writes docs/measurements/).
set -uo pipefail
cd "$(dirname "$0")/../.."

DEVICE=cuda
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --device=*) DEVICE=${1#--device=}; shift ;;
    *) echo "unknown argument: $1 (only --device cuda|cpu)" >&2; exit 2 ;;
  esac
done
case $DEVICE in
  cuda) BACKEND=nccl SIZE=full STEPS=20 ;;
  cpu) BACKEND=gloo SIZE=tiny STEPS=3 ;;
  *) echo "--device must be cuda or cpu, got $DEVICE" >&2; exit 2 ;;
esac
PY=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d -t cat-gpu-checks.XXXXXX)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "[gpu_checks] device $DEVICE, outputs in $OUT"
"$PY" - <<'PY'
import platform

import peft
import torch
import transformers

print(
    f"[gpu_checks] python {platform.python_version()}, torch {torch.__version__}, "
    f"transformers {transformers.__version__}, peft {peft.__version__}, "
    f"cuda available {torch.cuda.is_available()}"
)
PY
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi

RESULTS=()
record() {  # record NAME STATUS SECONDS
  RESULTS+=("$2 $1 ($3 s)")
  echo "[gpu_checks] $2 $1 ($3 s)"
}

# --- install -------------------------------------------------------------------------------
if [ "$DEVICE" = cuda ]; then
  started=$SECONDS
  if compgen -G ".whl/*.whl" > /dev/null; then  # packages the image lacks (deepspeed), carried
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/cat-site .whl/*.whl \
      && export PYTHONPATH=/tmp/cat-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation . \
      && (cd /tmp && "$PY" -c "import axolotl_cat_plugin.core"); then
    record install PASS $((SECONDS - started))
  else
    record install FAIL $((SECONDS - started))
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
fi

# --- fsdp2: one rank on the device, against the unsharded run ------------------------------
started=$SECONDS
CONFIGS=(module:free layer:softmax rank:free)
fsdp2_ok=1
timeout 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 tests/workers/fsdp2_check.py \
  --device "$DEVICE" --backend "$BACKEND" --out "$OUT/fsdp2" --configs "${CONFIGS[@]}" \
  > "$OUT/fsdp2.log" 2>&1 || fsdp2_ok=0
if [ $fsdp2_ok = 1 ]; then
  W="$OUT/fsdp2/world"
  timeout 120 "$PY" tests/workers/fsdp2_check.py --device "$DEVICE" --out "$OUT/fsdp2-ref" \
    --base "$W/base" --skills "$W/skills/math" "$W/skills/code" "$W/skills/prose" \
    --configs "${CONFIGS[@]}" >> "$OUT/fsdp2.log" 2>&1 || fsdp2_ok=0
fi
if [ $fsdp2_ok = 1 ]; then
  "$PY" - "$OUT" "${CONFIGS[@]}" <<'PY' || fsdp2_ok=0
"""Compare the one-rank FSDP2 exports with the unsharded ones (same batches, same device)."""

import json
import sys
from pathlib import Path

from safetensors.torch import load_file

out, configs, ok = Path(sys.argv[1]), sys.argv[2:], True
for spec in configs:
    folder = spec.replace(":", "-")
    sharded, single = out / "fsdp2" / folder, out / "fsdp2-ref" / folder
    record = json.loads((sharded / "rank0.json").read_text())
    reference = json.loads((single / "rank0.json").read_text())
    a = load_file(sharded / "adapter_model.safetensors")
    b = load_file(single / "adapter_model.safetensors")
    tensors = max(float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0 for k in a)
    alpha = max(
        abs(x - y)
        for name, values in record["alpha"].items()
        for x, y in zip(values, reference["alpha"][name], strict=True)
    )
    alphas = record["alphas"].values()
    dtensors = all(v["dtensor"] and v["dtype"] == "torch.float32" for v in alphas)
    good = a.keys() == b.keys() and tensors <= 1e-5 and alpha <= 1e-5 and dtensors
    good &= record["model_type"].startswith("FSDP") and record["fold_types"] == ["Tensor"]
    print(
        f"  {spec}: {record['model_type']}, fp32 DTensor coefficients {dtensors}, fold on "
        f"{record['fold_devices']}, max difference to unsharded: adapter {tensors:.3g}, "
        f"coefficients {alpha:.3g} -> {'ok' if good else 'WRONG'}"
    )
    ok &= good
sys.exit(0 if ok else 1)
PY
fi
[ $fsdp2_ok = 1 ] && status=PASS || { status=FAIL; tail -40 "$OUT/fsdp2.log"; }
record fsdp2 $status $((SECONDS - started))

# --- zero3: one rank on the device, against the plain run ----------------------------------
started=$SECONDS
CONFIGS=(module:free layer:softmax adapter:free)
zero3_ok=1
timeout 240 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 tests/workers/zero3_check.py \
  --device "$DEVICE" --backend "$BACKEND" --out "$OUT/zero3" --configs "${CONFIGS[@]}" \
  > "$OUT/zero3.log" 2>&1 || zero3_ok=0
if [ $zero3_ok = 1 ]; then
  W="$OUT/zero3/world"
  timeout 120 "$PY" tests/workers/zero3_check.py --device "$DEVICE" --out "$OUT/zero3-ref" \
    --base "$W/base" --skills "$W/skills/math" "$W/skills/code" "$W/skills/prose" \
    --configs "${CONFIGS[@]}" >> "$OUT/zero3.log" 2>&1 || zero3_ok=0
fi
if [ $zero3_ok = 1 ]; then
  "$PY" - "$OUT" "${CONFIGS[@]}" <<'PY' || zero3_ok=0
"""Compare the one-rank ZeRO-3 exports with the plain ones (same batches, same device)."""

import json
import sys
from pathlib import Path

from safetensors.torch import load_file

out, configs, ok = Path(sys.argv[1]), sys.argv[2:], True
for spec in configs:
    folder = spec.replace(":", "-")
    partitioned, single = out / "zero3" / folder, out / "zero3-ref" / folder
    record = json.loads((partitioned / "rank0.json").read_text())
    a = load_file(partitioned / "adapter_model.safetensors")
    b = load_file(single / "adapter_model.safetensors")
    tensors = max(float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0 for k in a)
    alphas = record["alphas"].values()
    split = all(v["partitioned"] and v["dtype"] == "torch.float32" for v in alphas)
    good = a.keys() == b.keys() and tensors <= 1e-5 and split and record["partitioned"]
    print(
        f"  {spec}: fp32 partitioned coefficients {split}, frozen partitioned "
        f"{record['frozen_partitioned']}/{record['frozen']}, max difference to the plain run: "
        f"adapter {tensors:.3g} -> {'ok' if good else 'WRONG'}"
    )
    ok &= good
sys.exit(0 if ok else 1)
PY
fi
[ $zero3_ok = 1 ] && status=PASS || { status=FAIL; tail -40 "$OUT/zero3.log"; }
record zero3 $status $((SECONDS - started))

# --- bf16: fit on the device, export, reload with plain PEFT -------------------------------
started=$SECONDS
if timeout 300 "$PY" - "$DEVICE" "$SIZE" "$STEPS" "$OUT/bf16" <<'PY'; then
"""bf16 base with sdpa, fp32 coefficients, autocast training, export, plain-PEFT reload."""

import math
import sys
import time
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from axolotl_cat_plugin.core import CatConfig, attach_cat, export_cat
from axolotl_cat_plugin.core.fold import peft_key

device, size, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
SIZES = {  # full: ~124M parameters, untied embeddings
    "full": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ),
}
BATCH, SEQ = {"full": (8, 512), "tiny": (2, 32)}[size]
SKILLS = {  # name: (rank, target modules)
    "math": (8, ["q_proj", "v_proj"]),
    "code": (8, ["k_proj", "o_proj", "up_proj"]),
    "prose": (16, ["q_proj", "gate_proj", "down_proj"]),
}
DTYPE = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
failures = []


def check(condition, message):
    print(f"  {'ok' if condition else 'WRONG'}: {message}", flush=True)
    if not condition:
        failures.append(message)


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def load(folder):
    kwargs = {DTYPE: torch.bfloat16, "attn_implementation": "sdpa"}
    return LlamaForCausalLM.from_pretrained(folder, **kwargs).to(device)


torch.manual_seed(0)
config = LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False)
base = LlamaForCausalLM(config).to(torch.bfloat16)
params = sum(p.numel() for p in base.parameters())
base.save_pretrained(out / "base")
skills = []
for index, (name, (rank, targets)) in enumerate(SKILLS.items()):
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

model = attach_cat(load(out / "base"), CatConfig(skills, dropout=0.0)).to(device)
attention = model.config._attn_implementation
print(
    f"  base: {params / 1e6:.1f}M parameters, bf16, attention {attention}, {len(skills)} skills, "
    f"device {device}",
    flush=True,
)
check(attention == "sdpa", "the base runs sdpa attention")
trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
only_alphas = bool(trainable) and all(n.endswith("cat_alpha") for n in trainable)
check(only_alphas, f"only the {len(trainable)} cat_alpha tensors train")
check(all(p.dtype == torch.float32 for p in trainable.values()), "the coefficients are fp32")
base_dtypes = {p.dtype for n, p in model.named_parameters() if "base_layer" in n}
check(base_dtypes == {torch.bfloat16}, f"the base weights are bf16 ({base_dtypes})")
start = {n: p.detach().clone() for n, p in trainable.items()}

generator = torch.Generator().manual_seed(0)
warmup = 2
data = torch.randint(4, config.vocab_size, (warmup + steps, BATCH, SEQ), generator=generator)
optimizer = torch.optim.AdamW(trainable.values(), lr=0.05, weight_decay=0.0)
model.train()
losses = []
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
for step in range(warmup + steps):
    if step == warmup:
        sync()
        began = time.perf_counter()
    ids = data[step].to(device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(loss.detach())
sync()
elapsed = time.perf_counter() - began
losses = [float(x) for x in losses]
memory = ""
if device == "cuda":
    memory = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
print(
    f"  training: {steps} timed steps of {BATCH} x {SEQ} tokens, "
    f"{steps * BATCH * SEQ / elapsed:,.0f} tokens/s (forward + backward + AdamW, bf16 "
    f"autocast){memory}",
    flush=True,
)
print(f"  losses: first {losses[0]:.4f}, last {losses[-1]:.4f}", flush=True)
check(all(map(math.isfinite, losses)), "every loss is finite")
check(all(p.dtype == torch.float32 for p in trainable.values()), "the coefficients are still fp32")
moved = max(float((p.detach() - start[n]).abs().max()) for n, p in trainable.items())
check(moved > 1e-2, f"the coefficients moved (by up to {moved:.3g})")

export_cat(model, out / "export")
model.eval()
eval_ids = torch.randint(4, config.vocab_size, (2, min(SEQ, 128)), generator=generator).to(device)
with torch.no_grad():
    cat_logits = model(input_ids=eval_ids).logits.float()
    reloaded = PeftModel.from_pretrained(load(out / "base"), out / "export").to(device).eval()
    plain_logits = reloaded(input_ids=eval_ids).logits.float()
    with reloaded.disable_adapter():
        base_logits = reloaded(input_ids=eval_ids).logits.float()
# bf16 tolerance: both models round every layer's output to bf16, and one rounding that goes
# the other way in an early layer spreads to every later one; so they differ by a few units in
# the last place (ulp) of the logits. On the CPU the ~124M model gives 2 ulp at most, 0.3 on
# average, where the adapter itself moves the logits by ~12 ulp on average.
ulp = 2.0 ** (math.floor(math.log2(float(cat_logits.abs().max()))) - 7)  # bf16: 8-bit mantissa
error = float((cat_logits - plain_logits).abs().max()) / ulp
mean_error = float((cat_logits - plain_logits).abs().mean()) / ulp
mean_effect = float((cat_logits - base_logits).abs().mean()) / ulp
agree = float((cat_logits.argmax(-1) == plain_logits.argmax(-1)).float().mean())
print(
    f"  logits, in bf16 ulp of the largest logit ({ulp:.3g}): CAT vs reloaded export max "
    f"|diff| {error:.2f}, mean {mean_error:.3f}; the adapter's own effect (CAT vs base) mean "
    f"{mean_effect:.2f}; top-1 agreement {agree:.4f}",
    flush=True,
)
check(mean_effect > 2, "the adapter changes the logits (mean > 2 ulp)")
check(error <= 8 and mean_error <= 1, "the reloaded export matches (max <= 8 ulp, mean <= 1)")
sys.exit(1 if failures else 0)
PY
  status=PASS
else
  status=FAIL
fi
record bf16 $status $((SECONDS - started))

# --- axolotl: `axolotl train` itself on the device: bf16, sample packing, sdpa --------------
# The tiny world (scripts/demo/tiny_world.py) and example_yamls/tiny-cpu/cat.yml with bf16: true,
# sample_packing: true, attn_implementation: sdpa; PASS when the run writes the folded export.
# Needs axolotl and what the image lacks (trl, datasets, pydantic, ...) carried as wheels in
# .whl/ (installed into /tmp/cat-site above); SKIP when `import axolotl` fails.
started=$SECONDS
if [ "$DEVICE" = cuda ] && "$PY" -c "import axolotl.cli.main" > "$OUT/axolotl.log" 2>&1; then
  W="$OUT/axolotl"
  axolotl_ok=1
  timeout 120 "$PY" scripts/demo/tiny_world.py "$W/world" >> "$OUT/axolotl.log" 2>&1 || axolotl_ok=0
  "$PY" - "$W" <<'PY' >> "$OUT/axolotl.log" 2>&1 || axolotl_ok=0
import sys
from pathlib import Path

import yaml

folder = Path(sys.argv[1])
world = folder / "world"
config = yaml.safe_load(Path("example_yamls/tiny-cpu/cat.yml").read_text())
config["base_model"] = str(world / "base")
config["cat_merge"]["adapters"] = [
    {"path": str(world / "skills" / name), "name": name} for name in ("math", "code", "prose")
]
config["datasets"][0]["path"] = str(world / "data" / "mix.jsonl")
config["dataset_prepared_path"] = str(folder / "prepared")
config["output_dir"] = str(folder / "out")
config.update(bf16=True, sample_packing=True, attn_implementation="sdpa", max_steps=10)
(folder / "cat.yml").write_text(yaml.safe_dump(config))
PY
  if [ $axolotl_ok = 1 ]; then
    timeout 300 "$PY" -m axolotl.cli.main train "$W/cat.yml" --launcher python \
      >> "$OUT/axolotl.log" 2>&1 || axolotl_ok=0
  fi
  if [ $axolotl_ok = 1 ] && [ -f "$W/out/adapter_model.safetensors" ] \
      && [ -f "$W/out/cat_coefficients.json" ]; then
    grep -E "'loss'|train_runtime" "$OUT/axolotl.log" | tail -3
    record axolotl PASS $((SECONDS - started))
  else
    tail -40 "$OUT/axolotl.log"
    record axolotl FAIL $((SECONDS - started))
  fi
else
  record axolotl SKIP $((SECONDS - started))
fi

# --- qlora: fit on a bitsandbytes 4-bit / 8-bit base, export, reload with plain PEFT ---------
started=$SECONDS
timeout 300 "$PY" scripts/qlora_check.py --device "$DEVICE" --size "$SIZE" --steps "$STEPS" \
  --out "$OUT/qlora"
case $? in
  0) status=PASS ;;
  3) status=SKIP ;;
  *) status=FAIL ;;
esac
record qlora $status $((SECONDS - started))

echo "[gpu_checks] summary:"
printf '  %s\n' "${RESULTS[@]}"
for line in "${RESULTS[@]}"; do
  case $line in FAIL*) exit 1 ;; esac
done
