"""A trained model with the face preparation it was trained with: faces in, emotions out.

`Predictor` finds and levels faces (with the detector the model's params name,
`detectors.detector_for`, and `faces.align_face`), turns them into model input with
`imageops.to_model_input` and the preprocessing params stored inside the model file
(`modelmeta.read_model_info`), so a face is prepared exactly as the faces the model
was trained on, and classifies them in batches.
For video, `face_inputs` takes a `facetrack.FaceTracker` (`tracker`), which runs
the detector every few frames and follows the faces in between, each with a track id.
`load_predictor` opens a model file or an MLflow model URI. Used by `fer-predict`
(`pipeline.predict`) and by the served MLflow model (`pipeline.serving`).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipeline.detectors import Detector, detector_for
from pipeline.faces import align_face
from pipeline.facetrack import FaceTracker
from pipeline.imageops import to_model_input
from pipeline.inference import ONNX_SUFFIX, OnnxModel, load_model, predict_probabilities
from pipeline.modelmeta import ATTRIBUTE, ModelInfo, decode_info, read_model_info

# the model file inside a model logged by `serving.log_pyfunc_model`: Keras or its ONNX export
MODEL_FILES = ("model.h5", "model" + ONNX_SUFFIX)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # runs:/, models:/, s3://; not C:/
HEAT_MAP_SCALE = 4  # screen pixels per model-input pixel: a 48-pixel face is hard to see


class ModelError(ValueError):
    """The model cannot be used: missing, not loadable, or without its model info."""


@dataclass(frozen=True)
class FaceInput:
    """One face: where it is, the tilt it was levelled by, and the model input made from it."""

    box: tuple[int, int, int, int]
    angle: float | None  # None when the whole picture was taken as the face
    crop: np.ndarray  # picture_size² uint8, from `to_model_input`
    track: int | None = None  # its track id in a video (`facetrack.FaceTracker`)


@dataclass
class Result:
    """Everything found in one picture or video frame."""

    input: str
    frame: int | None = None
    faces: list[FaceInput] = field(default_factory=list)
    probabilities: np.ndarray | None = None  # one row per face
    error: str | None = None

    @property
    def name(self) -> str:
        return self.input if self.frame is None else f"{self.input} frame {self.frame}"

    def labels(self, classes: Sequence[str]) -> list[tuple[str, float]]:
        """The top class and its probability, per face."""
        if self.probabilities is None:
            return []
        return [(classes[int(row.argmax())], float(row.max())) for row in self.probabilities]

    def records(self, classes: Sequence[str]) -> list[dict]:
        """The JSON lines of this picture: one per face, or one saying why there is none."""
        base = {"input": self.input, "frame": self.frame}
        empty = {
            "face": None,
            "track": None,
            "box": None,
            "angle": None,
            "label": None,
            "probabilities": None,
        }
        if self.error is not None:
            return [{**base, "faces": None, **empty, "error": self.error}]
        if not self.faces:
            return [{**base, "faces": 0, **empty, "error": None}]
        records = []
        for index, (face, (label, _)) in enumerate(
            zip(self.faces, self.labels(classes), strict=True)
        ):
            row = self.probabilities[index]
            records.append(
                {
                    **base,
                    "faces": len(self.faces),
                    "face": index,
                    "track": face.track,
                    "box": list(face.box),
                    "angle": None if face.angle is None else round(face.angle, 2),
                    "label": label,
                    "probabilities": {
                        name: round(float(p), 6) for name, p in zip(classes, row, strict=True)
                    },
                    "error": None,
                }
            )
        return records

    def summary(self, classes: Sequence[str]) -> str:
        """One line for a person: `photo.jpg: 1 face — happy 0.87`."""
        if self.error is not None:
            return f"{self.name}: error: {self.error}"
        if not self.faces:
            return f"{self.name}: no face found"
        count = len(self.faces)
        found = ", ".join(f"{label} {p:.2f}" for label, p in self.labels(classes))
        return f"{self.name}: {count} face{'s' if count > 1 else ''} — {found}"


def model_batch(crops: Sequence[np.ndarray]) -> np.ndarray:
    """The model's input for `FaceInput.crop`s: a float32 [n, size, size, 1] batch."""
    return np.stack(crops).astype(np.float32)[..., np.newaxis]


