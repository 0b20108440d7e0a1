"""Whether a model's probabilities can be taken at their word, and a temperature that
makes them so.

The expected calibration error (ECE) bins the faces by the probability of the label
the model gives and averages, weighted by bin size, how far each bin's accuracy is from
its mean probability: 0 means "0.9" is right nine times in ten. Temperature scaling
(Guo et al., 2017) divides the logits by one number T fitted on the validation split by
log-loss; the label of every face stays the same, only its confidence moves. A model
keeps its T in its stamp (`pipeline.modelmeta`), and every prediction applies it.
"""

from __future__ import annotations

import math

import numpy as np

BINS = 15  # the usual choice for ECE since Guo et al.
TEMPERATURE_RANGE = (0.05, 20.0)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) of each row: the same labels, confidence scaled by `temperature`."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if temperature == 1.0:
        return probabilities
    logits = np.log(np.clip(probabilities, 1e-12, None)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def reliability(
    labels: np.ndarray, probabilities: np.ndarray, bins: int = BINS
) -> list[dict[str, float]]:
    """Per confidence bin of width 1/`bins`: its faces, mean confidence and accuracy."""
    probabilities = np.asarray(probabilities)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        rows.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": count,
                "confidence": float(confidence[inside].mean()) if count else math.nan,
                "accuracy": float(correct[inside].mean()) if count else math.nan,
            }
        )
    return rows


def expected_calibration_error(
    labels: np.ndarray, probabilities: np.ndarray, bins: int = BINS
) -> float:
    """Σ over bins of (faces in bin / faces) · |accuracy − mean confidence|."""
    return calibration_error(reliability(labels, probabilities, bins))


def calibration_error(bins: list[dict[str, float]]) -> float:
    """The expected calibration error of bins that `reliability` made."""
    total = sum(row["count"] for row in bins)
    if total == 0:
        return 0.0
    return float(
        sum(
            row["count"] / total * abs(row["accuracy"] - row["confidence"])
            for row in bins
            if row["count"]
        )
    )


def _log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, None))))


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The T in `TEMPERATURE_RANGE` with the least log-loss, by golden-section search on
    log T (the loss is unimodal in it), to four significant digits."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on no faces")
    lo, hi = (math.log(t) for t in TEMPERATURE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2

    def loss(log_t: float) -> float:
        return _log_loss(labels, apply_temperature(probabilities, math.exp(log_t)))

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > 1e-5:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(f"{math.exp((lo + hi) / 2):.4g}")
