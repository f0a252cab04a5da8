#!/usr/bin/env bash
# The main job on the bundled synthetic cohort, end to end:
#   synthetic DICOM archive -> TFRecords -> trained Doubly Deep CNN (configs/demo.flags)
#   -> evaluation on val and test (AUCs with 95% CIs, operating points, calibration,
#   report.html) -> prediction with heatmaps on one test exam -> a short report.
# Creates .venv (with the python3 on PATH) and installs the package if needed. Idempotent:
# a rerun reuses the cohort, the records, a finished training run, the evaluation and the
# prediction.
#
# Usage: scripts/demo.sh [--output_dir=DIR] [--num_patients=N] [--seed=S]
#                        [--size=SLICES,ROWS,COLS] [--train_flags="--epochs=3 ..."]
#                        [--n_bootstrap=N] [--tta=flip|none]
#   or set DEMO_OUTPUT_DIR / DEMO_NUM_PATIENTS / DEMO_SEED / DEMO_SIZE / DEMO_TRAIN_FLAGS /
#   DEMO_TTA.
# Defaults: demo_output/, 480 patients, seed 0, 16 x 64 x 64 voxels per phase: a test split
# of ~96 patients with ~36 malignant breasts (validation ~31), so its AUC means something.
# Evaluation and prediction average each exam with its left-right mirror (--tta=flip, the
# recipe's test-time augmentation, chosen on validation; README).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

OUT="${DEMO_OUTPUT_DIR:-demo_output}"
NUM_PATIENTS="${DEMO_NUM_PATIENTS:-480}"
SEED="${DEMO_SEED:-0}"
SIZE="${DEMO_SIZE:-16,64,64}"
TRAIN_FLAGS="${DEMO_TRAIN_FLAGS:-}"
N_BOOTSTRAP="${DEMO_N_BOOTSTRAP:-2000}"
TTA="${DEMO_TTA:-flip}"
for arg in "$@"; do
  case "$arg" in
    --output_dir=*) OUT="${arg#*=}" ;;
    --num_patients=*) NUM_PATIENTS="${arg#*=}" ;;
    --seed=*) SEED="${arg#*=}" ;;
    --size=*) SIZE="${arg#*=}" ;;
    --train_flags=*) TRAIN_FLAGS="${arg#*=}" ;;
    --n_bootstrap=*) N_BOOTSTRAP="${arg#*=}" ;;
    --tta=*) TTA="${arg#*=}" ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "demo.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done
IFS=, read -r SLICES ROWS COLS <<<"$SIZE"
if [ -z "${COLS:-}" ]; then
  echo "demo.sh: --size must be SLICES,ROWS,COLS (received '$SIZE')" >&2
  exit 2
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
COHORT="$OUT/cohort"
RECORDS="$OUT/records"
PRIVATE="$OUT/private"          # pseudonym key and id map: never inside the records
MODEL_DIR="$OUT/model"
EVAL_DIR="$OUT/evaluation"
PRED_DIR="$OUT/prediction"
START=$(date +%s)
step() { echo; echo "==> [$1/6] $2  (+$(( $(date +%s) - START )) s)"; }

step 0 "Python environment"
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $(command -v python3)"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import mri_keras.train, tfrecords_tools.convert, keras_tuner, pydicom" 2>/dev/null; then
  echo "Installing mri_keras and its dependencies into .venv (a few minutes, once)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[dicom-codecs]"
fi
PY="$REPO/.venv/bin/python"

step 1 "Synthetic DICOM cohort ($NUM_PATIENTS patients, ${SLICES}x${ROWS}x${COLS}, seed $SEED)"
if "$PY" - "$COHORT" "$NUM_PATIENTS" "$SEED" "$SLICES" "$ROWS" "$COLS" <<'PYEOF' 2>/dev/null
import json, os, sys
root, patients, seed, s, r, c = sys.argv[1], *map(int, sys.argv[2:])
info = json.load(open(os.path.join(root, "cohort.json")))
ok = (info["num_patients"], info["seed"]) == (patients, seed)
ok = ok and list(info.get("shape", info.get("size", [s, r, c]))) == [s, r, c]
sys.exit(0 if ok and os.path.isfile(os.path.join(root, "labels.csv")) else 1)
PYEOF
then
  echo "Reusing $COHORT"
