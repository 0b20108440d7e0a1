"""Reproducible facial-emotion-recognition pipeline."""

__version__ = "0.1.0"

CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")

# The splits of data/raw and data/processed. train and validation are always there;
# test, the faces no choice looks at, whenever data.test_fraction or the source gives one.
SPLITS: tuple[str, ...] = ("train", "validation", "test")
REQUIRED_SPLITS: tuple[str, ...] = ("train", "validation")
