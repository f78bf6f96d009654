"""Metrics on a hand-worked 3-task matrix (DESIGN.md definitions)."""
import math

import numpy as np
import pytest

from clbench.core import metrics
from clbench.core.errors import ClbenchError

# rows: before training, after task 1, 2, 3; columns: tasks 1..3
R = np.array([
    [0.10, 0.20, 0.30],
    [0.90, 0.40, 0.35],
    [0.70, 0.80, 0.50],
    [0.60, 0.85, 0.95],
])


def test_average_accuracy_per_row():
    np.testing.assert_allclose(metrics.average_accuracy(R), [0.90, 0.75, (0.60 + 0.85 + 0.95) / 3])
    assert metrics.acc(R) == pytest.approx(0.8)


def test_bwt():
    # (R[3,1]-R[1,1] + R[3,2]-R[2,2]) / 2 = (0.6-0.9 + 0.85-0.8)/2
    assert metrics.bwt(R) == pytest.approx((-0.30 + 0.05) / 2)


def test_fwt():
    # (R[1,2]-R[0,2] + R[2,3]-R[0,3]) / 2 = (0.4-0.2 + 0.5-0.3)/2
    assert metrics.fwt(R) == pytest.approx(0.2)


def test_forgetting_matrix_and_final():
    F = metrics.forgetting_matrix(R)
    assert F[2, 0] == pytest.approx(0.90 - 0.70)
    assert F[3, 0] == pytest.approx(0.90 - 0.60)   # max over rows 1..2 of column 1 is 0.9
    assert F[3, 1] == pytest.approx(0.80 - 0.85)   # improved: negative forgetting
    assert np.isnan(F[1, 0]) and np.isnan(F[3, 2]) and np.isnan(F[0]).all()
    assert metrics.forgetting(R) == pytest.approx((0.30 - 0.05) / 2)


def test_forgetting_last_differs_from_chaudhry_when_a_task_peaks_later():
    # task 1 is learned to 0.5, improves to 0.9 while training task 2, then falls to 0.6
    R3 = np.array([[0.1, 0.1, 0.1], [0.5, 0.2, 0.1], [0.9, 0.8, 0.3], [0.6, 0.7, 0.9]])
    assert metrics.forgetting(R3) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.7)) / 2)  # from the best earlier row
    assert metrics.forgetting_last(R3) == pytest.approx(((0.5 - 0.6) + (0.8 - 0.7)) / 2)  # from R[j,j]
    assert metrics.forgetting_last(R3) == pytest.approx(-metrics.bwt(R3))
    assert metrics.summary(R3)["forgetting_last"] == metrics.forgetting_last(R3)
    assert math.isnan(metrics.forgetting_last(np.array([[0.1], [0.9]])))


def test_transfer_matrix():
    X = metrics.transfer_matrix(R)
    assert X[0, 0] == pytest.approx(0.0)
    assert X[1, 1] == pytest.approx(0.20) and X[1, 2] == pytest.approx(0.05) and X[2, 2] == pytest.approx(0.20)
    assert np.isnan(X[1, 0]) and np.isnan(X[3]).all()


def test_two_task_transfer_retention_and_summary():
    R2 = np.array([[0.0, 0.0], [0.95, 0.30], [0.40, 0.90]])
    assert metrics.transfer_retention(R2) == (pytest.approx(0.30), pytest.approx(0.40))
    s = metrics.summary(R2)
    assert s["transfer"] == pytest.approx(0.30) and s["retention"] == pytest.approx(0.40)
    assert s["acc"] == pytest.approx(0.65) and s["bwt"] == pytest.approx(-0.55)
    assert "transfer" not in metrics.summary(R)


def test_one_task_and_bad_shape():
    R1 = np.array([[0.1], [0.9]])
    assert metrics.acc(R1) == pytest.approx(0.9)
    assert math.isnan(metrics.bwt(R1)) and math.isnan(metrics.forgetting(R1))
    with pytest.raises(ClbenchError, match="shape"):
        metrics.acc(np.zeros((3, 3)))
