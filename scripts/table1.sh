#!/usr/bin/env bash
# The paper's Table 1: which input image works best, plus two ensembles.
#
# Trains one model per input image (configs/{t0,t1,t2,t3,t1sub,t2sub,t3sub}.flags), evaluates
# each on val and test (breast-level AUCs with 95% bootstrap CIs resampled by patient), builds
# the mean ensemble of the three subtraction models and the Caruana ensemble of all seven
# (selected on val, reported on test), and prints Table 1.
# With --extra_rows, also two rows beyond the paper, one network on several images stacked as
# channels: three_channel (t0,t1,t2; configs/three_channel.flags) and subtractions
# (t1-t0,t2-t0,t3-t0; configs/subtractions.flags), printed under their own heading. They join
# neither ensemble: the mean stays over the three subtraction models, Caruana over the seven
# paper rows, so every paper row and ensemble is the paper's.
#
# Usage:
#   scripts/table1.sh --data_dir=RECORDS --output_dir=OUT [--scale=demo|paper]
#                     [--variants=t0,t1,...] [--extra_rows] [--epochs=N] [--n_bootstrap=2000] [--seed=0]
#                     [--tta=flip]
#                     [--seeds=0,1,2] [--configs_dir=configs]
#                     [-- extra training flags, e.g. --strategy=mirrored]
#
#   --scale=paper  (default) each variant's flagfile unchanged: the paper's model and recipe,
#                  meant for GPUs and a real archive.
#   --scale=demo   adds configs/demo.flags (narrow model, few epochs) so the whole table runs
#                  in minutes on a CPU on the synthetic cohort.
#   --variants=... the rows to train (default the paper's seven); a row is a flagfile name in
#                  configs/, so --variants=t2sub,subtractions works too.
#   --extra_rows   add three_channel,subtractions to the rows.
#   --seeds=0,1,2  train every row with each training seed (initialisation, data order,
#                  augmentation) and report mean +- sd over seeds, the lowest seed, and for
#                  each ensemble its paired bootstrap difference with its best member (chosen
#                  on val); without it, one run per row (the training seed of the flagfiles).
# Rerunning resumes: finished training runs resume (and stop at once), evaluations whose
# metrics.json is newer than the model are kept.
# Outputs: OUT/models/<variant>/[seed_S/] (training runs), OUT/eval/<row>/[seed_S/]{val,test}/
# (evaluate and ensemble outputs), OUT/table1.md, OUT/table1.csv.
set -euo pipefail
source "$(dirname "$0")/experiment_common.sh"

PAPER_ROWS="t0,t1,t2,t3,t1sub,t2sub,t3sub" EXTRA_ROWS="three_channel,subtractions"
VARIANTS="$PAPER_ROWS" WITH_EXTRA_ROWS=""
for arg in "$@"; do
  if [ "${#EXTRA[@]}" -gt 0 ] || [ "$arg" = "--" ]; then EXTRA+=("$arg"); continue; fi
  common_arg "$arg" && continue
  case "$arg" in
    --variants=*) VARIANTS="${arg#*=}" ;;
    --extra_rows) WITH_EXTRA_ROWS=1 ;;
    *) echo "table1.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
finish_args table1.sh
if [ -n "$WITH_EXTRA_ROWS" ]; then VARIANTS="$VARIANTS,$EXTRA_ROWS"; fi

is_paper_row() { case ",$PAPER_ROWS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
# A row's input: its name for the paper's rows, else its flagfile's own --input line.
row_input() {
  if is_paper_row "$1"; then echo "$1"; else sed -n 's/^--input=//p' "$CONFIGS/$1.flags" | tail -n 1; fi
}
IFS=',' read -r -a VARIANT_LIST <<< "$VARIANTS"
for v in "${VARIANT_LIST[@]}"; do
  [ -f "$CONFIGS/$v.flags" ] || { echo "table1.sh: $CONFIGS/$v.flags not found" >&2; exit 2; }
  [ -n "$(row_input "$v")" ] || { echo "table1.sh: $CONFIGS/$v.flags sets no --input" >&2; exit 2; }
done
mkdir -p "$OUT/models" "$OUT/eval"

for seed in "${SEED_LIST[@]}"; do
  sub="$(run_dir "$seed")"
  for v in "${VARIANT_LIST[@]}"; do
    echo "== training $v (input $(row_input "$v"), $SCALE scale${seed:+, seed $seed})"
    # The variant's flagfile, then the scale overrides, then this script's fixed settings
    # (the input variant always last, so no override can change it).
    # shellcheck disable=SC2046
    "$PYTHON" -m mri_keras.train --flagfile="$CONFIGS/$v.flags" "${SCALE_FLAGS[@]}" \
      $(seed_flags "$seed") --input="$(row_input "$v")" --data_dir="$DATA_DIR" \
      --model_dir="$OUT/models/$v${sub:+/$sub}" "${EXTRA[@]}"
    evaluate_splits "$OUT/models/$v${sub:+/$sub}" "$v${sub:+/$sub}" \
      "$OUT/eval/$v${sub:+/$sub}" "$DATA_DIR" val test
  done

  join() { local IFS=,; echo "$*"; }
  SUB=() SUB_NAMES=() ALL=() ALL_NAMES=()
  for v in "${VARIANT_LIST[@]}"; do
    is_paper_row "$v" || continue  # The ensembles are the paper's: over its rows only.
    ALL+=("$OUT/eval/$v${sub:+/$sub}") ALL_NAMES+=("$v")
    case "$v" in t1sub|t2sub|t3sub) SUB+=("$OUT/eval/$v${sub:+/$sub}") SUB_NAMES+=("$v") ;; esac
  done
  if [ "${#SUB[@]}" -ge 2 ]; then
    echo "== mean ensemble of the subtraction models${seed:+ (seed $seed)}"
    "$PYTHON" -m mri_keras.ensemble --eval_dirs="$(join "${SUB[@]}")" \
      --names="$(join "${SUB_NAMES[@]}")" --method=mean \
      --output_dir="$OUT/eval/mean_sub${sub:+/$sub}" --n_bootstrap="$N_BOOTSTRAP" --seed="$SEED"
  fi
  if [ "${#ALL[@]}" -ge 2 ]; then
    echo "== Caruana ensemble selection over all models (on val, reported on test)${seed:+ (seed $seed)}"
    "$PYTHON" -m mri_keras.ensemble --eval_dirs="$(join "${ALL[@]}")" \
      --names="$(join "${ALL_NAMES[@]}")" --method=caruana \
      --output_dir="$OUT/eval/caruana_all${sub:+/$sub}" --n_bootstrap="$N_BOOTSTRAP" --seed="$SEED"
  fi
done
echo
"$PYTHON" -m mri_keras.experiments --report=table1 --eval_root="$OUT/eval" --output_dir="$OUT"
