# Sourced by demo.sh and demo/diagnostics.sh: cached stages, their progress, and running them
# side by side. The caller sets RUN (logs under $RUN/logs, Axolotl's prepared data under
# $RUN/prepared/NAME) and started (the $SECONDS its run began).

say() { # a line with the time since the demo started
  local elapsed=$((SECONDS - started))
  printf '[demo %d:%02d] %s\n' $((elapsed / 60)) $((elapsed % 60)) "$*"
}

# stage NAME OUTPUT_DIR INPUT_FILE... -- COMMAND...
# Sets STAGE_RAN to 1 when the command ran, 0 when the stage was cached.
stage() {
  local name=$1 out=$2 hash
  shift 2
  local inputs=()
  while [ "$1" != "--" ]; do inputs+=("$1"); shift; done
  shift
  hash=$(cat "${inputs[@]}" | sha256sum | cut -c1-16)
  if [ "$(cat "$out/.stage-hash" 2>/dev/null)" = "$hash" ]; then
    say "$name: cached ($out)"
    STAGE_RAN=0
    return 0
  fi
  say "$name -> $out (log: $RUN/logs/$name.log)"
  local t0=$SECONDS
  rm -rf "$out" "$RUN/prepared/$name"
  if ! "$@" > >(progress "$name" "$RUN/logs/$name.log") 2>&1; then
    sleep 1
    tail -n 30 "$RUN/logs/$name.log"
    echo "[demo] stage $name failed (full log: $RUN/logs/$name.log)" >&2
    exit 1
  fi
  sleep 0.2 # let the progress filter finish its line
  mkdir -p "$out"
  echo $((SECONDS - t0)) > "$out/.stage-seconds"
  echo "$hash" > "$out/.stage-hash"
  say "$name done in $((SECONDS - t0)) s"
  STAGE_RAN=1
}

# Keep the full log; on the terminal show the progress bars (tqdm) and our own lines. A stage
# running alone redraws its bar in place; side by side (SIDE_BY_SIDE=1), each stage prints a
# line per tenth of its training bar (the one without a description), with its name.
progress() {
  tee "$2" | awk -v name="$1" -v side="${SIDE_BY_SIDE:-0}" 'BEGIN { RS = "[\r\n]" }
    /[0-9]+\/[0-9]+ \[[0-9:]+</ {
      if (!side) { printf "\r    %s", substr($0, 1, 110); fflush(); bar = 1; next }
      if (/^ *[0-9]+%\|/ && match($0, /[0-9]+\/[0-9]+ \[[0-9:]+<[0-9:?]+/)) {
        bar_text = substr($0, RSTART, RLENGTH); split(bar_text, parts, "[/ ]")
        if (parts[2] >= 50 && int(10 * parts[1] / parts[2]) != last[parts[2]]) {
          last[parts[2]] = int(10 * parts[1] / parts[2]); print "    " name ": " bar_text "]"
          fflush()
        }
      }
      next
    }
    /^(wrote|demo world)/ {
      if (bar) { print ""; bar = 0 }; print "    " $0; fflush() }
    END { if (bar) print "" }'
}

# together "FUNCTION [ARG]" ...: run each function (one or more stages) side by side, one thread
# each: on a small CPU a tiny model gains little from a second thread, and Axolotl's start-up
# is single-threaded anyway.
together() {
  local pids=() spec failed=0
  for spec in "$@"; do
    # shellcheck disable=SC2086 # "skill manual" is a function and its argument
    (export OMP_NUM_THREADS=1 SIDE_BY_SIDE=1; $spec) &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  if [ "$failed" -ne 0 ]; then echo "[demo] a stage failed (logs in $RUN/logs)" >&2; exit 1; fi
}

show_table() { # RESULTS_JSON: the table eval_composition.py printed, also when its stage is cached
  python -c 'import json, sys; sys.path.insert(0, "scripts/demo"); import eval_composition as e
e.print_table(json.load(open(sys.argv[1])))' "$1"
}
