"""`facetrack.FaceTracker` on short composed videos: the astronaut's face (scikit-image)
pasted onto bricks, which hold no face for any detector (tests/test_detectors.py), and
moved, turned, taken out of the frame and brought in between frames."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from skimage import data

from pipeline.detectors import TiltedSearch, YuNetDetector, detector_for
from pipeline.facetrack import FaceTracker

WIDTH, HEIGHT = 400, 300
OWN_TILT = -2.5  # her eyes in the photo (tests/test_faces.py)
PATCH = 120  # side of her pasted face patch; the face in it is about 75 px wide


@pytest.fixture(scope="module")
def face_patch() -> np.ndarray:
    """Her face and some hair around it, 150 px of the photo scaled to PATCH."""
    gray = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray[40:190, 149:299], (PATCH, PATCH), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def bricks() -> np.ndarray:
    return np.ascontiguousarray(data.brick()[:HEIGHT, :WIDTH])


def compose(background: np.ndarray, patch: np.ndarray, faces) -> np.ndarray:
    """`background` with `patch` pasted at each (cx, cy, tilt) of `faces`."""
    frame = background.astype(np.float32)
    for cx, cy, tilt in faces:
        turn = cv2.getRotationMatrix2D((PATCH / 2, PATCH / 2), tilt, 1.0)
        turn[:, 2] += (cx - PATCH / 2, cy - PATCH / 2)
        size = (WIDTH, HEIGHT)
        warped = cv2.warpAffine(patch.astype(np.float32), turn, size)
        mask = cv2.warpAffine(np.ones((PATCH, PATCH), np.float32), turn, size)
        frame = frame * (1 - mask) + warped * mask
    return np.clip(frame + 0.5, 0, 255).astype(np.uint8)


def centre(face) -> tuple[float, float]:
    x, y, w, h = face.box
    return x + w / 2, y + h / 2


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> tuple[TiltedSearch, dict[str, int]]:
    """YuNet with the tilt search, counting its full searches and its upright passes."""
    search = TiltedSearch(YuNetDetector())
    calls = {"detect": 0, "find": 0}
    for name, owner in (("detect", search), ("find", search.upright)):
        real = getattr(owner, name)

        def counting(gray, real=real, name=name):
            calls[name] += 1
            return real(gray)

        monkeypatch.setattr(owner, name, counting)
    return search, calls


def test_a_face_turning_to_45_degrees_is_followed_between_full_searches(
    face_patch: np.ndarray, bricks: np.ndarray, counted
) -> None:
    search, calls = counted
    tracker = FaceTracker(search, redetect_every=10)
    frames = 30
    for t in range(frames):
        tilt = 45.0 * t / (frames - 1)
        where = (130 + 3 * t, 140 + t)
        tracks = tracker.update(compose(bricks, face_patch, [(*where, tilt)]))

        [track] = tracks
        assert track.id == 0
        assert math.dist(centre(track.face), where) < 12, (t, track)
        assert abs(track.face.angle - (OWN_TILT + tilt)) < 8, (t, tilt, track.face.angle)

    assert calls["detect"] == 3, "the full search on frames 0, 10 and 20 only"
    assert tracker.full_searches == 3
    assert tracker.region_searches >= frames - 3
    # the upright pass and one per turned copy in a full search, one per look-around
    assert calls["find"] == (1 + 2 * len(search.tilts)) * 3 + tracker.region_searches


def test_a_face_leaving_ends_its_track_and_one_coming_in_waits_for_the_full_search(
    face_patch: np.ndarray, bricks: np.ndarray, counted
) -> None:
    search, _ = counted
    tracker = FaceTracker(search, redetect_every=6)
    stays, comes_in = (80, 90, 10.0), 14
    seen: list[dict[int, tuple[float, float]]] = []
    searched_on = []
    for t in range(24):
        faces = [stays]
        leaving = (280 + 14 * t, 200, -20.0)
        if leaving[0] < WIDTH + PATCH:
            faces.append(leaving)
        if t >= comes_in:
            faces.append((300, 90, 30.0))
        before = tracker.full_searches
        tracks = tracker.update(compose(bricks, face_patch, faces))
        if tracker.full_searches > before:
            searched_on.append(t)
        seen.append({track.id: centre(track.face) for track in tracks})

    [stay_id] = [i for i, where in seen[0].items() if math.dist(where, stays[:2]) < 12]
    [leave_id] = set(seen[0]) - {stay_id}
    # the face that stays keeps its id on every frame
    assert all(math.dist(frame[stay_id], stays[:2]) < 12 for frame in seen), seen
    # the leaving face is followed while it is inside, then its id is gone for good
    followed = [t for t, frame in enumerate(seen) if leave_id in frame]
    assert followed == list(range(len(followed))) and len(followed) >= 4, seen
    assert all(leave_id not in frame for frame in seen[followed[-1] + 1 :])
    # it left: a full search ran on the frame it was lost
    assert followed[-1] + 1 in searched_on
    # the face coming in is found by the first full search from its first frame on, with
    # a new id, and followed from then on
    found_on = next(t for t in searched_on if t >= comes_in)
    assert all(set(frame) == {stay_id} for frame in seen[followed[-1] + 1 : found_on]), seen
    assert all(set(frame) == {stay_id, 2} for frame in seen[found_on:]), seen
    assert math.dist(seen[-1][2], (300, 90)) < 12


def test_a_face_the_full_search_misses_stays_while_it_is_found_around_where_it_was(
    face_patch: np.ndarray, bricks: np.ndarray
) -> None:
    # upright YuNet finds her up to 70° (with landmarks as if she were upright past 30°),
    # not past 75°; her square, turned with her, still holds her at 90°
    upright = detector_for("yunet", False)
    tracker = FaceTracker(upright, redetect_every=5)
    frames = 30
    for t in range(frames):
        tilt = 90.0 * t / (frames - 1)
        frame = compose(bricks, face_patch, [(200, 150, tilt)])
        [track] = tracker.update(frame)
        assert track.id == 0 and math.dist(centre(track.face), (200, 150)) < 12, (t, track)
        if t == 25:
            assert upright.detect(frame) == [], "the full search on frame 25 finds nothing"
    assert abs(track.face.angle - (OWN_TILT + 90)) < 10, track.face.angle
    assert tracker.full_searches == 6


def test_detecting_every_frame_gives_the_detectors_own_faces(
    face_patch: np.ndarray, bricks: np.ndarray
) -> None:
    detector = detector_for("yunet", True)
    tracker = FaceTracker(detector, redetect_every=1)
    for t in range(4):
        frame = compose(bricks, face_patch, [(150 + 5 * t, 140, 8.0 * t)])
        tracks = tracker.update(frame)
        assert [track.face for track in tracks] == detector.detect(frame)
        assert [track.id for track in tracks] == [0]
    assert tracker.full_searches == 4 and tracker.region_searches == 0


def test_redetect_every_counts_the_videos_frames_not_the_calls(
    face_patch: np.ndarray, bricks: np.ndarray
) -> None:
    frame = compose(bricks, face_patch, [(200, 150, 0.0)])
    for every, searched_on in ((3, [0, 12, 24]), (10, [0, 10, 20])):
        tracker = FaceTracker(detector_for("yunet", True), redetect_every=10)
        searches = []
        for index in range(0, 30, every):
            before = tracker.full_searches
            assert [track.id for track in tracker.update(frame, index)] == [0]
            if tracker.full_searches > before:
                searches.append(index)
        assert searches == searched_on, every
    with pytest.raises(ValueError, match="frame 20 is not after frame 20, the last one"):
        tracker.update(frame, 20)


def test_redetect_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="redetect_every: 0 must be at least 1"):
        FaceTracker(detector_for("haar", False), redetect_every=0)