else
  overwrite=""
  if [ -f "$COHORT/cohort.json" ]; then overwrite="--overwrite"; fi
  "$PY" -m tfrecords_tools.synthetic --output_dir="$COHORT" --num_patients="$NUM_PATIENTS" \
    --seed="$SEED" --slices="$SLICES" --rows="$ROWS" --cols="$COLS" $overwrite
  rm -rf "$RECORDS" "$PRIVATE" "$MODEL_DIR" "$EVAL_DIR" "$PRED_DIR"
fi

step 2 "Convert DICOM -> TFRecords (patient-level splits, pseudonymised ids)"
if [ -f "$RECORDS/manifest.json" ] && [ ! -d "$RECORDS/.work" ]; then
  echo "Reusing $RECORDS"
else
  if [ ! -f "$PRIVATE/pseudonym.key" ]; then
    # Synthetic cohort only: a key derived from the seed, so the pseudonyms, the patient splits
    # and the record order (and with them the demo's figures) are the same on every machine.
    # With a real archive let the converter draw a random key, and keep it private.
    mkdir -p "$PRIVATE"
    "$PY" -c "import hashlib, sys; print(hashlib.sha256(b'mri_keras synthetic demo, seed ' + sys.argv[1].encode()).hexdigest())" "$SEED" > "$PRIVATE/pseudonym.key"
    chmod 600 "$PRIVATE/pseudonym.key"
  fi
  "$PY" -m tfrecords_tools.convert --dicom_root="$COHORT" --labels="$COHORT/labels.csv" \
    --output_dir="$RECORDS" --pseudonym_key_file="$PRIVATE/pseudonym.key" \
    --id_map="$PRIVATE/id_map.csv" --seed="$SEED"
fi
"$PY" -m tfrecords_tools.inspect "$RECORDS"

step 3 "Train the Doubly Deep CNN (configs/demo.flags; resumes if interrupted)"
# shellcheck disable=SC2086
"$PY" -m mri_keras.train --flagfile=configs/demo.flags --data_dir="$RECORDS" \
  --model_dir="$MODEL_DIR" $TRAIN_FLAGS

step 4 "Evaluate on val and test (breast-level AUCs, 95% bootstrap CIs by patient; a threshold chosen on val, applied to test)"
# Kept when it evaluated this best.keras with these settings (a rerun of a finished demo).
if [ "$EVAL_DIR/test/metrics.json" -nt "$MODEL_DIR/best.keras" ] && [ -f "$EVAL_DIR/val/metrics.json" ] \
    && "$PY" - "$EVAL_DIR/test/metrics.json" "$N_BOOTSTRAP" "$TTA" <<'PYEOF' 2>/dev/null
import json, sys
m = json.load(open(sys.argv[1]))
same = m["breast_level"]["malignant"]["n_bootstrap"] == int(sys.argv[2])
sys.exit(0 if same and m.get("tta", "none") == sys.argv[3] and "validation_threshold" in m else 1)
PYEOF
then
  echo "Reusing $EVAL_DIR"
else
  "$PY" -m mri_keras.evaluate --model="$MODEL_DIR" --data_dir="$RECORDS" --split=val,test \
    --output_dir="$EVAL_DIR" --n_bootstrap="$N_BOOTSTRAP" --name=demo --tta="$TTA"
fi

