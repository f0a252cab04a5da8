"""The hand-made reference feature of scripts/bench/feature_baseline.py: sides and region."""

import numpy as np
from bench_scripts import load


def test_feature_reads_the_patients_side_in_front_of_the_chest_wall():
    fb = load("feature_baseline")
    t0 = np.zeros((4, 32, 32), np.float32)
    t2 = t0.copy()
    # Columns run patient right -> left (LPS): a lesion at high columns is in the LEFT breast.
    t2[2, 5:10, 22:27] = 100.0
    right, left = fb.side_scores(t0, t2, anterior=0.4, box=5)
    assert left > 50.0 and right == 0.0
    # Something brighter behind the chest wall (the heart) is outside the searched rows.
    t2[1, 20:28, 3:10] = 1000.0
    assert fb.side_scores(t0, t2, anterior=0.4, box=5) == (right, left)
    # Pre-contrast signal does not count: the feature is the enhancement t2 - t0.
    t0[2, 5:10, 22:27] = 100.0
    assert fb.side_scores(t0, t2, anterior=0.4, box=5)[1] == 0.0
