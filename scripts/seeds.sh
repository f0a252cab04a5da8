#!/usr/bin/env bash
# Trains one recipe with several training seeds and reports the spread: one seed's figure is
# an anecdote.
#
# Each seed trains `python -m mri_keras.train` with the given flagfile(s) and --seed=S (the
# seed draws the initialisation, the order of the exams, the augmentations and any
# --train_fraction subsample), picks its best epoch on val as always, and is evaluated once on
# val and once on test. The report lists every seed's AUCs with 95% CIs, the mean +- sd over
# seeds and the lowest seed.
#
# Usage:
#   scripts/seeds.sh --flagfile=configs/demo.flags --data_dir=RECORDS --output_dir=OUT
#                    [--seeds=0,1,2] [--splits=val,test] [--epochs=N] [--n_bootstrap=2000]
#                    [--seed=0] [--tta=none|flip]
#                    [-- extra training flags, e.g. --input=t0]
#   --flagfile may be given several times (layered in order, as mri_keras.train reads them);
#   --seed is the bootstrap seed of the evaluations. --splits=val evaluates validation only
#   (comparing recipes: the test split stays unseen until one is chosen). --tta=flip evaluates
#   with left-right flip test-time augmentation (mri_keras.evaluate --tta; the demo recipe's).
# Rerunning resumes finished runs and keeps up-to-date evaluations.
# Outputs: OUT/models/seed_S/, OUT/eval/seed_S/{val,test}/, OUT/seeds.md, OUT/seeds.csv.
set -euo pipefail
source "$(dirname "$0")/experiment_common.sh"

FLAGFILES=() SPLITS="val,test"
for arg in "$@"; do
  if [ "${#EXTRA[@]}" -gt 0 ] || [ "$arg" = "--" ]; then EXTRA+=("$arg"); continue; fi
  common_arg "$arg" && continue
  case "$arg" in
    --flagfile=*) FLAGFILES+=(--flagfile="$(abspath "${arg#*=}")") ;;
    --splits=*) SPLITS="${arg#*=}" ;;
    *) echo "seeds.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$SEEDS" ] || SEEDS="0,1,2"
finish_args seeds.sh
[ "${#FLAGFILES[@]}" -gt 0 ] || { echo "seeds.sh: give at least one --flagfile (see --help)" >&2; exit 2; }
for f in "${FLAGFILES[@]}"; do
  [ -f "${f#--flagfile=}" ] || { echo "seeds.sh: ${f#--flagfile=} not found" >&2; exit 2; }
done
if [ "$SCALE" != "paper" ]; then
  echo "seeds.sh: --scale does not apply (the flagfiles say everything)" >&2; exit 2
fi

case "$SPLITS" in val|test|val,test|test,val) ;; *) echo "seeds.sh: --splits must be val, test or val,test" >&2; exit 2 ;; esac
IFS=',' read -r -a SPLIT_LIST <<< "$SPLITS"
REPORT_SPLIT=test
case "$SPLITS" in *test*) ;; *) REPORT_SPLIT=val ;; esac
mkdir -p "$OUT/models" "$OUT/eval"
for seed in "${SEED_LIST[@]}"; do
  model="$OUT/models/seed_$seed"
  echo "== training seed $seed"
  "$PYTHON" -m mri_keras.train "${FLAGFILES[@]}" "${SCALE_FLAGS[@]}" --seed="$seed" \
    --data_dir="$DATA_DIR" --model_dir="$model" --noprogress "${EXTRA[@]}"
  evaluate_splits "$model" "seed_$seed" "$OUT/eval/seed_$seed" "$DATA_DIR" "${SPLIT_LIST[@]}"
done
echo
"$PYTHON" -m mri_keras.experiments --report=seeds --eval_root="$OUT/eval" --output_dir="$OUT" \
  --split="$REPORT_SPLIT"