class Predictor:
    """A trained model with the face preparation it was trained with."""

    def __init__(
        self,
        model,
        info: ModelInfo,
        batch_size: int = 64,
        detector: Detector | None = None,
    ) -> None:
        size = info.preprocess.picture_size
        expected = (None, size, size, 1)
        if tuple(model.input_shape) != expected:
            raise ModelError(
                f"the model takes inputs of shape {tuple(model.input_shape)}, but its model "
                f"info says {size}×{size} grayscale; the file was stamped for another model"
            )
        if model.output_shape[-1] != len(info.classes):
            raise ModelError(
                f"the model has {model.output_shape[-1]} outputs but its model info names "
                f"{len(info.classes)} classes"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size: {batch_size} must be at least 1")
        self.model = model
        self.info = info
        self.batch_size = batch_size
        self._detector = detector

    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.classes

    @property
    def detector(self) -> Detector:
        """The face detector the model's params name (`preprocess.face_detector` and
        `face_tilt_search`), built on first use, unless `use_detector` chose another."""
        if self._detector is None:
            self.use_detector()
        return self._detector

    def use_detector(self, choice: str | None = None, tilt_search: bool | None = None) -> Detector:
        """Detect faces with `choice` (`detectors.CHOICES`) and `tilt_search`; None keeps
        what the model's params say. Raises `detectors.DetectorUnavailable` when the
        detector cannot run here."""
        params = self.info.preprocess
        self._detector = detector_for(
            params.face_detector if choice is None else choice,
            params.face_tilt_search if tilt_search is None else tilt_search,
        )
        return self._detector

    def tracker(self, redetect_every: int) -> FaceTracker:
        """A tracker for one video's frames, on this predictor's detector: the full
        search every `redetect_every`-th frame of the video (and when a face is lost)."""
        return FaceTracker(self.detector, redetect_every)

    def face_inputs(
        self,
        gray: np.ndarray,
        detect: bool = True,
        tracker: FaceTracker | None = None,
        frame: int | None = None,
    ) -> list[FaceInput]:
        """The faces in a grayscale picture, largest first, each made into model input.

        With `detect` off the whole picture is the face, as in the FER datasets. With a
        `tracker` the picture is frame `frame` of its video (None: the one after the last
        it saw): the tracker finds the faces and gives each its track id."""
        params = self.info.preprocess
        if not detect:
            height, width = gray.shape
            return [FaceInput((0, 0, width, height), None, to_model_input(gray, params))]
        if tracker is None:
            found = [(None, face) for face in self.detector.detect(gray)]
        else:
            found = [(track.id, track.face) for track in tracker.update(gray, frame)]
        return [
            FaceInput(
                face.box,
                face.angle,
                to_model_input(align_face(gray, face, params.face_margin), params),
                track,
            )
            for track, face in found
        ]

    def probabilities(self, crops: Sequence[np.ndarray], tta: bool = False) -> np.ndarray:
        """Class probabilities, one row per crop; averaged over `inference.tta_views` with
        `tta`; scaled by the model's calibrated temperature, when it has one."""
        if len(crops) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return predict_probabilities(
            self.model, model_batch(crops), self.batch_size, tta, temperature=self.info.temperature
        )

    def heat_map_problem(self) -> str | None:
        """Why Grad-CAM cannot explain this model's faces, or None when it can: an ONNX
        export has no gradients, a model without a convolution no feature map."""
        if isinstance(self.model, OnnxModel):
            return (
                "heat maps need the model's gradients, which its ONNX export has not; use the "
                "Keras model it was exported from (models/model.h5, or the run's "
                "runs:/<run id>/emotion_model)"
            )
        # here: it imports TensorFlow, which ONNX models and --help do without
        from pipeline.explain import feature_layer

        try:
            feature_layer(self.model)
        except ValueError as exc:  # no convolution, so no feature map to weigh
            return str(exc)
        return None

    def heat_map_pictures(
        self, crops: Sequence[np.ndarray], labels: np.ndarray
    ) -> list[np.ndarray]:
        """Per crop, an RGB picture of it enlarged `HEAT_MAP_SCALE` times with the Grad-CAM
        heat map of its label (`explain.heat_maps`) painted over it; `batch_size` crops to
        a gradient pass."""
        # here: it imports TensorFlow, which ONNX models and --help do without
        from pipeline.explain import heat_maps, overlay

        pictures = []
        for start in range(0, len(crops), self.batch_size):
            chunk = crops[start : start + self.batch_size]
            heats = heat_maps(self.model, model_batch(chunk), labels[start : start + len(chunk)])
            for crop, heat in zip(chunk, heats, strict=True):
                enlarged = cv2.resize(
                    crop,
                    None,
                    fx=HEAT_MAP_SCALE,
                    fy=HEAT_MAP_SCALE,
                    interpolation=cv2.INTER_NEAREST,
                )
                pictures.append(overlay(enlarged, heat))
        return pictures

    def classify(self, results: Sequence[Result], tta: bool = False) -> None:
        """Fill in the probabilities of every face of `results`, in one batched pass."""
        crops = [face.crop for result in results for face in result.faces]
        probabilities = self.probabilities(crops, tta)
        start = 0
        for result in results:
            if result.error is None:
                result.probabilities = probabilities[start : start + len(result.faces)]
                start += len(result.faces)


def is_model_uri(reference: str) -> bool:
    """True for an MLflow URI (`runs:/…`, `models:/…`, `s3://…`), False for a file path."""
    return bool(_URI.match(str(reference)))


def read_info(path: Path) -> ModelInfo:
    """The model info stamped in a `.h5` model or its ONNX export."""
    if path.suffix == ONNX_SUFFIX:
        return decode_info(load_model(path).metadata.get(ATTRIBUTE), path)
    return read_model_info(path)


def _load_model_file(path: Path, batch_size: int) -> Predictor:
    if not path.is_file():
        raise ModelError(
            f"{path}: no model; run the train stage first (dvc repro train) or name one "
            "with --model"
        )
    if path.suffix == ".keras":
        raise ModelError(
            f"{path}: a .keras file is not read here, as it holds no record of the class "
            "order and preprocessing the model was trained with; use the model.h5 the train "
            "stage writes, or its ONNX export (python -m pipeline.export)"
        )
    try:
        if path.suffix == ONNX_SUFFIX:
            model = load_model(path)
            info = decode_info(model.metadata.get(ATTRIBUTE), path)
        else:
            info = read_model_info(path)  # first: it refuses an unstamped model cheaply
            model = load_model(path)
    except (FileNotFoundError, ValueError) as exc:
        raise ModelError(str(exc)) from None
    return Predictor(model, info, batch_size)


def _find_model_file(downloaded: Path, uri: str) -> Path:
    if downloaded.is_file():
        return downloaded
    found = sorted(path for name in MODEL_FILES for path in downloaded.rglob(name))
    if len(found) != 1:
        held = ", ".join(sorted(p.name for p in downloaded.iterdir())) or "nothing"
        raise ModelError(
            f"{uri}: expected one {' or '.join(MODEL_FILES)} in the logged model, found "
            f"{len(found)} (it holds: {held}); log the model with "
            "pipeline.serving.log_pyfunc_model"
        )
    return found[0]


def load_predictor(reference: str | Path, batch_size: int = 64) -> Predictor:
    """A model file, or an MLflow model URI whose `model.h5` or `model.onnx` artifact is
    downloaded."""
    if not is_model_uri(str(reference)):
        return _load_model_file(Path(reference), batch_size)
    # MLflow only for a URI: a model file needs none, and it costs a second of start-up
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="fer-model-") as tmp:
        try:
            downloaded = mlflow.artifacts.download_artifacts(
                artifact_uri=str(reference), dst_path=tmp
            )
        except (MlflowException, OSError) as exc:
            message = getattr(exc, "message", None) or str(exc)
            raise ModelError(
                f"{reference}: cannot download from MLflow at {mlflow.get_tracking_uri()} "
                f"({message}); set MLFLOW_TRACKING_URI to the store the model was logged in"
            ) from None
        return _load_model_file(_find_model_file(Path(downloaded), str(reference)), batch_size)
