"""Synthetic bilateral breast DCE-MRI cohort, written as a real DICOM archive.

The project's embedded default data set: one folder per exam holding MR Image Storage files
(one file per slice, random file names, 16-bit pixels with RescaleSlope/Intercept; the
``enhanced_*`` variants write the DCE phases as Enhanced MR multi-frame objects instead), plus
``labels.csv`` (``exam,left_benign,left_malignant,right_benign,right_malignant``) and
``annotations.csv`` (``exam,side,pathology,slice,row,col,radius``; centre in canonical voxel
coordinates, in-plane radius in voxels). Anatomy and signal: `synthetic_anatomy`; geometry:
`synthetic_geometry`; file writing: `synthetic_dicom`.

Usage::

    python -m tfrecords_tools.synthetic --output_dir=/tmp/cohort --num_patients=120 --seed=0

Layout::

    OUT/P0007/E2/<random file names>    exam "P0007/E2" (one folder per exam)
    OUT/labels.csv  OUT/annotations.csv
    OUT/cohort.json                     generation parameters and per-exam acquisition facts
    CANONICAL_DIR/P0007__E2.npz         optional ground truth (t0..t3, spacing, labels)

Every generated identifier (PatientID ``SYNPID...``, PatientName ``SYN^...``, birth and study
dates, accession numbers ``SYNACC...``, study/series/frame-of-reference UIDs) is returned in
`SyntheticCohort.identifiers`, so privacy tests can search outputs for them. They appear only
inside the DICOM files, never in the CSVs or ``cohort.json``.
"""

from __future__ import annotations

from tfrecords_tools import quiet_tf  # noqa: F401  # isort: skip (first: quiets TF's start-up)

import csv
import dataclasses
import datetime
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import NamedTuple

import numpy as np
from pydicom.uid import generate_uid

from tfrecords_tools import schema
from tfrecords_tools.synthetic_anatomy import (
    Anatomy,
    Lesion,
    jitter_anatomy,
    place_lesion,
    render_exam,
    sample_anatomy,
)
from tfrecords_tools.synthetic_dicom import (
    Frame,
    format_ds,
    format_time,
    multiframe_dataset,
    window,
    write_multiframe,
    write_series,
)
from tfrecords_tools.synthetic_geometry import ORIENTATIONS, acquire

PHASES = schema.PHASES
LABELS = schema.LABELS
# Acquisition variants: the same anatomy shown through different geometry / series layouts.
VARIANTS = (
    "standard",
    "reversed_cols",
    "descending_slices",
    "sagittal",
    "coronal",
    "multiphase_series",
    # Enhanced MR Image Storage: every phase and slice a frame of one file (phases told by
    # TemporalPositionIndex), frames shuffled.
    "enhanced_one_file",
    # Enhanced MR, one file (and series) per phase, phases told only by
    # FrameAcquisitionDateTime, rescale in each frame's functional groups, frames shuffled.
    "enhanced_per_phase",
    # Sagittal, each breast its own series per phase (two series per phase, on parallel grids).
    "unilateral_sagittal",
)
# Variants whose phases are frames of multi-frame objects rather than one file per slice.
MULTIFRAME_VARIANTS = ("enhanced_one_file", "enhanced_per_phase")
# Exam-level label mix of the paper's data set.
LABEL_MIX = (("malignant_only", 0.13), ("benign_only", 0.25), ("both", 0.11), ("negative", 0.51))
# Field of view (mm) along (slice, row, col) used when no spacing is given.
DEFAULT_FOV_MM = (160.0, 340.0, 340.0)
LABELS_CSV = "labels.csv"
ANNOTATIONS_CSV = "annotations.csv"
COHORT_JSON = "cohort.json"
ANNOTATION_COLUMNS = ("exam", "side", "pathology", "slice", "row", "col", "radius")

_SCANNERS = (  # manufacturer, model, field strength (T), DCE series description stem
    ("SIEMENS", "Skyra", 3.0, "fl3d_dyn_fs"),
    ("SIEMENS", "Avanto", 1.5, "fl3d_dyn_fs"),
    ("GE MEDICAL SYSTEMS", "DISCOVERY MR750", 3.0, "Ax VIBRANT"),
    ("GE MEDICAL SYSTEMS", "SIGNA Artist", 1.5, "Ax VIBRANT"),
    ("Philips Medical Systems", "Ingenia", 3.0, "DYN_eTHRIVE"),
    ("Philips Medical Systems", "Achieva", 1.5, "DYN_eTHRIVE"),
)
# Exactly representable rescale values, so stored x slope + intercept is exact in float32.
_SLOPES = (1.0, 1.0, 0.5, 0.75, 1.25, 1.5, 1.6875, 2.375, 0.8125)
_INTERCEPTS = (0.0, 0.0, 0.0, -16.0, 8.0, 32.0)
_ORIENTATION_OF = {
    "multiphase_series": "standard",
    "enhanced_one_file": "standard",
    "enhanced_per_phase": "standard",
    "unilateral_sagittal": "sagittal",
}
_BPE_LEVELS = ((0.03, 0.1), (0.1, 0.22), (0.22, 0.4), (0.4, 0.65))  # minimal .. marked


