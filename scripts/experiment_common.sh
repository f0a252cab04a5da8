# Shared by the experiment drivers (table1, data_fraction, seeds, controls; sourced, not run): working
# directories, the interpreter, and the arguments both drivers take.
#   common_arg ARG     consumes one shared --flag=value; returns 1 for anything else.
#   finish_args NAME   checks and resolves the shared arguments; sets SCALE_FLAGS and
#                      SEED_LIST (one entry per training seed; "" = the single-run layout).
#   run_dir SEED       "" for the single-run layout, else "seed_SEED" (models/<row>/seed_S).
#   seed_flags SEED    the training flags of that seed (none for the single-run layout).
#   evaluate_splits MODEL_DIR NAME OUT_ROOT DATA_DIR SPLIT...
#                      evaluates MODEL_DIR on each SPLIT into OUT_ROOT/SPLIT/ in one process
#                      (the model loaded once), keeping evaluations newer than its best.keras
#                      made with the same --tta.
ORIG_PWD="$PWD"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$ORIG_PWD/$1" ;; esac; }
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

DATA_DIR="" OUT="" SCALE="paper" EPOCHS="" N_BOOTSTRAP=2000 SEED=0 SEEDS="" CONFIGS="" TTA="none" EXTRA=()

common_arg() {
  case "$1" in
    --data_dir=*) DATA_DIR="${1#*=}" ;;
    --output_dir=*) OUT="${1#*=}" ;;
    --scale=*) SCALE="${1#*=}" ;;
    --epochs=*) EPOCHS="${1#*=}" ;;
    --n_bootstrap=*) N_BOOTSTRAP="${1#*=}" ;;
    --seed=*) SEED="${1#*=}" ;;
    --seeds=*) SEEDS="${1#*=}" ;;
    --configs_dir=*) CONFIGS="${1#*=}" ;;
    --tta=*) TTA="${1#*=}" ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) return 1 ;;
  esac
}

finish_args() {
  local name="$1"
  # EXTRA starts with the "--" that introduced it.
  if [ "${#EXTRA[@]}" -gt 0 ]; then EXTRA=("${EXTRA[@]:1}"); fi
  if [ -z "$DATA_DIR" ] || [ -z "$OUT" ]; then
    echo "$name: --data_dir and --output_dir are required (see --help)" >&2; exit 2
  fi
  DATA_DIR="$(abspath "$DATA_DIR")" OUT="$(abspath "$OUT")"
  CONFIGS="$( [ -n "$CONFIGS" ] && abspath "$CONFIGS" || echo "$REPO/configs")"
  case "$SCALE" in
    paper) SCALE_FLAGS=() ;;
    demo) SCALE_FLAGS=(--flagfile="$CONFIGS/demo.flags" --noprogress) ;;
    *) echo "$name: --scale must be demo or paper, got $SCALE" >&2; exit 2 ;;
  esac
  if [ -n "$EPOCHS" ]; then SCALE_FLAGS+=(--epochs="$EPOCHS"); fi
  case "$TTA" in none|flip) ;; *) echo "$name: --tta must be none or flip, got $TTA" >&2; exit 2 ;; esac
  SEED_LIST=("")
  if [ -n "$SEEDS" ]; then
    IFS=',' read -r -a SEED_LIST <<< "$SEEDS"
    for s in "${SEED_LIST[@]}"; do
      case "$s" in ''|*[!0-9]*) echo "$name: --seeds must be non-negative integers, got $SEEDS" >&2; exit 2 ;; esac
    done
  fi
}

run_dir() { if [ -n "$1" ]; then echo "seed_$1"; fi; }
seed_flags() { if [ -n "$1" ]; then echo "--seed=$1"; fi; }

# Was this metrics.json made with the current --tta? (Files older than the option: "none".)
same_tta() {
  if grep -q '"tta": ' "$1"; then grep -q "\"tta\": \"$TTA\"" "$1"; else [ "$TTA" = none ]; fi
}

evaluate_splits() {
  local model="$1" name="$2" root="$3" data="$4" split todo=()
  shift 4
  for split in "$@"; do
    if [ -f "$root/$split/metrics.json" ] && [ "$root/$split/metrics.json" -nt "$model/best.keras" ] \
        && same_tta "$root/$split/metrics.json"; then
      echo "  $name $split: kept $root/$split/metrics.json"
    else
      todo+=("$split")
    fi
  done
  [ "${#todo[@]}" -gt 0 ] || return 0
  local out="$root" splits
  # One split writes into the directory given, several into one sub-directory each.
  if [ "${#todo[@]}" -eq 1 ]; then out="$root/${todo[0]}"; fi
  splits="$(IFS=,; echo "${todo[*]}")"
  "$PYTHON" -m mri_keras.evaluate --model="$model" --data_dir="$data" --split="$splits" \
    --output_dir="$out" --n_bootstrap="$N_BOOTSTRAP" --seed="$SEED" --name="$name" --tta="$TTA"
}
