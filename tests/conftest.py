"""Shared pytest fixtures: tiny synthetic DICOM cohorts (generated once per test session).

``tiny_cohort`` and ``tiny_cohort_varied`` share seed, size and patients, so their canonical
ground truth (``canonical_dir``) is identical exam for exam; only the DICOM geometry, series
layout and extra series differ. Both are `tfrecords_tools.synthetic.SyntheticCohort` objects:
``.root``, ``.labels_csv``, ``.annotations_csv``, ``.canonical_dir``, ``.exams``,
``.identifiers``. Treat them as read-only (copy before modifying files).
"""

import pytest

TINY_COHORT = dict(num_patients=8, seed=11, slices=8, rows=32, cols=32, workers=1)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """8 patients (about 10 exams) at 8 x 32 x 32, standard axial acquisition, ground truth."""
    from tfrecords_tools import synthetic

    base = tmp_path_factory.mktemp("tiny_cohort")
    return synthetic.generate_cohort(
        str(base / "dicom"), canonical_dir=str(base / "canonical"), **TINY_COHORT
    )


@pytest.fixture(scope="session")
def tiny_cohort_varied(tmp_path_factory):
    """The same exams as `tiny_cohort`, written like a messy real archive.

    Every acquisition variant in turn (reversed columns, descending slices, sagittal, coronal,
    one multi-phase series, Enhanced MR in one file and one file per phase, one sagittal
    series per breast and phase), plus a T2 series, a 3-plane localizer, a derived subtraction
    series and a non-DICOM file per exam, each series in its own sub-folder.
    """
    from tfrecords_tools import synthetic

    base = tmp_path_factory.mktemp("tiny_cohort_varied")
    return synthetic.generate_cohort(
        str(base / "dicom"),
        canonical_dir=str(base / "canonical"),
        variants=synthetic.VARIANTS,
        extra_series=True,
        series_subfolders=True,
        **TINY_COHORT,
    )
