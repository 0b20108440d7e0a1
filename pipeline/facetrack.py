"""Faces followed from frame to frame of a video: the full search now and then, a cheap
look around each known face in between.

`FaceTracker.update` runs the detector it is given (with the tilt search the costly
part: three upright passes, on the frame and on two turned copies) on the first frame,
on every `redetect_every`-th frame after it, and on any frame where a face it follows
is lost. On the frames between, each followed face is looked for by the upright
detector alone in a small square (`REGION` face sizes, at the frame's own scale) around
where the face should be, turned by the face's last tilt, so a face tilted by 45°
stands upright in it (and, if it is not found there, turned `RETRY_TURN` further either
way); what is found is mapped back into the frame (`detectors.face_back`, as the tilt
search maps its copies) and levelled by the detector's own `level`. A face is lost when
its square holds no face of about its size near its centre, or when its centre has
left the frame. A followed face that a full search misses is looked for in its square
too, and followed on if it is there: the detector's misses on one frame do not end it.

Each followed face keeps a track id, 0, 1, 2, … in the order faces were first found;
a face found by a full search takes the id of the followed face it overlaps most
(intersection over union at least `_SAME_FACE`), else a new one. With
`redetect_every=1` every frame gets the full search and exactly the detector's faces.
Not to be confused with `pipeline.tracking`, which is MLflow's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.detectors import Detector, TiltedSearch, face_back, suppress_overlaps
from pipeline.faces import Face, check_gray

REDETECT_EVERY = 10  # frames between full searches, unless the caller says otherwise
REGION = 2.0  # side of the square looked in, in face sizes
# … at the frame's own scale (YuNet finds some faces at the size the full search saw
# them only), shrunk to at most this many pixels for a large face
REGION_MAX_SIDE = 320
# degrees the square is turned further either way when the face is not in it: a tilt
# levelled from YuNet's landmarks alone can be 20° short (detectors.YuNetDetector)
RETRY_TURN = 20.0
_SIZE_RATIO = (0.6, 1.6)  # what counts as the same face: its size against the last one's
_MAX_SHIFT = 0.5  # … and its centre at most this many face sizes from where it should be
_SAME_FACE = 0.3  # intersection over union of a fresh detection and a followed face


@dataclass(frozen=True)
class Track:
    """One face of one frame and the id of the track it belongs to."""

    id: int
    face: Face


@dataclass
class _Followed:
    id: int
    face: Face
    step: tuple[float, float] = (0.0, 0.0)  # the centre's move since the frame before


def _centre(face: Face) -> tuple[float, float]:
    x, y, w, h = face.box
    return x + w / 2, y + h / 2


def _side(face: Face) -> float:
    return float(max(face.box[2], face.box[3]))


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    iy = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _upright(detector: Detector) -> Detector:
    return detector.upright if isinstance(detector, TiltedSearch) else detector


class FaceTracker:
    """The faces of one video's frames, passed in order to `update`; one per video.
    `redetect_every` counts the video's frames, not the calls: a caller that looks at
    every N-th frame only passes each frame's index, and with N ≥ `redetect_every` every
    frame it looks at gets the full search.

    `full_searches` and `region_searches` count the detector's runs on whole frames and
    on the squares around followed faces."""

    def __init__(self, detector: Detector, redetect_every: int = REDETECT_EVERY) -> None:
        if redetect_every < 1:
            raise ValueError(f"redetect_every: {redetect_every} must be at least 1")
        self.detector = detector
        self.upright = _upright(detector)
        self.redetect_every = redetect_every
        self.full_searches = 0
        self.region_searches = 0
        self._followed: list[_Followed] = []
        self._next_id = 0
        self._searched: int | None = None  # the index of the frame last searched
        self._index = -1  # the index of the last frame

    def update(self, gray: np.ndarray, index: int | None = None) -> list[Track]:
        """The faces of the frame with this `index` in the video (None: the one after the
        last), largest first, each with its track id."""
        gray = check_gray(gray)
        index = self._index + 1 if index is None else index
        if index <= self._index:
            raise ValueError(f"frame {index} is not after frame {self._index}, the last one")
        self._index = index
        if self._searched is None or index - self._searched >= self.redetect_every:
            self._search(gray, {})
            self._searched = index
        else:
            looked = {old.id: self._look_around(gray, old) for old in self._followed}
            if all(face is not None for face in looked.values()):
                self._keep(gray, [(old, looked[old.id]) for old in self._followed])
            else:
                self._search(gray, looked)
                self._searched = index
        ordered = sorted(self._followed, key=lambda f: f.face.box[2] * f.face.box[3], reverse=True)
        return [Track(f.id, f.face) for f in ordered]

    def _search(self, gray: np.ndarray, looked: dict[int, Face | None]) -> None:
        """The full search: its faces replace the followed ones, each taking the id of the
        one it overlaps most. A followed face it missed stays if it is found around where
        it was (`looked` holds what was found so far, by id), unless every frame is
        searched: then the detector's faces are all there is."""
        self.full_searches += 1
        faces = self.detector.detect(gray)
        pairs = sorted(
            (
                (_iou(face.box, old.face.box), i, j)
                for i, face in enumerate(faces)
                for j, old in enumerate(self._followed)
            ),
            reverse=True,
        )
        taken: dict[int, _Followed] = {}
        used: set[int] = set()
        for overlap, i, j in pairs:
            if overlap < _SAME_FACE:
                break
            if i in taken or j in used:
                continue
            taken[i] = self._followed[j]
            used.add(j)
        followed = []
        for i, face in enumerate(faces):
            if i in taken:
                old = taken[i]
                followed.append(_Followed(old.id, face, _step(old.face, face)))
            else:
                followed.append(_Followed(self._next_id, face))
                self._next_id += 1
        missed = []
        if self.redetect_every > 1:
            for j, old in enumerate(self._followed):
                if j in used:
                    continue
                face = looked[old.id] if old.id in looked else self._look_around(gray, old)
                if face is not None and all(_iou(face.box, f.box) < _SAME_FACE for f in faces):
                    missed.append((old, face))
        self._followed = followed
        self._keep(gray, missed, add=True)

    def _keep(
        self, gray: np.ndarray, found: list[tuple[_Followed, Face]], add: bool = False
    ) -> None:
        """Follow on with the faces found around followed ones, levelled by the detector,
        in place of the followed faces (or beside them, with `add`); of two that came to
        overlap, the stronger stays."""
        levelled = self.upright.level(gray, [face for _, face in found])
        followed = [
            _Followed(old.id, face, _step(old.face, face))
            for (old, _), face in zip(found, levelled, strict=True)
        ]
        if add:
            followed = self._followed + followed
        kept = {id(f) for f in suppress_overlaps([f.face for f in followed])}
        self._followed = [f for f in followed if id(f.face) in kept]

    def _look_around(self, gray: np.ndarray, old: _Followed) -> Face | None:
        """The face of `old` in this frame, from the upright detector on the square around
        its expected centre turned by its last tilt, then by that tilt ± `RETRY_TURN`;
        None when it is in none of them."""
        for turn in (0.0, RETRY_TURN, -RETRY_TURN):
            face = self._look_at(gray, old, old.face.angle + turn)
            if face is not None:
                return face
        return None

    def _look_at(self, gray: np.ndarray, old: _Followed, tilt: float) -> Face | None:
        self.region_searches += 1
        cx, cy = _centre(old.face)
        cx, cy = cx + old.step[0], cy + old.step[1]
        side = _side(old.face)
        out = round(min(REGION * side, REGION_MAX_SIDE))
        scale = out / (REGION * side)
        to_region = cv2.getRotationMatrix2D((cx, cy), -tilt, scale)
        to_region[0, 2] += out / 2 - cx
        to_region[1, 2] += out / 2 - cy
        region = cv2.warpAffine(
            gray, to_region, (out, out), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        expected = side * scale
        best, best_distance = None, math.inf
        for face in self.upright.find(region):
            fx, fy = _centre(face)
            distance = math.hypot(fx - out / 2, fy - out / 2) / expected
            ratio = _side(face) / expected
            plausible = distance <= _MAX_SHIFT and _SIZE_RATIO[0] <= ratio <= _SIZE_RATIO[1]
            if plausible and distance < best_distance:
                best, best_distance = face, distance
        if best is None:
            return None
        back = cv2.invertAffineTransform(to_region)
        return face_back(best, back, tilt, gray.shape)


def _step(before: Face, after: Face) -> tuple[float, float]:
    (bx, by), (ax, ay) = _centre(before), _centre(after)
    return ax - bx, ay - by