class SyntheticIdentifiers(NamedTuple):
    """Identifier strings written into the DICOM headers (and nowhere else).

    A tuple of tuples of strings (so generic code can flatten it). ``distinctive`` strings
    cannot occur by chance in other text; ``dates`` are 8-digit DICOM dates, which can (e.g.
    inside a long printed float), so search for them in text fields rather than raw numbers.
    """

    patient_ids: tuple[str, ...]
    patient_names: tuple[str, ...]
    birth_dates: tuple[str, ...]
    accession_numbers: tuple[str, ...]
    study_dates: tuple[str, ...]
    uids: tuple[str, ...]

    @property
    def distinctive(self) -> tuple[str, ...]:
        """PatientIDs, PatientNames, accession numbers and study/series/frame UIDs."""
        return self.patient_ids + self.patient_names + self.accession_numbers + self.uids

    @property
    def dates(self) -> tuple[str, ...]:
        """Birth dates and study dates (DICOM DA strings), without repeats."""
        return tuple(sorted(set(self.birth_dates + self.study_dates)))

    @property
    def all(self) -> tuple[str, ...]:
        """Every identifier string."""
        return self.distinctive + self.dates


@dataclasses.dataclass(frozen=True)
class SyntheticExam:
    """Ground truth and acquisition facts of one generated exam.

    Attributes:
      exam: str. Exam folder relative to the cohort root, e.g. "P0007/E2".
      patient_index: int. Index of the patient (exams of one patient share it).
      patient_id: str. The DICOM PatientID (an identifier: for tests only).
      variant: str. Acquisition variant, one of VARIANTS.
      labels: 4 ints in LABELS order.
      lesions: tuple of Lesion (centres in canonical voxel coordinates).
      shape: (S, H, W) canonical grid.
      spacing: 3 floats, mm along (slice, row, col) as written in the headers.
      origin: 3 floats, LPS position (mm) of canonical voxel (0, 0, 0).
      rescale_slope: float. RescaleSlope of the DCE series.
      rescale_intercept: float. RescaleIntercept of the DCE series.
      manufacturer: str.
      field_strength: float. MagneticFieldStrength (T).
      phase_times: 4 floats. AcquisitionTime of t0..t3, seconds since midnight.
      bpe: float. Background parenchymal enhancement (relative, at t3).
    """

    exam: str
    patient_index: int
    patient_id: str
    variant: str
    labels: tuple[int, int, int, int]
    lesions: tuple[Lesion, ...]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    rescale_slope: float
    rescale_intercept: float
    manufacturer: str
    field_strength: float
    phase_times: tuple[float, float, float, float]
    bpe: float

    @property
    def npz_name(self) -> str:
        """File name of this exam's ground truth inside ``canonical_dir``."""
        return self.exam.replace("/", "__") + ".npz"


@dataclasses.dataclass(frozen=True)
class SyntheticCohort:
    """What `generate_cohort` wrote.

    Attributes:
      root: str. Cohort root (one folder per exam below it).
      labels_csv: str. Path of labels.csv.
      annotations_csv: str. Path of annotations.csv.
      canonical_dir: str or None. Folder of per-exam ground-truth .npz files.
      exams: tuple of SyntheticExam, in labels.csv order.
      identifiers: SyntheticIdentifiers planted in the headers.
      num_files: int. DICOM files written.
      seconds: float. Wall time of the generation.
    """

    root: str
    labels_csv: str
    annotations_csv: str
    canonical_dir: str | None
    exams: tuple[SyntheticExam, ...]
    identifiers: SyntheticIdentifiers
    num_files: int
    seconds: float

    def label_mix(self) -> dict[str, float]:
        """Fraction of exams per category (malignant_only, benign_only, both, negative)."""
        return label_mix([e.labels for e in self.exams])


def label_mix(labels: Sequence[Sequence[int]]) -> dict[str, float]:
    """Fraction of exams that are malignant only / benign only / both / negative."""
    counts = dict.fromkeys([name for name, _ in LABEL_MIX], 0)
    for lb, lm, rb, rm in labels:
        malignant, benign = bool(lm or rm), bool(lb or rb)
        key = (
            "both"
            if malignant and benign
            else "malignant_only"
            if malignant
            else ("benign_only" if benign else "negative")
        )
        counts[key] += 1
    total = max(1, len(labels))
    return {k: v / total for k, v in counts.items()}


@dataclasses.dataclass(frozen=True)
class _ExamJob:
    exam: SyntheticExam
    anatomy: Anatomy
    seed: int
    exam_index: int  # within the patient
    patient_name: str
    birth_date: str
    age: int
    study_date: str
    start_time: float
    accession: str
    study_uid: str
    frame_uid: str
    series_uids: dict[str, str]
    scanner: tuple[str, str, float, str]
    root: str
    canonical_dir: str | None
    extra_series: bool
    series_subfolders: bool


def default_spacing(shape: Sequence[int]) -> tuple[float, float, float]:
    """Spacing (mm) giving a 160 mm slab and a 340 mm in-plane field of view."""
    return tuple(round(fov / n, 3) for fov, n in zip(DEFAULT_FOV_MM, shape))


