"""A trained model's class probabilities, with or without test-time augmentation.

Shared by the evaluate stage, `fer-predict`, the served MLflow model and the
benchmarks, so that all of them score faces the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TTA_SHIFT = 2  # pixels: about 4% of a 48-pixel face, inside the training's translations
# (rows, columns) each view is shifted by: none, up, down, left, right; each also mirrored
TTA_OFFSETS = ((0, 0), (-TTA_SHIFT, 0), (TTA_SHIFT, 0), (0, -TTA_SHIFT), (0, TTA_SHIFT))
TTA_VIEWS = 2 * len(TTA_OFFSETS)


def load_model(path: Path):
    """Load a saved model, with a clear error when it is missing or damaged."""
    import keras

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no model; run the train stage first (dvc repro train)")
    try:
        return keras.models.load_model(path, compile=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a loadable Keras model ({exc})") from None


def shifted_view(images, dy: int, dx: int):
    """A [n, h, w, 1] batch shifted by `dy` rows and `dx` columns, its edge rows and columns
    mirrored in (not wrapped round from the opposite side), so that it is still a face."""
    import tensorflow as tf

    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return tf.convert_to_tensor(images)
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="SYMMETRIC")
    return padded[:, pad + dy : pad + dy + height, pad + dx : pad + dx + width, :]


def tta_views(images) -> list:
    """Ten test-time views of a [n, h, w, 1] batch, as in ten-crop evaluation: the batch
    and four copies shifted by `TTA_SHIFT` pixels up, down, left and right, each also
    mirrored left-right."""
    import tensorflow as tf

    views = []
    for dy, dx in TTA_OFFSETS:
        view = shifted_view(images, dy, dx)
        views += [view, tf.reverse(view, axis=[2])]
    return views


def predict_probabilities(model, images, batch_size: int, tta: bool = False) -> np.ndarray:
    """Class probabilities for a float [n, h, w, 1] batch in [0, 255], one row per image,
    `batch_size` at a time; with `tta`, the mean over each batch's `tta_views`."""
    parts = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        views = tta_views(chunk) if tta else [chunk]
        parts.append(np.mean([np.asarray(model.predict_on_batch(view)) for view in views], axis=0))
    if not parts:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    return np.concatenate(parts)
