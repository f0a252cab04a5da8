#!/usr/bin/env bash
# Negative controls of a recipe: does it learn only what it should?
#
#   permuted  the labels permuted across exams (every exam keeps a real label vector of the
#             cohort, just not its own), converted and trained with the recipe: the test AUC
#             must sit near 0.5 (0.35-0.65 at demo scale); a higher one means a shortcut
#             through the pipeline (ids, order, shapes) or the generator.
#   t0        the recipe on the pre-contrast image alone: lesions are defined by their
#             enhancement, so t0 must stay low (<= 0.70 on the synthetic cohort).
#
# Usage:
#   scripts/controls.sh --cohort=DICOM_ROOT --data_dir=RECORDS --output_dir=OUT
#                       [--flagfile=configs/demo.flags] [--seed=0] [--n_bootstrap=2000] [--tta=flip]
#                       [--controls=permuted,t0] [-- extra training flags]
#   --cohort: the DICOM root with labels.csv that RECORDS was converted from (the permuted
#   control converts it again with permuted labels). --seed: permutation, training and
#   bootstrap seed.
# Outputs: OUT/permuted/{labels.csv,records,model,eval}, OUT/t0/{model,eval}, OUT/controls.md.
set -euo pipefail
source "$(dirname "$0")/experiment_common.sh"

COHORT="" CONTROLS="permuted,t0" FLAGFILES=()
for arg in "$@"; do
  if [ "${#EXTRA[@]}" -gt 0 ] || [ "$arg" = "--" ]; then EXTRA+=("$arg"); continue; fi
  common_arg "$arg" && continue
  case "$arg" in
    --cohort=*) COHORT="$(abspath "${arg#*=}")" ;;
    --controls=*) CONTROLS="${arg#*=}" ;;
    --flagfile=*) FLAGFILES+=(--flagfile="$(abspath "${arg#*=}")") ;;
    *) echo "controls.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
finish_args controls.sh
[ "${#FLAGFILES[@]}" -gt 0 ] || FLAGFILES=(--flagfile="$CONFIGS/demo.flags")
IFS=',' read -r -a CONTROL_LIST <<< "$CONTROLS"
for c in "${CONTROL_LIST[@]}"; do
  case "$c" in permuted|t0) ;; *) echo "controls.sh: unknown control $c (permuted, t0)" >&2; exit 2 ;; esac
done

train_and_test() {  # train_and_test NAME RECORDS [training flags...]
  local name="$1" records="$2"; shift 2
  "$PYTHON" -m mri_keras.train "${FLAGFILES[@]}" "${SCALE_FLAGS[@]}" --seed="$SEED" \
    --data_dir="$records" --model_dir="$OUT/$name/model" --noprogress "$@" "${EXTRA[@]}"
  evaluate_splits "$OUT/$name/model" "control_$name" "$OUT/$name/eval" "$records" test
}

mkdir -p "$OUT"
for c in "${CONTROL_LIST[@]}"; do
  case "$c" in
    permuted)
      [ -f "$COHORT/labels.csv" ] || { echo "controls.sh: --cohort must hold labels.csv" >&2; exit 2; }
      mkdir -p "$OUT/permuted"
      echo "== permuted labels (seed $SEED)"
      "$PYTHON" - "$COHORT/labels.csv" "$OUT/permuted/labels.csv" "$SEED" <<'PYEOF'
import csv, sys
import numpy as np
src, dst, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(src, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    fields, rows = reader.fieldnames, list(reader)
label_cols = ["left_benign", "left_malignant", "right_benign", "right_malignant"]
order = np.random.default_rng(seed).permutation(len(rows))
labels = [[rows[i][c] for c in label_cols] for i in order]
with open(dst, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for row, lab in zip(rows, labels):
        w.writerow({**row, **dict(zip(label_cols, lab))})
print(f"permuted the label vectors of {len(rows)} exams")
PYEOF
      if [ ! -f "$OUT/permuted/records/manifest.json" ] || [ -d "$OUT/permuted/records/.work" ]; then
        "$PYTHON" -m tfrecords_tools.convert --dicom_root="$COHORT" \
          --labels="$OUT/permuted/labels.csv" --output_dir="$OUT/permuted/records" \
          --id_map="$OUT/permuted/id_map.csv" --seed="$SEED" --noprogress
      fi
      train_and_test permuted "$OUT/permuted/records"
      ;;
    t0)
      echo "== t0 only"
      train_and_test t0 "$DATA_DIR" --input=t0
      ;;
  esac
done

"$PYTHON" - "$OUT" "${CONTROL_LIST[@]}" <<'PYEOF' | tee "$OUT/controls.md"
import json, os, sys
out, controls = sys.argv[1], sys.argv[2:]
expect = {"permuted": "0.35-0.65 (chance)", "t0": "<= 0.70 (no enhancement information)"}
print("| Control | Test breast-level malignant AUC (95% CI) | Expected |")
print("|---|---|---|")
for c in controls:
    m = json.load(open(os.path.join(out, c, "eval", "test", "metrics.json")))
    r = m["breast_level"]["malignant"]
    print(f"| {c} | {r['auc']:.3f} ({r['ci_low']:.3f}-{r['ci_high']:.3f}) | {expect[c]} |")
PYEOF