def generate_cohort(
    output_dir: str,
    num_patients: int,
    seed: int = 0,
    *,
    slices: int = 24,
    rows: int = 96,
    cols: int = 96,
    spacing: Sequence[float] | None = None,
    variants: Sequence[str] = ("standard",),
    extra_series: bool = False,
    canonical_dir: str | None = None,
    series_subfolders: bool = False,
    workers: int | None = None,
    overwrite: bool = False,
) -> SyntheticCohort:
    """Generates a synthetic breast DCE-MRI cohort as DICOM exam folders.

    Args:
      output_dir: str. Cohort root; created. Must be missing or empty, unless `overwrite`.
      num_patients: int. Patients (about 1.3 exams each).
      seed: int. Everything (pixels, labels, headers, UIDs, file names) follows from it.
        Defaults to 0.
      slices: int. Canonical slices (S). Defaults to 24.
      rows: int. Canonical rows (H). Defaults to 96.
      cols: int. Canonical columns (W). Defaults to 96.
      spacing: 3 floats or None. Voxel spacing (mm) along (slice, row, col). Defaults to None:
        a 160 mm slab and a 340 mm field of view (`default_spacing`).
      variants: sequence of VARIANTS. Acquisition variants, assigned to exams in turn.
        Defaults to ("standard",).
      extra_series: bool. Also write a T2 series with other geometry, a 3-plane localizer, a
        derived t1-t0 subtraction series (ImageType DERIVED) and a non-DICOM notes.txt in every
        exam folder. Defaults to False.
      canonical_dir: str or None. If given, write each exam's ground truth there as
        ``<exam with / replaced by __>.npz``: float32 t0..t3 (S, H, W) in canonical orientation,
        exactly stored value x RescaleSlope + RescaleIntercept, float32 spacing (3,) and int64
        labels (4,). Defaults to None.
      series_subfolders: bool. Put each series in its own sub-folder of the exam folder.
        Defaults to False.
      workers: int or None. Processes writing exams. Defaults to None: the CPU count (small
        cohorts are written in-process).
      overwrite: bool. Replace an existing cohort in `output_dir` (only a folder holding a
        cohort.json written by this module is ever deleted). Defaults to False.

    Returns:
      The SyntheticCohort.

    Raises:
      ValueError: on invalid arguments.
      FileExistsError: if `output_dir` is not empty and `overwrite` is False, or does not hold
        a synthetic cohort.
    """
    started = time.perf_counter()
    shape, spacing, variants = _validate(num_patients, slices, rows, cols, spacing, variants)
    _prepare_output(output_dir, overwrite)
    if canonical_dir:
        os.makedirs(canonical_dir, exist_ok=True)

    jobs, identifiers = _plan(
        output_dir,
        num_patients,
        seed,
        shape,
        spacing,
        variants,
        extra_series,
        canonical_dir,
        series_subfolders,
    )
    num_files = _run_jobs(jobs, workers)
    exams = tuple(job.exam for job in jobs)
    labels_csv, annotations_csv = _write_tables(output_dir, exams)
    seconds = time.perf_counter() - started
    _write_cohort_json(output_dir, exams, seed, shape, spacing, variants, extra_series, num_files)
    return SyntheticCohort(
        root=output_dir,
        labels_csv=labels_csv,
        annotations_csv=annotations_csv,
        canonical_dir=canonical_dir,
        exams=exams,
        identifiers=identifiers,
        num_files=num_files,
        seconds=seconds,
    )


def plan_cohort(
    num_patients: int,
    seed: int = 0,
    *,
    slices: int = 24,
    rows: int = 96,
    cols: int = 96,
    spacing: Sequence[float] | None = None,
    variants: Sequence[str] = ("standard",),
) -> tuple[SyntheticExam, ...]:
    """The exams `generate_cohort` writes for these arguments, without rendering or writing.

    Cheap (no pixels): use it to inspect labels, lesions and acquisition facts of a cohort.
    Arguments as in `generate_cohort`.
    """
    shape, spacing, variants = _validate(num_patients, slices, rows, cols, spacing, variants)
    jobs, _ = _plan("", num_patients, seed, shape, spacing, variants, False, None, False)
    return tuple(job.exam for job in jobs)


