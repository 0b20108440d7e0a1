"""A trained model's class probabilities, with or without test-time augmentation.

Shared by the evaluate stage, `fer-predict`, the served MLflow model and the
benchmarks, so that all of them score faces the same way. A model is a Keras
`.h5` file or its ONNX export (`python -m pipeline.export`), which runs with
ONNX Runtime and never imports TensorFlow; the views are made with NumPy alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.calibration import apply_temperature

TTA_SHIFT = 2  # pixels: about 4% of a 48-pixel face, inside the training's translations
# (rows, columns) each view is shifted by: none, up, down, left, right; each also mirrored
TTA_OFFSETS = ((0, 0), (-TTA_SHIFT, 0), (TTA_SHIFT, 0), (0, -TTA_SHIFT), (0, TTA_SHIFT))
TTA_VIEWS = 2 * len(TTA_OFFSETS)


ONNX_SUFFIX = ".onnx"


class OnnxModel:
    """An exported model in ONNX Runtime, with the part of Keras' interface used here."""

    def __init__(self, path: Path) -> None:
        import onnxruntime  # here: only a user of an ONNX file needs it

        try:
            self.session = onnxruntime.InferenceSession(
                str(path), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ONNX Runtime raises its own, unexported errors
            raise ValueError(f"{path}: not a loadable ONNX model ({exc})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 4:
            raise ValueError(
                f"{path}: expected one input of shape [batch, height, width, 1] and one "
                f"output, got inputs {[i.shape for i in inputs]}, outputs "
                f"{[o.shape for o in outputs]}; export it with python -m pipeline.export"
            )
        self._input = inputs[0].name
        self.input_shape = tuple(None if isinstance(d, str) else d for d in inputs[0].shape)
        self.output_shape = tuple(None if isinstance(d, str) else d for d in outputs[0].shape)
        self.metadata = self.session.get_modelmeta().custom_metadata_map

    def predict_on_batch(self, images) -> np.ndarray:
        batch = np.ascontiguousarray(images, dtype=np.float32)
        return self.session.run(None, {self._input: batch})[0]


def load_model(path: Path):
    """A saved Keras model, or an `OnnxModel` for a `.onnx` file; a clear error when it is
    missing or damaged."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no model; run the train stage first (dvc repro train)")
    if Path(path).suffix == ONNX_SUFFIX:
        return OnnxModel(path)
    import keras  # here: TensorFlow is not needed before a Keras model is

    try:
        return keras.models.load_model(path, compile=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a loadable Keras model ({exc})") from None


def shifted_view(images, dy: int, dx: int) -> np.ndarray:
    """A [n, h, w, 1] batch shifted by `dy` rows and `dx` columns, its edge rows and columns
    mirrored in (not wrapped round from the opposite side), so that it is still a face."""
    images = np.asarray(images)
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return images
    height, width = images.shape[1], images.shape[2]
    padded = np.pad(images, [(0, 0), (pad, pad), (pad, pad), (0, 0)], mode="symmetric")
    return padded[:, pad + dy : pad + dy + height, pad + dx : pad + dx + width, :]


def tta_views(images) -> list[np.ndarray]:
    """Ten test-time views of a [n, h, w, 1] batch, as in ten-crop evaluation: the batch
    and four copies shifted by `TTA_SHIFT` pixels up, down, left and right, each also
    mirrored left-right."""
    views = []
    for dy, dx in TTA_OFFSETS:
        view = shifted_view(images, dy, dx)
        views += [view, view[:, :, ::-1]]
    return views


def predict_probabilities(
    model, images, batch_size: int, tta: bool = False, temperature: float = 1.0
) -> np.ndarray:
    """Class probabilities for a float [n, h, w, 1] batch in [0, 255], one row per image,
    `batch_size` at a time; with `tta`, the mean over each batch's `tta_views`; with a
    `temperature` other than 1, scaled by it (`calibration.apply_temperature`)."""
    parts = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        views = tta_views(chunk) if tta else [chunk]
        parts.append(np.mean([np.asarray(model.predict_on_batch(view)) for view in views], axis=0))
    if not parts:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    probabilities = np.concatenate(parts)
    if temperature != 1.0:
        return apply_temperature(probabilities, temperature).astype(probabilities.dtype)
    return probabilities
