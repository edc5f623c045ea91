#!/usr/bin/env bash
# Issue 19's real-face recipe in ONE device call (<= 9 minutes), after the wheels and shards arrived.
#
#   scripts/real_recipe_gpu.sh              # on the warm GPU machine (last call of the sequence)
#   scripts/real_recipe_gpu.sh --dry-run    # on a CPU: the :cpu variant, a few steps, a data subset
#
# Trains AIFR then FAS (python -m mtlface_jax.recipes.lfw_utkface), evaluates on LFW folds 6-10 and
# the held-out UTKFace 20%, runs any extra eval.py commands on the trained checkpoint, and leaves in
# $OUT (flat, at most 8 files): report.json, report.txt, roc.png, the progression grid png,
# metrics_aifr.jsonl, metrics_fas.jsonl, recipe.log (nvidia-smi, versions, timings, log tail) and,
# with extra commands, extra_eval.tar.gz. The checkpoint stays on the machine (it does not come back).
#
# Environment:
#   OUT            output folder (the device tool sets it; default ./real_recipe_out)
#   PYTHON         interpreter (default python3)
#   WORK           training workdir (default /tmp/real_work; kept outside $OUT)
#   SHARDS         shard folder (default real_shards: pNN/ + manifest.json, carried beforehand)
#   CONFIG         recipe config (default configs/real_lfw_utkface.py; dry run: ...:cpu)
#   RECIPE_ARGS    more flags for the recipe, e.g. "--config.num_iter=4000 --config.fas_num_iter=600"
#   CALL_BUDGET_S  seconds this whole script may take (default 530, for a 540 s call): the recipe is
#                  stopped (SIGTERM) when only EXTRA_RESERVE_S (default 60 with EXTRA_EVAL, else 15)
#                  is left, so that copying and extra evaluations still fit; a stopped run still
#                  returns its log and metrics
#   EXTRA_EVAL     extra eval.py commands, one per line (or separated by ';;'): their arguments with
#                  {ckpt} (FAS workdir: encoder, heads, generator), {aifr} (AIFR workdir), {shards},
#                  {out} (a fresh folder per command) substituted, e.g.
#                  "--checkpoint={ckpt} --protocol=verification --synthetic --output_dir={out}"
#                  Data other than the shards must be carried along by the same call.
#   WHEEL_DIR      pieces from ../shared/tools/device-wheels (default /tmp/dw): installed into
#                  /tmp/site and put on PYTHONPATH unless tensorflow and ml_collections import already
#   LFW_DIR, UTKFACE_DIR   dry run only: the real folders to cut a subset from (../shared/data/...)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/real_recipe_out}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/real_work}
WHEEL_DIR=${WHEEL_DIR:-/tmp/dw}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/recipe.log
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1 && CALL_BUDGET_S=${CALL_BUDGET_S:-3600}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

