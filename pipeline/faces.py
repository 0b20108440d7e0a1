"""Faces in a picture and the eye-levelling crop that training and serving share.

Everything runs on a 2-D uint8 grayscale array; the caller decodes files.
`Face` is what every detector returns (`pipeline.detectors` chooses one: YuNet,
MTCNN or the Haar cascades defined here), and `align_face` is the one function
that cuts a face out for the model, in the preprocess stage and in the predictor.

Angles follow `cv2.getRotationMatrix2D`: degrees, counter-clockwise positive as
seen on screen (y pointing down). A face reports `angle=+20` when it looks like
an upright face turned 20 degrees counter-clockwise, i.e. its right-hand eye
(on the image's right) sits higher than its left-hand one; `align_face` turns
it back by `-angle`.

The cascades come from the `opencv-python(-headless)` 4.x wheels
(`cv2.data.haarcascades`). OpenCV 5 moved `CascadeClassifier` to the contrib
wheels and no 5.x wheel ships the cascade files, so there `FaceDetector` needs
`opencv-contrib-python-headless` plus the files (Debian's `opencv-data`, or a
`cascade_dir`), and otherwise says so in its error.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

FACE_CASCADE = "haarcascade_frontalface_alt2.xml"
EYE_CASCADE = "haarcascade_eye.xml"
SYSTEM_CASCADE_DIRS = (
    Path("/usr/share/opencv4/haarcascades"),
    Path("/usr/share/opencv/haarcascades"),
)

_WINDOW = 20  # the face cascade's training window: nothing smaller is found
_EYE_PATCH = 160  # side of the upright face patch the eye cascade searches
_MAX_EYE_ANGLE = 45.0


@dataclass(frozen=True)
class Face:
    """One detected face, in the input image's pixels.

    `box` is x, y, w, h, clipped to the image. For a face found on a rotated
    copy it is the face's square re-centred on the original image, not the
    bounding box of the tilted square. `left_eye` is the eye on the image's
    left. `angle` is the face's tilt (module docstring): from the eyes when
    both were found, else the rotation of the copy it was found on (0 upright).
    `landmarks`, from the detectors that give them (YuNet, MTCNN), are five
    points: the eye on the image's left, the other eye, the nose tip, the mouth
    corner on the image's left, the other corner. `score` is the detector's own
    confidence, comparable only between faces of one detector.
    """

    box: tuple[int, int, int, int]
    left_eye: tuple[float, float] | None
    right_eye: tuple[float, float] | None
    angle: float
    landmarks: tuple[tuple[float, float], ...] | None = None
    score: float = 0.0


@dataclass(frozen=True)
class _Candidate:
    cx: float
    cy: float
    size: float
    tilt: float
    weight: float


def check_gray(gray: np.ndarray) -> np.ndarray:
    gray = np.asarray(gray)
    if gray.ndim != 2:
        raise ValueError(
            f"expected a 2-D grayscale image, got an array of shape {gray.shape}; "
            "convert colour images with cv2.cvtColor first"
        )
    if gray.size == 0:
        raise ValueError(f"expected a non-empty image, got shape {gray.shape}")
    if gray.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {gray.dtype}")
    return np.ascontiguousarray(gray)


def eye_angle(left_eye: tuple[float, float], right_eye: tuple[float, float]) -> float:
    """The tilt of the line from the image-left eye to the other one (module docstring)."""
    return math.degrees(math.atan2(left_eye[1] - right_eye[1], right_eye[0] - left_eye[0]))


def square_box(
    cx: float, cy: float, side: float, shape: tuple[int, ...]
) -> tuple[int, int, int, int]:
    """The square of `side` centred on (cx, cy), clipped to an image of `shape`."""
    height, width = shape[:2]
    x0, y0 = max(0, round(cx - side / 2)), max(0, round(cy - side / 2))
    x1, y1 = min(width, round(cx + side / 2)), min(height, round(cy + side / 2))
    return (x0, y0, max(1, x1 - x0), max(1, y1 - y0))


def landmark_face(
    centre: tuple[float, float],
    side: float,
    landmarks: Sequence[tuple[float, float]],
    score: float,
    shape: tuple[int, ...],
) -> Face:
    """A face from a detector that gives five landmarks (order as `Face.landmarks`): its
    square box around `centre`, its tilt from the eyes."""
    points = tuple((float(x), float(y)) for x, y in landmarks)
    if len(points) != 5:
        raise ValueError(f"expected 5 landmarks, got {len(points)}")
    left, right = points[0], points[1]
    return Face(
        box=square_box(centre[0], centre[1], side, shape),
        left_eye=left,
        right_eye=right,
        angle=eye_angle(left, right),
        landmarks=points,
        score=float(score),
    )


def find_cascade_dir(cascade_dir: Path | None = None) -> Path:
    """The folder holding the Haar cascade files, with a fix in the error if none does."""
    if cascade_dir is not None:
        candidates = [Path(cascade_dir)]
    else:
        bundled = getattr(getattr(cv2, "data", None), "haarcascades", "")
        candidates = [Path(bundled)] if bundled else []
        candidates += SYSTEM_CASCADE_DIRS
    for folder in candidates:
        if (folder / FACE_CASCADE).is_file():
            return folder
    raise RuntimeError(
        f"no {FACE_CASCADE} in {', '.join(map(str, candidates))}; OpenCV "
        f"{cv2.__version__} does not ship the Haar cascades. Install "
        "'opencv-python-headless>=4.9,<5', whose cv2.data holds them"
    )


def _load_cascade(folder: Path, name: str) -> cv2.CascadeClassifier:
    if not hasattr(cv2, "CascadeClassifier"):
        raise RuntimeError(
            f"OpenCV {cv2.__version__} has no CascadeClassifier (OpenCV 5 moved it to "
            "the contrib wheels); install 'opencv-python-headless>=4.9,<5'"
        )
    path = folder / name
    try:
        cascade = cv2.CascadeClassifier(str(path))
    except (cv2.error, SystemError) as exc:  # OpenCV raises SystemError on a broken file
        raise RuntimeError(f"cannot load the Haar cascade {path}: {exc}") from exc
    if cascade.empty():
        raise RuntimeError(f"cannot load the Haar cascade {path}")
    return cascade


def _rotation_about(centre: tuple[float, float], angle: float, scale: float = 1.0) -> np.ndarray:
    return cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), float(angle), scale)


def map_point(matrix: np.ndarray, x: float, y: float) -> tuple[float, float]:
    px, py = matrix @ np.array([x, y, 1.0])
    return float(px), float(py)


def rotated_copy(image: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """`image` turned by `angle` on a canvas large enough to keep every corner,
    and the matrix mapping the copy's pixels back to `image`'s."""
    h, w = image.shape
    matrix = _rotation_about((w / 2, h / 2), angle)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    out_w, out_h = math.ceil(w * cos + h * sin), math.ceil(w * sin + h * cos)
    matrix[0, 2] += out_w / 2 - w / 2
    matrix[1, 2] += out_h / 2 - h / 2
    copy = cv2.warpAffine(
        image, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    return copy, cv2.invertAffineTransform(matrix)


def _overlap(a: _Candidate, b: _Candidate) -> float:
    """Intersection over the smaller square's area, treating both as upright squares."""
    ix = min(a.cx + a.size / 2, b.cx + b.size / 2) - max(a.cx - a.size / 2, b.cx - b.size / 2)
    iy = min(a.cy + a.size / 2, b.cy + b.size / 2) - max(a.cy - a.size / 2, b.cy - b.size / 2)
    if ix <= 0 or iy <= 0:
        return 0.0
    return ix * iy / min(a.size, b.size) ** 2


