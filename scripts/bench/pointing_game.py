"""Heatmap pointing game (issue 7): how often the saliency maximum falls inside an annotated
malignant lesion. Measured and reported, not asserted.

For every exam of ``--splits`` with at least one malignant lesion in ``--annotations`` (the
synthetic cohort's ``annotations.csv``: centre in canonical voxel coordinates, in-plane radius
in voxels), the saliency volume of the trained model is computed on the record's canonical
volumes (`mri_keras.heatmap`, the code ``mri_keras.predict --heatmap_dir`` uses) and its
arg-max voxel is a *hit* when it lies inside a malignant lesion of that exam: distance to the
lesion centre <= radius (+ ``--tolerance_voxels``), slice offsets scaled to in-plane voxel
units by the exam's spacing (the synthetic lesions are spheres in millimetres). Also reported:
hits within twice the radius, and the chance level (the share of the exam's voxels inside its
malignant lesions: the hit rate of a uniformly random point), how often the maximum is on the
side (breast) of a malignant lesion, and how many maps were all zero (no positive evidence).

Record exam ids are pseudonyms; ``--id_map`` (written by the converter outside the records
directory) maps them back to the cohort's exam folders named in ``annotations.csv``.

Usage::

    python scripts/bench/pointing_game.py --model=MODEL_DIR --data_dir=RECORDS \
        --annotations=COHORT/annotations.csv --id_map=RECORDS_private/id_map.csv \
        [--splits=test] [--methods=gradcam,gradient,gradcam_x_gradient] [--targets=malignant,side]

Prints one JSON line per (method, target) and writes them to ``--output_json`` if given.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from mri_keras import heatmap, inference  # noqa: E402
from tfrecords_tools.records import Records  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "MODEL_DIR (needs best.keras) or its export/.")
flags.DEFINE_string("data_dir", None, "Converted records directory.")
flags.DEFINE_string("annotations", None, "The cohort's annotations.csv.")
flags.DEFINE_string("id_map", None, "The converter's id_map.csv (pseudonym -> exam folder).")
flags.DEFINE_list("splits", ["test"], "Splits to score (pooled).")
flags.DEFINE_list("methods", list(heatmap.METHODS), "Saliency methods.")
flags.DEFINE_list(
    "targets",
    ["malignant", "side"],
    "'malignant': both malignant heads; 'side': the malignant head of the "
    "lesion's side (both if lesions on both sides).",
)
flags.DEFINE_float("tolerance_voxels", 0.0, "Extra distance (in-plane voxels) counted as a hit.")
flags.DEFINE_string("output_json", None, "Also write the results here.")


def read_lesions(annotations: str) -> dict:
    """exam folder -> list of malignant lesions {side, centre (s, r, c), radius}."""
    lesions = defaultdict(list)
    with open(annotations, newline="") as f:
        for row in csv.DictReader(f):
            if row["pathology"] != "malignant":
                continue
            lesions[row["exam"]].append(
                {
                    "side": row["side"],
                    "centre": np.array([float(row["slice"]), float(row["row"]), float(row["col"])]),
                    "radius": float(row["radius"]),
                }
            )
    return lesions


def lesion_distance(shape, spacing, lesion) -> np.ndarray:
    """Distance (in-plane voxel units) of every voxel to the lesion centre."""
    z_scale = float(spacing[0]) / float(spacing[1])
    s, r, c = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    s0, r0, c0 = lesion["centre"]
    return np.sqrt(((s - s0) * z_scale) ** 2 + (r - r0) ** 2 + (c - c0) ** 2)


def score(model, predictor, records, folder_of, lesions, method, target, tolerance):
    hits = hits2 = same_side = empty = 0
    chance = []
    per_exam = []
    for exam_id, record in records.items():
        found = lesions.get(folder_of.get(exam_id, ""), [])
        if not found:
            continue
        phases = {p: record[p] for p in predictor.phases}
        if target == "side":
            sides = sorted({l["side"] for l in found})
            tgt = f"{sides[0]}_malignant" if len(sides) == 1 else "malignant"
        else:
            tgt = target
        heat, _ = heatmap.exam_saliency(model, phases, predictor.input_config, tgt, method)
        peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
        empty += bool(heat.max() <= 0)
        # Canonical cols increase toward the patient's left: the left breast is at col >= W/2.
        peak_side = "left" if peak[2] >= heat.shape[2] / 2 else "right"
        same_side += peak_side in {l["side"] for l in found}
        inside = np.zeros(heat.shape, bool)
        hit = hit2 = False
        for lesion in found:
            dist = lesion_distance(heat.shape, record["spacing"], lesion)
            inside |= dist <= lesion["radius"]
            hit |= bool(dist[peak] <= lesion["radius"] + tolerance)
            hit2 |= bool(dist[peak] <= 2 * lesion["radius"] + tolerance)
        hits += hit
        hits2 += hit2
        chance.append(float(inside.mean()))
        per_exam.append({"hit": hit, "peak": [int(v) for v in peak]})
    n = len(per_exam)
    return {
        "method": method,
        "target": target,
        "exams": n,
        "hits": hits,
        "pointing_game": hits / n if n else float("nan"),
        "hits_within_2r": hits2,
        "pointing_game_2r": hits2 / n if n else float("nan"),
        "chance": float(np.mean(chance)) if chance else float("nan"),
        "peak_on_lesion_side": same_side / n if n else float("nan"),
        "all_zero_maps": empty,
        "tolerance_voxels": tolerance,
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    predictor = inference.load_predictor(FLAGS.model)
    if predictor.location.keras_path is None:
        raise app.UsageError("The pointing game needs best.keras next to the export.")
    model = inference.load_keras_model(predictor.location.keras_path)
    with open(FLAGS.id_map, newline="") as f:
        folder_of = {r["exam_id"]: r["exam"] for r in csv.DictReader(f)}
    lesions = read_lesions(FLAGS.annotations)
    # Each record carries its spacing (for the lesions' slice extent) with its phases.
    records = {e["exam_id"]: e for _, e in Records.open(FLAGS.data_dir).iter_numpy(FLAGS.splits)}
    results = []
    for method in FLAGS.methods:
        for target in FLAGS.targets:
            start = time.time()
            r = score(
                model,
                predictor,
                records,
                folder_of,
                lesions,
                method,
                target,
                FLAGS.tolerance_voxels,
            )
            r.update(
                splits=FLAGS.splits,
                seconds=round(time.time() - start, 1),
                input_variant=predictor.input_config.input_variant,
            )
            print(json.dumps(r), flush=True)
            results.append(r)
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["model", "data_dir", "annotations", "id_map"])
    app.run(main)
