#!/usr/bin/env bash
# The GPU checks, for a lent single-GPU machine (torch, transformers, peft and accelerate
# installed; no pytest, no axolotl, no network): the tests marked `gpu` (tests/test_gpu.py:
# FSDP2 and ZeRO-3 on one device rank, bf16 + sdpa fit and plain-PEFT reload, `axolotl train`
# with bf16 and sample packing, bitsandbytes nf4/int8), then the GPU benchmark
# (scripts/bench/gpu.py). Run from anywhere; it works in the repo.
#
#   scripts/tools/gpu_checks.sh                 on the GPU
#   scripts/tools/gpu_checks.sh --device cpu    a dry run on the CPU (CAT_GPU_DEVICE=cpu: tiny
#                                               sizes, gloo; the benchmark with --smoke)
#   OUT=/tmp/x scripts/tools/gpu_checks.sh      outputs there (default: $OUT, else a temp folder)
#   PYTHON=.venv/bin/python scripts/tools/gpu_checks.sh --device cpu
#
# Wheels in .whl/ are installed first (--no-deps, into /tmp/cat-site): at least pytest,
# pluggy and iniconfig (`pip download -d .whl pytest`); deepspeed, bitsandbytes, axolotl and
# what axolotl needs beyond the image are optional: their checks skip without them.
# Writes to OUT: gpu-tests.log and gpu-tests.xml (JUnit), bench_gpu.json and bench_gpu.log.
# Exits non-zero if a test failed or the benchmark failed.
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
case $DEVICE in cuda | cpu) ;; *) echo "--device must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac
PY=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d -t cat-gpu-checks.XXXXXX)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1
say() { echo "[gpu_checks] $*"; }
say "device $DEVICE, outputs in $OUT"
"$PY" -c 'import platform, peft, torch, transformers
print(f"[gpu_checks] python {platform.python_version()}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}, "
      f"cuda available {torch.cuda.is_available()}")'
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

if compgen -G ".whl/*.whl" > /dev/null; then  # what the image lacks, carried
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/cat-site .whl/*.whl \
    && export PYTHONPATH=/tmp/cat-site${PYTHONPATH:+:$PYTHONPATH}
fi
# the package itself, as a user installs it with the image's own packages; failing that, from
# the repo (the workers the tests start import it too)
if [ "$DEVICE" = cuda ] && timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation . \
    && (cd /tmp && "$PY" -c "import axolotl_cat_plugin.core"); then
  say "PASS install (pip install --no-deps .)"
else
  [ "$DEVICE" = cuda ] && say "FAIL install (pip install --no-deps .): the repo goes on PYTHONPATH"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import pytest" 2> /dev/null; then
  say "no pytest: carry its wheels (pip download -d .whl pytest) and run again" >&2
  exit 2
fi

status=0
# -s: the checks print what they measured (tokens/s, differences, peak memory) as they go
CAT_GPU_DEVICE=$DEVICE "$PY" -m pytest tests/test_gpu.py -m gpu -v -s -rs -p no:cacheprovider \
  --basetemp="$OUT/pytest" --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
tests=${PIPESTATUS[0]}
[ "$tests" -eq 0 ] || status=1

bench=(--out "$OUT/bench_gpu.json")
[ "$DEVICE" = cpu ] && bench+=(--smoke)
"$PY" scripts/bench/gpu.py "${bench[@]}" 2>&1 | tee "$OUT/bench_gpu.log"
benchmark=${PIPESTATUS[0]}
[ "$benchmark" -eq 0 ] || status=1
say "pytest -m gpu exit $tests, benchmark exit $benchmark (outputs in $OUT)"
exit $status