def _suppress_overlaps(
    candidates: Sequence[_Candidate], threshold: float = 0.5
) -> list[_Candidate]:
    """Greedy non-maximum suppression: the strongest of overlapping detections wins."""
    kept: list[_Candidate] = []
    for cand in sorted(candidates, key=lambda c: c.weight, reverse=True):
        if all(_overlap(cand, k) < threshold for k in kept):
            kept.append(cand)
    return kept


def _pick_eye_pair(
    eyes: Sequence[tuple[int, int, int, int]], patch: int
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The pair of eye detections, one each side of the patch's centre line, of
    similar size and height and a plausible distance apart; None when none fits."""
    centres = [(x + w / 2, y + h / 2, w) for x, y, w, h in eyes]
    left = [c for c in centres if c[0] < patch / 2]
    right = [c for c in centres if c[0] >= patch / 2]
    best, best_cost = None, math.inf
    for lx, ly, lw in left:
        for rx, ry, rw in right:
            distance = rx - lx
            if not 0.2 * patch <= distance <= 0.75 * patch:
                continue
            if not 0.6 <= lw / rw <= 1 / 0.6 or abs(ry - ly) > 0.5 * distance:
                continue
            cost = abs(math.log(lw / rw)) + abs(ry - ly) / distance + abs(distance / patch - 0.4)
            if cost < best_cost:
                best, best_cost = ((lx, ly), (rx, ry)), cost
    return best


class FaceDetector:
    """Frontal faces and their eyes in grayscale images of any size.

    `min_size_fraction` is the smallest face, as a fraction of the image's
    shorter side. The image is shrunk so its longer side is at most
    `max_side` pixels for the face search; eyes are searched in an upright
    patch cut from the full-resolution image. When no face is upright,
    copies turned by each of `tilts` degrees, both ways, are searched, the
    smaller tilts first.
    Cheap to pickle: only the settings travel, the cascades are reloaded.
    """

    name = "haar"

    def __init__(
        self,
        min_size_fraction: float = 0.1,
        max_side: int = 640,
        tilts: Sequence[float] = (15.0, 30.0),
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        cascade_dir: Path | None = None,
    ) -> None:
        if not 0.0 < min_size_fraction <= 1.0:
            raise ValueError(f"min_size_fraction: {min_size_fraction} is not in (0, 1]")
        if max_side < 2 * _WINDOW:
            raise ValueError(f"max_side: {max_side} is below {2 * _WINDOW} pixels")
        if scale_factor <= 1.0:
            raise ValueError(f"scale_factor: {scale_factor} must be above 1")
        self.min_size_fraction = min_size_fraction
        self.max_side = max_side
        self.tilts = tuple(float(t) for t in tilts)
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.cascade_dir = cascade_dir
        folder = find_cascade_dir(cascade_dir)
        self._faces = _load_cascade(folder, FACE_CASCADE)
        self._eyes = _load_cascade(folder, EYE_CASCADE)

    def __reduce__(self) -> tuple[type, tuple]:
        return (
            FaceDetector,
            (
                self.min_size_fraction,
                self.max_side,
                self.tilts,
                self.scale_factor,
                self.min_neighbors,
                self.cascade_dir,
            ),
        )

    def detect(self, gray: np.ndarray) -> list[Face]:
        """Faces in `gray`, largest first; an empty list when there is none."""
        gray = check_gray(gray)
        scale = min(1.0, self.max_side / max(gray.shape))
        small = gray
        if scale < 1.0:
            small = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        if min(small.shape) < _WINDOW:
            return []
        small = cv2.equalizeHist(small)
        min_face = max(_WINDOW, round(self.min_size_fraction * min(small.shape)))

        found = self._search(small, 0.0, min_face)
        for tilt in self.tilts:
            if found:
                break
            found = self._search(small, tilt, min_face) + self._search(small, -tilt, min_face)

        faces = [self._describe(gray, c, scale) for c in _suppress_overlaps(found)]
        return sorted(faces, key=lambda f: f.box[2] * f.box[3], reverse=True)

    def _search(self, small: np.ndarray, tilt: float, min_face: int) -> list[_Candidate]:
        """Upright faces in `small` turned by `-tilt`, i.e. faces tilted by `tilt`."""
        if tilt:
            image, back = rotated_copy(small, -tilt)
        else:
            image, back = small, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        boxes, _, weights = self._faces.detectMultiScale3(
            image,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(min_face, min_face),
            outputRejectLevels=True,
        )
        candidates = []
        for (x, y, w, h), weight in zip(boxes, np.ravel(weights), strict=True):
            cx, cy = map_point(back, x + w / 2, y + h / 2)
            candidates.append(_Candidate(cx, cy, float(max(w, h)), tilt, float(weight)))
        return candidates

    def _describe(self, gray: np.ndarray, cand: _Candidate, scale: float) -> Face:
        cx, cy, size = cand.cx / scale, cand.cy / scale, cand.size / scale
        eyes = self.find_eyes(gray, cx, cy, size, cand.tilt)
        angle = cand.tilt
        if eyes is not None:
            (lx, ly), (rx, ry) = eyes
            tilt = eye_angle((lx, ly), (rx, ry))
            if abs(tilt) <= _MAX_EYE_ANGLE:
                angle = tilt
            else:
                eyes = None
        return Face(
            box=square_box(cx, cy, size, gray.shape),
            left_eye=eyes[0] if eyes else None,
            right_eye=eyes[1] if eyes else None,
            angle=float(angle),
            score=cand.weight,
        )

    def find_eyes(
        self, gray: np.ndarray, cx: float, cy: float, size: float, tilt: float
    ) -> tuple[tuple[float, float], tuple[float, float]] | None:
        """Both eye centres in `gray`'s pixels, left one first, or None.

        The face is cut out upright at `_EYE_PATCH` pixels and the eye cascade
        searches the top of that patch."""
        to_patch = _rotation_about((cx, cy), -tilt, _EYE_PATCH / size)
        to_patch[0, 2] += _EYE_PATCH / 2 - cx
        to_patch[1, 2] += _EYE_PATCH / 2 - cy
        patch = cv2.warpAffine(
            gray,
            to_patch,
            (_EYE_PATCH, _EYE_PATCH),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        top = cv2.equalizeHist(patch[: int(_EYE_PATCH * 0.6)])
        detections = self._eyes.detectMultiScale(
            top,
            scaleFactor=1.1,
            minNeighbors=3,
            minSize=(_EYE_PATCH // 10, _EYE_PATCH // 10),
            maxSize=(int(_EYE_PATCH * 0.4), int(_EYE_PATCH * 0.4)),
        )
        pair = _pick_eye_pair([tuple(map(int, d)) for d in detections], _EYE_PATCH)
        if pair is None:
            return None
        back = cv2.invertAffineTransform(to_patch)
        first, second = (map_point(back, *p) for p in pair)
        return (first, second) if first[0] <= second[0] else (second, first)


@functools.cache
def default_detector() -> FaceDetector:
    """One `FaceDetector` with default settings per process, built on first use."""
    return FaceDetector()


def align_face(gray: np.ndarray, face: Face, margin: float) -> np.ndarray:
    """Level the eyes and crop a square around the face, whichever detector found it.

    One similarity transform: the image is turned by `-face.angle` (the tilt of
    the eyes, from the landmarks or the eye cascade) about the box centre
    (turning about the eyes' midpoint and re-centring on the face gives the same
    crop) and a square of side `(1 + 2 * margin)` times the face size is cut
    around it, edges replicated where it leaves the image. Returns the uint8
    crop, not resized. The preprocess stage and the predictor both crop with it.
    """
    gray = check_gray(gray)
    if margin < 0:
        raise ValueError(f"margin: {margin} must not be negative")
    x, y, w, h = face.box
    if w <= 0 or h <= 0:
        raise ValueError(f"face.box: {face.box} has no area")
    side = max(1, round(max(w, h) * (1 + 2 * margin)))
    cx, cy = x + w / 2, y + h / 2
    matrix = _rotation_about((cx, cy), -face.angle)
    matrix[0, 2] += side / 2 - cx
    matrix[1, 2] += side / 2 - cy
    return cv2.warpAffine(
        gray, matrix, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
