"""Reproducible facial-emotion-recognition pipeline."""

__version__ = "0.1.0"

CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
