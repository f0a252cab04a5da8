#!/usr/bin/env bash
# The main job, interim version: sets up .venv (if missing) and writes the bundled synthetic
# breast DCE-MRI cohort as DICOM exam folders, then says where it is. Safe to rerun: an
# existing cohort made with the same settings is reused.
#
# Usage: scripts/demo.sh [--output_dir=DIR] [--num_patients=N] [--seed=S]
#   or set DEMO_OUTPUT_DIR / DEMO_NUM_PATIENTS / DEMO_SEED.
# Defaults: demo_output/cohort, 120 patients, seed 0 (24 x 96 x 96 voxels per phase).
set -euo pipefail
cd "$(dirname "$0")/.."

COHORT="${DEMO_OUTPUT_DIR:-demo_output/cohort}"
NUM_PATIENTS="${DEMO_NUM_PATIENTS:-120}"
SEED="${DEMO_SEED:-0}"
for arg in "$@"; do
  case "$arg" in
    --output_dir=*) COHORT="${arg#*=}" ;;
    --num_patients=*) NUM_PATIENTS="${arg#*=}" ;;
    --seed=*) SEED="${arg#*=}" ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

if [ ! -x .venv/bin/python ]; then
  echo "==> Creating .venv with $(command -v python3)"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import tfrecords_tools.synthetic, pydicom, absl" 2>/dev/null; then
  echo "==> Installing the package into .venv"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e .
fi

# Reuse the cohort if cohort.json says it was made with these settings.
if .venv/bin/python - "$COHORT" "$NUM_PATIENTS" "$SEED" <<'EOF' 2>/dev/null
import json, os, sys
root, patients, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
info = json.load(open(os.path.join(root, "cohort.json")))
ok = info["num_patients"] == patients and info["seed"] == seed
ok = ok and os.path.isfile(os.path.join(root, "labels.csv"))
sys.exit(0 if ok else 1)
EOF
then
  echo "==> Reusing the synthetic cohort in $COHORT (seed $SEED, $NUM_PATIENTS patients)"
else
  echo "==> Generating the synthetic cohort ($NUM_PATIENTS patients, seed $SEED)"
  overwrite=""
  if [ -f "$COHORT/cohort.json" ]; then overwrite="--overwrite"; fi
  .venv/bin/python -m tfrecords_tools.synthetic --output_dir="$COHORT" \
    --num_patients="$NUM_PATIENTS" --seed="$SEED" $overwrite
fi

ABS="$(cd "$COHORT" && pwd)"
echo
echo "Synthetic cohort: $ABS"
echo "  one folder per exam (e.g. $(head -2 "$ABS/labels.csv" | tail -1 | cut -d, -f1)), DICOM files inside"
echo "  labels:      $ABS/labels.csv"
echo "  annotations: $ABS/annotations.csv"
