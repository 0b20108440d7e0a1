"""Calibration: the expected calibration error worked out by hand, and a fitted
temperature that undoes a known over-confidence."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    reliability,
)


def test_ece_of_a_hand_made_prediction() -> None:
    # two faces at confidence 0.9 (one right), two at 0.6 (both right); 10 bins
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    bins = reliability(labels, probabilities, bins=10)
    used = [b for b in bins if b["count"]]
    assert [(b["low"], b["count"], b["accuracy"]) for b in used] == [
        (0.6, 2, 1.0),
        (0.9, 2, 0.5),
    ]
    assert used[0]["confidence"] == pytest.approx(0.6)
    # 2/4 · |1.0 − 0.6| + 2/4 · |0.5 − 0.9|
    assert expected_calibration_error(labels, probabilities, bins=10) == pytest.approx(0.4)


def test_a_confidence_of_one_falls_in_the_last_bin() -> None:
    bins = reliability(np.array([0]), np.array([[1.0, 0.0]]), bins=15)
    assert bins[-1]["count"] == 1 and sum(b["count"] for b in bins) == 1


def test_temperature_keeps_every_label_and_scales_confidence() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (50, 7))
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for t in (0.5, 2.0):
        scaled = apply_temperature(probabilities, t)
        assert np.array_equal(scaled.argmax(1), probabilities.argmax(1))
        np.testing.assert_allclose(scaled.sum(1), 1.0)
        expected = np.exp(logits / t) / np.exp(logits / t).sum(1, keepdims=True)
        np.testing.assert_allclose(scaled, expected, rtol=1e-9)
    np.testing.assert_array_equal(apply_temperature(probabilities, 1.0), probabilities)


def test_the_fitted_temperature_undoes_a_known_over_confidence() -> None:
    # labels drawn from softmax(z); the model reports softmax(2.5 z): T should be ~2.5
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, (20_000, 7))
    true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(7, p=p) for p in true])
    reported = np.exp(2.5 * z) / np.exp(2.5 * z).sum(1, keepdims=True)

    temperature = fit_temperature(labels, reported)

    assert temperature == pytest.approx(2.5, rel=0.05)
    before = expected_calibration_error(labels, reported)
    after = expected_calibration_error(labels, apply_temperature(reported, temperature))
    assert before > 0.1 and after < 0.02


def test_no_faces_no_temperature() -> None:
    with pytest.raises(ValueError, match="no faces"):
        fit_temperature(np.array([], int), np.zeros((0, 7)))