install_wheels() {  # the install prefix printed by ../shared/tools/device-wheels, done once
  if "$PYTHON" -c "import tensorflow, ml_collections" 2>/dev/null; then return 0; fi
  if [ ! -d /tmp/site ]; then
    [ -f "$WHEEL_DIR/sizes" ] || { log "no $WHEEL_DIR/sizes: carry the wheel pieces first"; exit 2; }
    (cd "$WHEEL_DIR" && cat piece.* > bundle && "$PYTHON" - <<'PY'
with open('bundle', 'rb') as b:
  for line in open('sizes'):
    name, size = line.rsplit(' ', 1)
    with open(name, 'wb') as f:
      f.write(b.read(int(size)))
PY
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site ./*.whl) \
      || { log "wheel install failed"; exit 2; }
  fi
  export PYTHONPATH=$PYTHONPATH:/tmp/site
}

dry_run_data() {  # a subset of the real folders, shards, and tiny step counts
  local mini=$WORK/mini
  "$PYTHON" scripts/mini_real_data.py --lfw "${LFW_DIR:-../shared/data/lfw}" \
    --utkface "${UTKFACE_DIR:-../shared/data/utkface}" --out "$mini" >>"$LOG" 2>&1 || exit 3
  SHARDS=$WORK/shards
  "$PYTHON" -m mtlface_jax.real_data --lfw "$mini/lfw" --utkface "$mini/utkface" --out "$SHARDS" \
    --workers 2 >>"$LOG" 2>&1 || { log "shard preparation failed"; exit 3; }
  local classes
  classes=$("$PYTHON" -c "import json,sys; print(len(json.load(open(sys.argv[1]))['classes']))" \
    "$SHARDS/manifest.json")
  CONFIG=${CONFIG:-configs/real_lfw_utkface.py:cpu}
  RECIPE_ARGS="--config.model.num_classes=$classes --config.batch_size=8 --config.num_iter=3 \
--config.fas_num_iter=2 --config.optim.warmup=1 --config.optim.milestone=(1,2) \
--config.log_every=1 --config.checkpoint_every=3 ${RECIPE_ARGS:-}"
}

environment() {
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
      || echo "no nvidia-smi"
    "$PYTHON" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"
    "$PYTHON" -c "import tensorflow as tf; print('tensorflow', tf.__version__)"
  } >>"$LOG" 2>&1
}

run_recipe() {
  log "recipe: $CONFIG workdir=$WORK shards=$SHARDS args: ${RECIPE_ARGS:-}"
  local start=$SECONDS reserve=15
  [ -n "${EXTRA_EVAL:-}" ] && reserve=60
  local limit=$(( ${CALL_BUDGET_S:-530} - SECONDS - ${EXTRA_RESERVE_S:-$reserve} ))
  log "recipe time limit: $limit s"
  # shellcheck disable=SC2086  # RECIPE_ARGS holds several flags
  timeout --signal=TERM --kill-after=10 "$limit" \
    "$PYTHON" -m mtlface_jax.recipes.lfw_utkface --config="$CONFIG" --workdir="$WORK" \
    --config.data.face_shards.dir="$SHARDS" ${RECIPE_ARGS:-} >"$WORK/recipe_stdout.log" 2>&1
  local code=$?
  tail -n 300 "$WORK/recipe_stdout.log" >>"$LOG"
  log "recipe exit $code after $((SECONDS - start)) s"
  return $code
}

collect() {  # flat into $OUT: what issue 19 asks to bring back
  local eval_dir=$WORK/eval
  for f in report.json report.txt roc.png; do
    [ -f "$eval_dir/$f" ] && cp "$eval_dir/$f" "$OUT/$f"
  done
  local grid
  grid=$(ls "$eval_dir"/*grid*.png 2>/dev/null | head -n 1)
  [ -n "$grid" ] && cp "$grid" "$OUT/$(basename "$grid")"
  for stage in aifr fas; do
    [ -f "$WORK/$stage/metrics.jsonl" ] && cp "$WORK/$stage/metrics.jsonl" "$OUT/metrics_$stage.jsonl"
  done
}

extra_evals() {  # EXTRA_EVAL lines -> eval.py on the trained checkpoint, packed into one file
  [ -n "${EXTRA_EVAL:-}" ] || return 0
  local n=0 extra=$WORK/extra_eval
  rm -rf "$extra"; mkdir -p "$extra"
  while IFS= read -r line; do
    line=$(echo "$line" | sed 's/^ *//; s/ *$//')
    [ -z "$line" ] && continue
    n=$((n + 1))
    local dir=$extra/$n
    mkdir -p "$dir"
    line=${line//\{ckpt\}/$WORK/fas}; line=${line//\{aifr\}/$WORK/aifr}
    line=${line//\{shards\}/$SHARDS}; line=${line//\{out\}/$dir}
    echo "$line" >"$dir/command.txt"
    log "extra eval $n: $line"
    # shellcheck disable=SC2086  # one line holds several flags
    "$PYTHON" eval.py $line >"$dir/eval.log" 2>&1
    log "extra eval $n exit $?"
  done < <(echo "${EXTRA_EVAL//;;/$'\n'}")
  tar -czf "$OUT/extra_eval.tar.gz" -C "$WORK" extra_eval
}

log "real_recipe_gpu: dry_run=$dry root=$ROOT work=$WORK out=$OUT"
if [ $dry = 1 ]; then
  dry_run_data
else
  install_wheels
  SHARDS=${SHARDS:-real_shards}
  CONFIG=${CONFIG:-configs/real_lfw_utkface.py}
  [ -f "$SHARDS/manifest.json" ] || { log "no $SHARDS/manifest.json: carry the shards first"; exit 2; }
  du -sh "$SHARDS" >>"$LOG" 2>&1
fi
environment
run_recipe
code=$?
collect
extra_evals
ls -la "$OUT" >>"$LOG"
log "done: recipe exit $code"
exit $code
