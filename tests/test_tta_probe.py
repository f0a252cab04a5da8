"""The flip test-time averaging of scripts/bench/tta_probe.py: sides swapped back, then averaged."""

import numpy as np
from bench_scripts import load


def test_mirrored_probabilities_are_swapped_back_between_the_sides():
    tta = load("tta_probe")
    # LABELS order: left_benign, left_malignant, right_benign, right_malignant.
    mirrored = np.array([[0.1, 0.2, 0.3, 0.4]])
    np.testing.assert_array_equal(tta.swap_sides(mirrored), [[0.3, 0.4, 0.1, 0.2]])
    # A model that sees the mirror as the mirror gives the same breasts the same scores, and
    # the average keeps them; a side-blind difference is halved.
    plain = np.array([[0.3, 0.4, 0.1, 0.2], [0.0, 1.0, 0.0, 0.0]])
    mirrored = np.array([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(
        tta.flip_average(plain, mirrored), [[0.3, 0.4, 0.1, 0.2], [0.0, 0.5, 0.0, 0.0]]
    )
