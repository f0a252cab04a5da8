"""Patient-level train/val/test splits, seeded and stratified by malignancy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from tfrecords_tools.schema import SPLITS


def parse_ratios(text: str) -> tuple:
    """Parses ``"0.6,0.2,0.2"`` (or ``"60/20/20"``) into three fractions summing to 1."""
    parts = [p for p in text.replace("/", ",").replace(":", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(
            f"--split_ratios must be three non-negative numbers for train,val,test. "
            f"Received: {text!r}"
        )
    total = sum(values)
    return tuple(v / total for v in values)


def _allocate(n: int, ratios: Sequence[float]) -> list:
    """Largest-remainder counts of ``n`` items over ``ratios``."""
    raw = [n * r for r in ratios]
    counts = [int(np.floor(x)) for x in raw]
    order = sorted(range(len(ratios)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _split_targets(n: int, ratios: Sequence[float]) -> list:
    """Patients per split: largest remainder, at least one per non-zero ratio if possible."""
    counts = _allocate(n, ratios)
    wanted = [i for i, r in enumerate(ratios) if r > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                donor = max(wanted, key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _controlled_rounding(sizes: Sequence[int], targets: Sequence[int]) -> np.ndarray:
    """Integer (strata x splits) table with row sums ``sizes`` and column sums ``targets``,
    each cell within one of its proportional share."""
    n = sum(sizes)
    ideal = np.outer(sizes, targets) / max(n, 1)
    table = np.floor(ideal).astype(int)
    row_def = np.asarray(sizes) - table.sum(axis=1)
    col_def = np.asarray(targets) - table.sum(axis=0)
    remainder = ideal - table
    cells = sorted(np.ndindex(*table.shape), key=lambda c: (-remainder[c], c))
    for s, j in cells + cells:  # Second pass: any cell where both sums still fall short.
        if row_def[s] > 0 and col_def[j] > 0:
            table[s, j] += 1
            row_def[s] -= 1
            col_def[j] -= 1
    return table


def assign_splits(patient_strata: Mapping[str, int], ratios: Sequence[float], seed: int) -> dict:
    """Assigns every patient to one split.

    The split sizes follow ``ratios`` over all patients (largest remainder; every split with a
    non-zero ratio gets a patient when there are enough); each stratum (e.g. 1 = any malignant
    breast) is spread over the splits in proportion, shuffled with ``seed``.

    Args:
      patient_strata: mapping patient pseudonym -> stratum (int).
      ratios: train, val, test fractions.
      seed: int. Shuffling seed.

    Returns:
      dict patient -> split name.
    """
    rng = np.random.default_rng(seed)
    strata = sorted(set(patient_strata.values()))
    members = [sorted(p for p, s in patient_strata.items() if s == st) for st in strata]
    targets = _split_targets(len(patient_strata), ratios)
    table = _controlled_rounding([len(m) for m in members], targets)
    out = {}
    for row, patients in zip(table, members):
        patients = [patients[i] for i in rng.permutation(len(patients))]
        start = 0
        for j, count in enumerate(row):
            for p in patients[start : start + count]:
                out[p] = SPLITS[j]
            start += count
    return out
