#!/usr/bin/env bash
# The paper's data-size experiment (Figure 2): AUC against the share of training patients.
#
# Trains one model per fraction of the training PATIENTS (100/50/20/10/5/2/1%, seeded
# subsample via --train_fraction; validation and test are always whole), evaluates each on
# test, and draws AUC vs fraction (log x axis, 95% bootstrap CI band).
#
# Usage:
#   scripts/data_fraction.sh --data_dir=RECORDS --output_dir=OUT [--scale=demo|paper]
#                            [--variant=t2sub] [--percents=100,50,20,10,5,2,1] [--epochs=N]
#                            [--n_bootstrap=2000] [--seed=0] [--seeds=0,1,2] [--tta=flip]
#                            [--configs_dir=configs]
#                            [-- extra training flags]
#
#   --scale=paper  (default) configs/<variant>.flags unchanged (GPUs, a real archive).
#   --scale=demo   adds configs/demo.flags: minutes on a CPU on the synthetic cohort (where 1%
#                  of the training patients is a single patient: the curve's low end is noise).
#   --seeds=0,1,2  each point trained with each training seed (which also draws its patient
#                  subsample): the curve is the mean over seeds with +-1 sd error bars and
#                  every seed's AUC as a dot; without it, one run per point with a CI band.
# Rerunning resumes finished runs and keeps up-to-date evaluations.
# Outputs: OUT/models/frac_<pct>/[seed_S/], OUT/eval/frac_<pct>/[seed_S/]test/,
# OUT/data_fraction.{png,csv,md}.
set -euo pipefail
source "$(dirname "$0")/experiment_common.sh"

VARIANT="t2sub" PERCENTS="100,50,20,10,5,2,1"
for arg in "$@"; do
  if [ "${#EXTRA[@]}" -gt 0 ] || [ "$arg" = "--" ]; then EXTRA+=("$arg"); continue; fi
  common_arg "$arg" && continue
  case "$arg" in
    --variant=*) VARIANT="${arg#*=}" ;;
    --percents=*) PERCENTS="${arg#*=}" ;;
    *) echo "data_fraction.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
finish_args data_fraction.sh
[ -f "$CONFIGS/$VARIANT.flags" ] || { echo "data_fraction.sh: $CONFIGS/$VARIANT.flags not found" >&2; exit 2; }

IFS=',' read -r -a PERCENT_LIST <<< "$PERCENTS"
mkdir -p "$OUT/models" "$OUT/eval"
for seed in "${SEED_LIST[@]}"; do
  sub="$(run_dir "$seed")"
  for pct in "${PERCENT_LIST[@]}"; do
    fraction="$("$PYTHON" -c "import sys; p = float(sys.argv[1]); assert 0 < p <= 100, p; print(p / 100)" "$pct")"
    name="frac_$pct${sub:+/$sub}"
    echo "== training $VARIANT on $pct% of the training patients ($SCALE scale${seed:+, seed $seed})"
    # shellcheck disable=SC2046
    "$PYTHON" -m mri_keras.train --flagfile="$CONFIGS/$VARIANT.flags" "${SCALE_FLAGS[@]}" \
      $(seed_flags "$seed") --input="$VARIANT" --train_fraction="$fraction" \
      --data_dir="$DATA_DIR" --model_dir="$OUT/models/$name" "${EXTRA[@]}"
    evaluate_splits "$OUT/models/$name" "frac_$pct" "$OUT/eval/$name" "$DATA_DIR" test
  done
done
echo
"$PYTHON" -m mri_keras.experiments --report=data_fraction --eval_root="$OUT/eval" \
  --output_dir="$OUT" --title="$VARIANT, $SCALE scale"
echo "wrote $OUT/data_fraction.png"
