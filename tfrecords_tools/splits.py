"""Patient-level train/val/test splits, seeded and stratified by malignancy."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

SPLITS = ("train", "val", "test")


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


def assign_splits(
    patient_strata: Mapping[str, int], ratios: Sequence[float], seed: int
) -> dict:
    """Assigns every patient to one split.

    Patients are stratified (e.g. 1 = any malignant breast), each stratum shuffled with
    ``seed`` and cut by ``ratios`` (largest remainder). Splits with a non-zero ratio get at least
    one patient when there are enough patients.

    Args:
      patient_strata: mapping patient pseudonym -> stratum (int).
      ratios: train, val, test fractions.
      seed: int. Shuffling seed.

    Returns:
      dict patient -> split name.
    """
    rng = np.random.default_rng(seed)
    per_split: list = [[] for _ in SPLITS]
    for stratum in sorted(set(patient_strata.values())):
        patients = sorted(p for p, s in patient_strata.items() if s == stratum)
        patients = [patients[i] for i in rng.permutation(len(patients))]
        start = 0
        for i, count in enumerate(_allocate(len(patients), ratios)):
            per_split[i].extend(patients[start : start + count])
            start += count
    wanted = [i for i, r in enumerate(ratios) if r > 0]
    if len(patient_strata) >= len(wanted):
        for i in wanted:
            if not per_split[i]:
                donor = max(wanted, key=lambda j: (len(per_split[j]), -j))
                per_split[i].append(per_split[donor].pop())
    return {p: SPLITS[i] for i, ps in enumerate(per_split) for p in ps}
