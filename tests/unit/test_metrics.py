"""Macro-F1 against scikit-learn's reference implementation."""

from __future__ import annotations

import numpy as np
import pytest

from fedfm.evaluate import macro_f1


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    y, p = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    assert macro_f1(y, p, 3) == pytest.approx(sk.f1_score(y, p, average="macro"))


def test_macro_f1_perfect_and_hand_case():
    assert macro_f1(np.array([0, 1, 1]), np.array([0, 1, 1]), 2) == 1.0
    # class 0: tp=1 fp=1 fn=0 -> 2/3 ; class 1: tp=1 fp=0 fn=1 -> 2/3
    assert macro_f1(np.array([0, 1, 1]), np.array([0, 0, 1]), 2) == pytest.approx(2 / 3)