step 5 "Predict one test exam from its DICOM folder, with heatmaps"
EXAM_DIR="$("$PY" - "$RECORDS" "$PRIVATE/id_map.csv" "$COHORT" <<'PYEOF'
import csv, json, os, sys
records, id_map, cohort = sys.argv[1:]
manifest = json.load(open(os.path.join(records, "manifest.json")))
test = manifest["splits"]["test"]["exams"]
# Prefer a test exam with a malignant lesion, so the heatmap has something to show.
test = sorted(test, key=lambda e: -(e["labels"][1] + e["labels"][3]))
rows = list(csv.DictReader(open(id_map)))
by_id = {r["exam_id"]: r["exam"] for r in rows}  # pseudonym -> folder relative to the root
path = by_id[test[0]["exam_id"]]
print(path if os.path.isabs(path) else os.path.join(cohort, path))
PYEOF
)"
if [ "$PRED_DIR/prediction.json" -nt "$MODEL_DIR/export/saved_model.pb" ] \
    && [ -f "$PRED_DIR/heatmaps/heatmap.npy" ] \
    && grep -q "\"tta\": \"$TTA\"" "$PRED_DIR/prediction.json"; then
  echo "Reusing $PRED_DIR (exam $(basename "$EXAM_DIR"))"
  cat "$PRED_DIR/prediction.json"
else
  rm -rf "$PRED_DIR"; mkdir -p "$PRED_DIR"
  "$PY" -m mri_keras.predict --model="$MODEL_DIR/export" --exam_dir="$EXAM_DIR" \
    --heatmap_dir="$PRED_DIR/heatmaps" --tta="$TTA" | tee "$PRED_DIR/prediction.json.tmp"
  mv "$PRED_DIR/prediction.json.tmp" "$PRED_DIR/prediction.json"
fi

step 6 "Report"
"$PY" - "$EVAL_DIR/test/metrics.json" "$MODEL_DIR/metrics.csv" <<'PYEOF'
import csv, json, math, sys
m = json.load(open(sys.argv[1]))
def fmt(r):
    if r["auc"] is None:
        return f"undefined ({r['positives']} positive, {r['negatives']} negative)"
    return f"{r['auc']:.3f} (95% CI {r['ci_low']:.3f}-{r['ci_high']:.3f})"
c = m["counts"]
tta = "" if m.get("tta", "none") == "none" else f"; test-time augmentation: {m['tta']}"
print(f"Test split: {c['exams']} exams, {c['patients']} patients, {c['breasts']} breasts{tta}")
print("  breast-level malignant AUC:", fmt(m["breast_level"]["malignant"]))
print("  breast-level benign AUC:   ", fmt(m["breast_level"]["benign"]))
print("  exam-level malignant AUC:  ", fmt(m["exam_level"]["malignant"]))
op = (m.get("validation_threshold") or {}).get("malignant") or {}
def rate(v):  # null: undefined (e.g. no malignant breast in the split)
    return "n/a" if v is None else f"{v:.3f}"
if op.get("test"):
    t = op["test"]
    print(f"  malignant, threshold {op['threshold']:.3f} chosen on val at {op['operating_point']}: "
          f"test sensitivity {rate(t['sensitivity'])}, specificity {rate(t['specificity'])} "
          f"(TP {t['tp']}, FP {t['fp']}, TN {t['tn']}, FN {t['fn']})")
rows = list(csv.DictReader(open(sys.argv[2])))
def auc(r):
    v = float(r["val_malignant_auc"] or "nan")
    return -1.0 if math.isnan(v) else v
best = max(rows, key=auc)
print(f"  best epoch by val_malignant_auc: {best['epoch']} of {len(rows)} "
      f"(val malignant AUC {float(best['val_malignant_auc'] or 'nan'):.3f})")
PYEOF
cat <<TXT

Artefacts (all under $OUT):
  cohort/            synthetic DICOM exams, labels.csv, annotations.csv
  records/           TFRecords, manifest.json, failures.csv
  private/           pseudonym key and id map (keep these private; never inside records/)
  model/             best.keras, export/ (SavedModel), metrics.csv, tensorboard/, checkpoints/
  evaluation/        val/ and test/: predictions.csv, metrics.json, roc.png, reliability.png,
                     decision_curve.png/.csv, report.html (everything on one page)
  prediction/        prediction.json, heatmaps/ (PNG overlays + heatmap.npy)
Total time: $(( $(date +%s) - START )) s
TXT