def _validate(num_patients, slices, rows, cols, spacing, variants):
    shape = (int(slices), int(rows), int(cols))
    if int(num_patients) < 1:
        raise ValueError(f"num_patients must be >= 1. Received: num_patients={num_patients}")
    if shape[0] < 2 or min(shape[1:]) < 16:
        raise ValueError(f"Need slices >= 2 and rows, cols >= 16. Received: shape={shape}")
    spacing = default_spacing(shape) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers. Received: spacing={spacing}")
    spacing = tuple(float(format_ds(s)) for s in spacing)  # exactly what a reader gets back
    variants = (variants,) if isinstance(variants, str) else tuple(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if not variants or unknown:
        raise ValueError(f"variants must be a non-empty subset of {VARIANTS}. Received: {variants}")
    return shape, spacing, variants


def _prepare_output(output_dir: str, overwrite: bool):
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        marker = os.path.join(output_dir, COHORT_JSON)
        if not overwrite:
            raise FileExistsError(
                f"Output directory {output_dir} is not empty; pass overwrite=True "
                "(--overwrite) to replace a synthetic cohort there."
            )
        if not os.path.isfile(marker):
            raise FileExistsError(
                f"Refusing to overwrite {output_dir}: it has no {COHORT_JSON}, so it does not "
                "look like a synthetic cohort."
            )
        shutil.rmtree(output_dir)
    os.makedirs(output_dir, exist_ok=True)


def _category_counts(num_exams: int) -> list[str]:
    """Exam categories matching LABEL_MIX as closely as integers allow (largest remainder)."""
    quotas = [frac * num_exams for _, frac in LABEL_MIX]
    counts = [int(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: counts[i] - quotas[i])
    for i in order[: num_exams - sum(counts)]:
        counts[i] += 1
    return [name for (name, _), n in zip(LABEL_MIX, counts) for _ in range(n)]


def _lesion_kinds(category: str, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(side, pathology) of each lesion of an exam in `category`."""
    sides = schema.SIDES
    side = sides[int(rng.integers(2))]
    other = sides[1 - sides.index(side)]
    kinds = []
    if category in ("malignant_only", "both"):
        kinds.append((side, "malignant"))
        if rng.uniform() < 0.2:
            kinds.append((side, "malignant"))  # multifocal
        if category == "malignant_only" and rng.uniform() < 0.06:
            kinds.append((other, "malignant"))  # bilateral
    if category == "benign_only":
        kinds.append((side, "benign"))
        if rng.uniform() < 0.25:
            kinds.append((side if rng.uniform() < 0.5 else other, "benign"))
    if category == "both":
        kinds.append((side if rng.uniform() < 0.4 else other, "benign"))
    return kinds


def _uid(seed: int, *parts) -> str:
    return generate_uid(entropy_srcs=["mri_keras-synthetic", str(seed)] + [str(p) for p in parts])


def _plan(
    output_dir,
    num_patients,
    seed,
    shape,
    spacing,
    variants,
    extra_series,
    canonical_dir,
    series_subfolders,
):
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    exams_per_patient = rng.choice([1, 2, 3], size=num_patients, p=[0.75, 0.18, 0.07])
    categories = _category_counts(int(exams_per_patient.sum()))
    rng.shuffle(categories)
    width = max(4, len(str(num_patients - 1)))
    jobs = []
    ids = {
        k: []
        for k in (
            "patient_ids",
            "patient_names",
            "birth_dates",
            "accession_numbers",
            "study_dates",
            "uids",
        )
    }
    for patient in range(num_patients):
        patient_id = f"SYNPID{rng.integers(16**10):010X}"
        given = ("ANNA", "BEA", "CARA", "DORA")[patient % 4]
        patient_name = f"SYN^PATIENT{rng.integers(16**6):06X}^{given}"
        anatomy = sample_anatomy(rng)
        bpe_level = _BPE_LEVELS[rng.choice(4, p=[0.35, 0.35, 0.2, 0.1])]
        first_date = datetime.date(2012, 1, 1) + datetime.timedelta(days=int(rng.integers(3650)))
        age = int(rng.integers(35, 76))
        birth = first_date - datetime.timedelta(days=int(age * 365.25 + rng.integers(365)))
        ids["patient_ids"].append(patient_id)
        ids["patient_names"].append(patient_name)
        ids["birth_dates"].append(birth.strftime("%Y%m%d"))
        date = first_date
        for exam_index in range(int(exams_per_patient[patient])):
            if exam_index:
                date += datetime.timedelta(days=int(rng.integers(180, 800)))
            exam_anatomy = jitter_anatomy(anatomy, rng)
            kinds = _lesion_kinds(categories[len(jobs)], rng)
            lesions = tuple(
                place_lesion(rng, exam_anatomy, shape, spacing, side, pathology)
                for side, pathology in kinds
            )
            labels = tuple(
                int(
                    any(
                        l.side == label.split("_")[0] and l.pathology == label.split("_")[1]
                        for l in lesions
                    )
                )
                for label in LABELS
            )
            scanner = _SCANNERS[int(rng.integers(len(_SCANNERS)))]
            start = float(rng.uniform(7.5, 17.0) * 3600.0)
            t0 = start + 300.0 + float(rng.uniform(0.0, 120.0))
            gaps = rng.uniform(60.0, 90.0, size=3)
            phase_times = tuple(round(t, 3) for t in np.concatenate([[t0], t0 + np.cumsum(gaps)]))
            origin = (
                round(-0.5 * (shape[2] - 1) * spacing[2] + rng.uniform(-8, 8), 2),
                round(-0.5 * (shape[1] - 1) * spacing[1] + rng.uniform(-8, 8), 2),
                round(rng.uniform(-120, -60), 2),
            )
            exam_name = f"P{patient:0{width}d}/E{exam_index + 1}"
            variant = variants[len(jobs) % len(variants)]
            study_uid = _uid(seed, exam_name, "study")
            frame_uid = _uid(seed, exam_name, "frame")
            if variant in ("multiphase_series", "enhanced_one_file"):
                roles = ["dce"]
            elif variant == "unilateral_sagittal":
                roles = [f"{p}_{side}" for p in PHASES for side in ("right", "left")]
            else:
                roles = list(PHASES)
            if extra_series:
                roles += ["t2w", "localizer", "sub"]
            series_uids = {role: _uid(seed, exam_name, "series", role) for role in roles}
            accession = f"SYNACC{rng.integers(16**8):08X}"
            exam = SyntheticExam(
                exam=exam_name,
                patient_index=patient,
                patient_id=patient_id,
                variant=variant,
                labels=labels,
                lesions=lesions,
                shape=shape,
                spacing=spacing,
                origin=origin,
                rescale_slope=float(rng.choice(_SLOPES)),
                rescale_intercept=float(rng.choice(_INTERCEPTS)),
                manufacturer=scanner[0],
                field_strength=scanner[2],
                phase_times=phase_times,
                bpe=round(float(rng.uniform(*bpe_level) * rng.uniform(0.8, 1.2)), 4),
            )
            jobs.append(
                _ExamJob(
                    exam=exam,
                    anatomy=exam_anatomy,
                    seed=seed,
                    exam_index=exam_index,
                    patient_name=patient_name,
                    birth_date=ids["birth_dates"][-1],
                    age=int((date - birth).days // 365.25),
                    study_date=date.strftime("%Y%m%d"),
                    start_time=start,
                    accession=accession,
                    study_uid=study_uid,
                    frame_uid=frame_uid,
                    series_uids=series_uids,
                    scanner=scanner,
                    root=output_dir,
                    canonical_dir=canonical_dir,
                    extra_series=extra_series,
                    series_subfolders=series_subfolders,
                )
            )
            ids["accession_numbers"].append(accession)
            ids["study_dates"].append(date.strftime("%Y%m%d"))
            ids["uids"].extend([study_uid, frame_uid] + list(series_uids.values()))
    identifiers = SyntheticIdentifiers(**{k: tuple(v) for k, v in ids.items()})
    return jobs, identifiers


def _run_jobs(jobs: Sequence[_ExamJob], workers: int | None) -> int:
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers <= 1 or len(jobs) < 4 * workers:
        return sum(_write_exam(job) for job in jobs)
    # "spawn": the parent may hold TensorFlow threads, which fork does not copy safely.
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return sum(pool.map(_write_exam, jobs, chunksize=2))


def _quantize(values: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    stored = np.rint((values.astype(np.float64) - intercept) / slope)
    return np.clip(stored, 0, 65535).astype(np.uint16)


def _rescale(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def _file_names(rng: np.random.Generator) -> Iterator[str]:
    """Unique random file names in one of three styles common in exported archives."""
    style = int(rng.integers(3))
    used = set()
    while True:
        if style == 0:
            name = f"{rng.integers(16**12):012x}.dcm"
        elif style == 1:
            name = f"{rng.integers(16**12):012X}"
        else:
            name = f"IM{rng.integers(10**7):07d}"
        if name not in used:
            used.add(name)
            yield name


def _write_exam(job: _ExamJob) -> int:
    """Renders one exam and writes all its series; returns the number of DICOM files."""
    exam = job.exam
    render_rng = np.random.default_rng(
        np.random.SeedSequence([job.seed, 2, exam.patient_index, job.exam_index])
    )
    noise = 6.0 if exam.field_strength >= 3.0 else 9.0
    rendered = render_exam(
        exam.shape,
        exam.spacing,
        job.anatomy,
        exam.lesions,
        bpe=exam.bpe,
        gain=float(render_rng.uniform(0.6, 1.8)),
        noise_sigma=noise,
        rng=render_rng,
        extra_contrasts=job.extra_series,
    )
    slope, intercept = exam.rescale_slope, exam.rescale_intercept
    stored = {p: _quantize(rendered.phases[p], slope, intercept) for p in PHASES}
    if job.canonical_dir:
        truth = {p: _rescale(stored[p], slope, intercept) for p in PHASES}
        np.savez(
            os.path.join(job.canonical_dir, exam.npz_name),
            **truth,
            spacing=np.asarray(exam.spacing, np.float32),
            labels=np.asarray(exam.labels, np.int64),
        )

    exam_dir = os.path.join(job.root, exam.exam)
    names = _file_names(
        np.random.default_rng(
            np.random.SeedSequence([job.seed, 4, exam.patient_index, job.exam_index])
        )
    )
    header = _study_header(job)
    stem = job.scanner[3]
    orientation = ORIENTATIONS[_ORIENTATION_OF.get(exam.variant, exam.variant)]
    stacks = {p: acquire(stored[p], exam.spacing, exam.origin, orientation) for p in PHASES}
    center, width = window(_rescale(stored["t2"], slope, intercept))
    dce = dict(
        header,
        ImageType=["ORIGINAL", "PRIMARY", "M", "ND"],
        ScanningSequence="GR",
        SequenceVariant=["SP", "SS"],
        ScanOptions="FS",
        MRAcquisitionType="3D",
        RepetitionTime="4.5",
        EchoTime="1.8",
        FlipAngle="10",
        RescaleIntercept=format_ds(intercept),
        RescaleSlope=format_ds(slope),
        RescaleType="US",
        WindowCenter=center,
        WindowWidth=width,
    )
    times = exam.phase_times
    written = 0

    def series_dir(number):
        return os.path.join(exam_dir, f"SE{number:04d}") if job.series_subfolders else exam_dir

    def uids(role, count):
        return [_uid(job.seed, exam.exam, role, n) for n in range(count)]

    count = stacks["t0"].pixels.shape[0]
    if exam.variant == "multiphase_series":
        frames = [
            Frame(
                stacks[p],
                n,
                times[q],
                {
                    "TemporalPositionIdentifier": q + 1,
                    "NumberOfTemporalPositions": len(PHASES),
                    "AcquisitionNumber": q + 1,
                    "TriggerTime": format_ds(round((times[q] - times[0]) * 1000.0, 1)),
                },
            )
            for q, p in enumerate(PHASES)
            for n in range(count)
        ]
        series = dict(
            dce,
            SeriesInstanceUID=job.series_uids["dce"],
            SeriesNumber=3,
            SeriesDescription=f"{stem} multiphase",
            SeriesTime=format_time(times[0]),
            ContrastBolusAgent="GADOBUTROL",
        )
        written += len(write_series(series_dir(3), series, frames, names, uids("dce", len(frames))))
    elif exam.variant in MULTIFRAME_VARIANTS:
        written += _write_enhanced(job, dce, stacks, names, series_dir)
    elif exam.variant == "unilateral_sagittal":
        written += _write_unilateral(job, dce, stored, names, uids, series_dir)
    else:
        for q, p in enumerate(PHASES):
            series = dict(
                dce,
                SeriesInstanceUID=job.series_uids[p],
                SeriesNumber=3 + q,
                SeriesDescription=f"{stem} {'pre' if q == 0 else f'post{q}'}",
                SeriesTime=format_time(times[q]),
                AcquisitionNumber=1,
            )
            if q:
                series["ContrastBolusAgent"] = "GADOBUTROL"
            frames = [Frame(stacks[p], n, times[q]) for n in range(count)]
            written += len(write_series(series_dir(3 + q), series, frames, names, uids(p, count)))
    if job.extra_series:
        written += _write_extra_series(
            job, rendered, stored, orientation, header, names, uids, series_dir
        )
        with open(os.path.join(exam_dir, "notes.txt"), "w") as f:
            f.write("Exported from a synthetic PACS. This file is not DICOM.\n")
    return written


def _write_enhanced(job: _ExamJob, dce, stacks, names, series_dir) -> int:
    """The DCE phases as Enhanced MR objects: one file for all, or one file per phase."""
    exam = job.exam
    times = exam.phase_times
    stem = job.scanner[3]
    count = stacks["t0"].pixels.shape[0]
    # Vendors interleave frames either way (slice-major, phase-major, ...): a seeded shuffle
    # makes sure the reader uses neither.
    rng = np.random.default_rng(
        np.random.SeedSequence([job.seed, 5, exam.patient_index, job.exam_index])
    )
    if exam.variant == "enhanced_one_file":
        frames = [
            Frame(stacks[p], n, times[q], {"TemporalPositionIndex": q + 1})
            for q, p in enumerate(PHASES)
            for n in range(count)
        ]
        series = dict(
            dce,
            SeriesInstanceUID=job.series_uids["dce"],
            SeriesNumber=3,
            SeriesDescription=f"{stem} dynamic",
            SeriesTime=format_time(times[0]),
            ContrastBolusAgent="GADOBUTROL",
        )
        parts = [(3, series, frames, "index", False)]
    else:
        parts = []
        for q, p in enumerate(PHASES):
            series = dict(
                dce,
                SeriesInstanceUID=job.series_uids[p],
                SeriesNumber=3 + q,
                SeriesDescription=f"{stem} {'pre' if q == 0 else f'post{q}'}",
                SeriesTime=format_time(times[q]),
            )
            if q:
                series["ContrastBolusAgent"] = "GADOBUTROL"
            frames = [
                Frame(stacks[p], n, times[q], {"TemporalPositionIndex": q + 1})
                for n in range(count)
            ]
            parts.append((3 + q, series, frames, "datetime", True))
    for number, series, frames, temporal, per_frame in parts:
        uid = _uid(job.seed, exam.exam, "enhanced", number)
        ds = multiframe_dataset(
            series,
            frames,
            uid,
            rng.permutation(len(frames)),
            temporal=temporal,
            rescale_per_frame=per_frame,
        )
        write_multiframe(os.path.join(series_dir(number), next(names)), ds)
    return len(parts)


def _write_unilateral(job: _ExamJob, dce, stored, names, uids, series_dir) -> int:
    """The DCE phases as sagittal series per breast: two series per phase, on one grid."""
    exam = job.exam
    times = exam.phase_times
    stem = job.scanner[3]
    half = exam.shape[2] // 2  # Canonical columns run toward the patient's Left.
    written = 0
    for q, p in enumerate(PHASES):
        for s, (side, cols) in enumerate((("right", slice(0, half)), ("left", slice(half, None)))):
            origin = np.asarray(exam.origin, np.float64)
            origin[0] += cols.start * exam.spacing[2]
            stack = acquire(stored[p][:, :, cols], exam.spacing, origin, ORIENTATIONS["sagittal"])
            number = 11 + 2 * q + s  # After the extra series (1, 2, 7).
            role = f"{p}_{side}"
            # Each breast acquired on its own: the left a few seconds after the right.
            t = times[q] + 4.0 * s
            series = dict(
                dce,
                SeriesInstanceUID=job.series_uids[role],
                SeriesNumber=number,
                SeriesDescription=f"{stem} sag {side.upper()} {'pre' if q == 0 else f'post{q}'}",
                SeriesTime=format_time(t),
                AcquisitionNumber=1,
            )
            if q:
                series["ContrastBolusAgent"] = "GADOBUTROL"
            n = stack.pixels.shape[0]
            frames = [Frame(stack, k, t) for k in range(n)]
            written += len(write_series(series_dir(number), series, frames, names, uids(role, n)))
    return written


def _study_header(job: _ExamJob) -> dict[str, object]:
    exam = job.exam
    manufacturer, model, field, _ = job.scanner
    return dict(
        SpecificCharacterSet="ISO_IR 100",
        StudyDate=job.study_date,
        SeriesDate=job.study_date,
        AcquisitionDate=job.study_date,
        ContentDate=job.study_date,
        StudyTime=format_time(job.start_time),
        AccessionNumber=job.accession,
        Modality="MR",
        Manufacturer=manufacturer,
        InstitutionName="SYNTHETIC BREAST IMAGING CENTRE",
        ReferringPhysicianName="SYN^REFERRER",
        StudyDescription="MR BREAST BILATERAL WITHOUT AND WITH CONTRAST",
        ManufacturerModelName=model,
        PatientName=job.patient_name,
        PatientID=exam.patient_id,
        PatientBirthDate=job.birth_date,
        PatientSex="F",
        PatientAge=f"{job.age:03d}Y",
        BodyPartExamined="BREAST",
        MagneticFieldStrength=format_ds(field),
        ImagingFrequency=format_ds(round(42.577478 * field, 6)),
        PatientPosition="HFP",
        StudyInstanceUID=job.study_uid,
        StudyID=str(job.exam_index + 1),
        FrameOfReferenceUID=job.frame_uid,
        PositionReferenceIndicator="",
    )


def _resample_nearest(volume, spacing, origin, shape2, spacing2, origin2):
    """Nearest-neighbour sample of a canonical volume on another axis-aligned grid."""
    index = [
        np.clip(np.rint((o2 + np.arange(n2) * s2 - o) / s), 0, n - 1).astype(int)
        for n, s, o, n2, s2, o2 in zip(volume.shape, spacing, origin, shape2, spacing2, origin2)
    ]
    return volume[np.ix_(*index)]


def _write_extra_series(job, rendered, stored, orientation, header, names, uids, series_dir):
    exam = job.exam
    shape, spacing = exam.shape, np.asarray(exam.spacing)
    # Canonical voxel (k, i, j) sits at origin + (j sc, i sr, k ss): reorder to (slice,row,col).
    origin_zyx = np.asarray(exam.origin)[::-1]
    center = origin_zyx + (np.asarray(shape) - 1) / 2.0 * spacing
    start = job.start_time  # localizer first, T2 90 s later, DCE from 5 minutes on
    written = 0

    # T2-weighted axial series on its own grid (fewer, thicker slices; other matrix).
    shape2 = (max(2, round(shape[0] * 0.6)), round(shape[1] * 0.75), round(shape[2] * 0.75))
    spacing2 = np.array(
        [float(format_ds(round(n * s / n2, 3))) for n, s, n2 in zip(shape, spacing, shape2)]
    )
    origin2 = np.round(center - (np.asarray(shape2) - 1) / 2.0 * spacing2, 2)
    t2w = _resample_nearest(rendered.t2w, spacing, origin_zyx, shape2, spacing2, origin2)
    t2 = _quantize(t2w, 1.0, 0.0)
    stack = acquire(t2, spacing2, origin2[::-1], ORIENTATIONS["standard"])
    series = dict(
        header,
        SeriesInstanceUID=job.series_uids["t2w"],
        SeriesNumber=2,
        SeriesDescription="ax T2 tse fs",
        SeriesTime=format_time(start + 90.0),
        ImageType=["ORIGINAL", "PRIMARY", "M", "ND"],
        ScanningSequence="SE",
        SequenceVariant="SK",
        ScanOptions="FS",
        MRAcquisitionType="2D",
        RepetitionTime="4000",
        EchoTime="85",
        FlipAngle="90",
        AcquisitionNumber=1,
    )
    frames = [Frame(stack, n, start + 90.0) for n in range(stack.pixels.shape[0])]
    written += len(write_series(series_dir(2), series, frames, names, uids("t2w", len(frames))))

    # 3-plane localizer: one axial, one sagittal and one coronal image in one series.
    scout = _quantize(rendered.scout, 1.0, 0.0)
    mid = [n // 2 for n in shape]
    pieces = [
        (
            scout[mid[0] : mid[0] + 1, ::2, ::2],
            (spacing[0], 2 * spacing[1], 2 * spacing[2]),
            (0, mid[0], 0, 0),
            "standard",
        ),
        (
            scout[:, ::2, shape[2] // 4 : shape[2] // 4 + 1],
            (spacing[0], 2 * spacing[1], spacing[2]),
            (0, 0, 0, shape[2] // 4),
            "sagittal",
        ),
        (
            scout[:, mid[1] : mid[1] + 1, ::2],
            (spacing[0], spacing[1], 2 * spacing[2]),
            (0, 0, mid[1], 0),
            "coronal",
        ),
    ]
    frames = []
    for volume, piece_spacing, (_, k, i, j), name in pieces:
        offset = np.array([j * spacing[2], i * spacing[1], k * spacing[0]])
        origin = np.asarray(exam.origin) + offset
        stack = acquire(volume, piece_spacing, origin, ORIENTATIONS[name])
        frames.append(Frame(stack, 0, start))
    series = dict(
        header,
        SeriesInstanceUID=job.series_uids["localizer"],
        SeriesNumber=1,
        SeriesDescription="localizer 3-plane",
        SeriesTime=format_time(start),
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        ScanningSequence="GR",
        SequenceVariant="SP",
        MRAcquisitionType="2D",
        RepetitionTime="8.6",
        EchoTime="4",
        FlipAngle="20",
        AcquisitionNumber=1,
    )
    written += len(write_series(series_dir(1), series, frames, names, uids("localizer", 3)))

    # Derived t1 - t0 subtraction on the DCE grid, stamped with t1's acquisition time: it must
    # be recognised by ImageType, not by geometry or time.
    diff = np.clip(stored["t1"].astype(np.int32) - stored["t0"].astype(np.int32), 0, 65535)
    stack = acquire(diff.astype(np.uint16), exam.spacing, exam.origin, orientation)
    _, _, _, stem = job.scanner
    series = dict(
        header,
        SeriesInstanceUID=job.series_uids["sub"],
        SeriesNumber=7,
        SeriesDescription=f"{stem} SUB post1-pre",
        SeriesTime=format_time(exam.phase_times[1]),
        ImageType=["DERIVED", "PRIMARY", "SUBTRACTION", "ND"],
        ScanningSequence="GR",
        SequenceVariant=["SP", "SS"],
        ScanOptions="FS",
        MRAcquisitionType="3D",
        RepetitionTime="4.5",
        EchoTime="1.8",
        FlipAngle="10",
        AcquisitionNumber=1,
        RescaleIntercept="0",
        RescaleSlope=format_ds(exam.rescale_slope),
        RescaleType="US",
        ContrastBolusAgent="GADOBUTROL",
    )
    frames = [Frame(stack, n, exam.phase_times[1]) for n in range(stack.pixels.shape[0])]
    written += len(write_series(series_dir(7), series, frames, names, uids("sub", len(frames))))
    return written


def _write_tables(output_dir: str, exams: Sequence[SyntheticExam]) -> tuple[str, str]:
    labels_csv = os.path.join(output_dir, LABELS_CSV)
    annotations_csv = os.path.join(output_dir, ANNOTATIONS_CSV)
    with open(labels_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("exam",) + LABELS)
        for exam in exams:
            writer.writerow((exam.exam,) + tuple(exam.labels))
    with open(annotations_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(ANNOTATION_COLUMNS)
        for exam in exams:
            for lesion in exam.lesions:
                writer.writerow(
                    (exam.exam, lesion.side, lesion.pathology)
                    + tuple(lesion.center)
                    + (f"{lesion.radius:.1f}",)
                )
    return labels_csv, annotations_csv


def _write_cohort_json(output_dir, exams, seed, shape, spacing, variants, extra_series, num_files):
    """Generation parameters and identifier-free per-exam facts (no dates, IDs or UIDs)."""
    info = {
        "generator": "tfrecords_tools.synthetic",
        "seed": seed,
        "num_patients": len({e.patient_index for e in exams}),
        "num_exams": len(exams),
        "num_files": num_files,
        "shape": list(shape),
        "spacing": list(spacing),
        "variants": list(variants),
        "extra_series": extra_series,
        "label_mix": label_mix([e.labels for e in exams]),
        "exams": [
            {
                "exam": e.exam,
                "variant": e.variant,
                "rescale_slope": e.rescale_slope,
                "rescale_intercept": e.rescale_intercept,
                "manufacturer": e.manufacturer,
                "field_strength": e.field_strength,
                "bpe": e.bpe,
            }
            for e in exams
        ],
    }
    with open(os.path.join(output_dir, COHORT_JSON), "w") as f:
        json.dump(info, f, indent=1)


@dataclasses.dataclass(frozen=True)
class CohortConfig:
    """Command-line settings of the generator (see `generate_cohort` for their meaning)."""

    output_dir: str
    num_patients: int = 120
    seed: int = 0
    slices: int = 24
    rows: int = 96
    cols: int = 96
    spacing: tuple[float, float, float] | None = None
    variants: tuple[str, ...] = ("standard",)
    extra_series: bool = False
    canonical_dir: str | None = None
    series_subfolders: bool = False
    workers: int | None = None
    overwrite: bool = False


def define_flags():
    """Defines the command-line flags (called by the entry point only, never at import)."""
    from absl import flags

    flags.DEFINE_string("output_dir", None, "Cohort root to create (must be missing or empty).")
    flags.DEFINE_integer("num_patients", 120, "Number of patients (about 1.3 exams each).")
    flags.DEFINE_integer("seed", 0, "Random seed; same seed, same cohort (bytes and labels).")
    flags.DEFINE_integer("slices", 24, "Slices per volume (canonical S).")
    flags.DEFINE_integer("rows", 96, "Rows per slice (canonical H).")
    flags.DEFINE_integer("cols", 96, "Columns per slice (canonical W).")
    flags.DEFINE_list(
        "spacing",
        None,
        "Voxel spacing in mm along slice,row,col, e.g. 3,1,1. Default: 160 mm slab, 340 mm FOV.",
    )
    flags.DEFINE_list(
        "variants",
        ["standard"],
        f"Acquisition variants assigned to exams in turn; any of {','.join(VARIANTS)}.",
    )
    flags.DEFINE_bool(
        "extra_series",
        False,
        "Add a T2 series, a 3-plane localizer, a derived subtraction series and a non-DICOM "
        "file to every exam folder.",
    )
    flags.DEFINE_string(
        "canonical_dir",
        None,
        "If set, write per-exam ground truth (t0..t3 canonical float32, spacing, labels) as npz.",
    )
    flags.DEFINE_bool("series_subfolders", False, "One sub-folder per series in each exam.")
    flags.DEFINE_integer("workers", 0, "Writer processes; 0 = number of CPUs.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing synthetic cohort at output_dir.")
    flags.mark_flag_as_required("output_dir")


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    try:
        spacing = None if not f.spacing else tuple(float(v) for v in f.spacing)
    except ValueError as e:
        raise app.UsageError(f"--spacing must be 3 numbers. Received: {f.spacing}") from e
    config = CohortConfig(
        output_dir=f.output_dir,
        num_patients=f.num_patients,
        seed=f.seed,
        slices=f.slices,
        rows=f.rows,
        cols=f.cols,
        spacing=spacing,
        variants=tuple(f.variants),
        extra_series=f.extra_series,
        canonical_dir=f.canonical_dir,
        series_subfolders=f.series_subfolders,
        workers=f.workers or None,
        overwrite=f.overwrite,
    )
    options = dataclasses.asdict(config)
    cohort = generate_cohort(options.pop("output_dir"), options.pop("num_patients"), **options)
    mix = cohort.label_mix()
    print(
        f"Wrote {len(cohort.exams)} exams of {config.num_patients} patients "
        f"({cohort.num_files} DICOM files) to {os.path.abspath(cohort.root)} "
        f"in {cohort.seconds:.1f} s."
    )
    print("Label mix: " + ", ".join(f"{k} {v:.1%}" for k, v in mix.items()))
    print(f"Labels: {cohort.labels_csv}  Annotations: {cohort.annotations_csv}")
    if cohort.canonical_dir:
        print(f"Ground truth: {cohort.canonical_dir}")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
