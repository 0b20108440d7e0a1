"""Face detection and alignment on real photographs shipped with scikit-image.

`skimage.data.astronaut()` is Eileen Collins' portrait (512x512); measured once,
her face spans about x 178-270, y 69-161 and her eyes sit about 2.5 degrees
clockwise of level. `brick` and `rocket` hold no face.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from pipeline.faces import Face, FaceDetector, align_face, default_detector

TILT = 20.0  # degrees, counter-clockwise positive like cv2.getRotationMatrix2D


def _gray(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def _centre(face: Face) -> tuple[float, float]:
    x, y, w, h = face.box
    return x + w / 2, y + h / 2


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _as_48(crop: np.ndarray) -> np.ndarray:
    return cv2.resize(crop, (48, 48), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return default_detector()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return _gray(data.astronaut())


@pytest.fixture(scope="module")
def upright(detector: FaceDetector, astronaut: np.ndarray) -> Face:
    faces = detector.detect(astronaut)
    assert len(faces) == 1, faces
    return faces[0]


@pytest.fixture(scope="module", params=[TILT, -TILT], ids=["ccw", "cw"])
def tilted(
    request: pytest.FixtureRequest, detector: FaceDetector, astronaut: np.ndarray, upright: Face
) -> tuple[float, np.ndarray, Face]:
    """The astronaut turned by the tilt about her face's centre, and the face found in it."""
    tilt = request.param
    turn = cv2.getRotationMatrix2D(_centre(upright), tilt, 1.0)
    image = cv2.warpAffine(astronaut, turn, astronaut.shape[::-1], borderMode=cv2.BORDER_REPLICATE)
    faces = detector.detect(image)
    assert len(faces) == 1, faces
    return tilt, image, faces[0]


def test_astronaut_face_and_eyes_are_found(upright: Face) -> None:
    cx, cy = _centre(upright)
    x, y, w, h = upright.box
    assert 170 <= cx <= 260 and 60 <= cy <= 200, upright
    assert 70 <= w <= 140 and 70 <= h <= 140, upright
    assert upright.left_eye is not None and upright.right_eye is not None
    (lx, ly), (rx, ry) = upright.left_eye, upright.right_eye
    assert x < lx < cx < rx < x + w, upright
    assert y < ly < cy and y < ry < cy, "eyes belong in the upper half of the box"
    assert 0.3 * w < rx - lx < 0.7 * w
    assert abs(upright.angle) < 8


def test_tilted_face_reports_its_tilt(
    tilted: tuple[float, np.ndarray, Face], upright: Face
) -> None:
    tilt, _, face = tilted
    assert face.left_eye is not None and face.right_eye is not None
    assert abs(face.angle - tilt) < 7, face
    # relative to her own slight tilt in the original photo the match is closer
    assert abs(face.angle - upright.angle - tilt) < 5, face
    assert np.hypot(*np.subtract(_centre(face), _centre(upright))) < 0.2 * upright.box[2]


def test_alignment_levels_a_tilted_face(
    tilted: tuple[float, np.ndarray, Face],
    detector: FaceDetector,
    astronaut: np.ndarray,
    upright: Face,
) -> None:
    _, image, face = tilted
    reference = _as_48(align_face(astronaut, upright, margin=0.2))
    aligned = align_face(image, face, margin=0.2)
    unaligned = align_face(image, dataclasses.replace(face, angle=0.0), margin=0.2)

    # measured: about 0.87 aligned, 0.4 unaligned
    assert _ncc(_as_48(aligned), reference) > 0.75
    assert _ncc(_as_48(unaligned), reference) < 0.6

    found = detector.detect(aligned)
    assert found and abs(found[0].angle) < 5, found


def test_images_without_faces_give_none(detector: FaceDetector) -> None:
    assert detector.detect(data.brick()) == []
    assert detector.detect(_gray(data.rocket())) == []


def test_face_filling_a_48_pixel_crop_is_found(
    detector: FaceDetector, astronaut: np.ndarray, upright: Face
) -> None:
    small = _as_48(align_face(astronaut, upright, margin=0.2))
    faces = detector.detect(small)
    assert len(faces) == 1
    assert faces[0].box[2] >= 30


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (19, 40)])
def test_images_too_small_for_the_cascade_give_no_faces(
    detector: FaceDetector, shape: tuple[int, int]
) -> None:
    assert detector.detect(np.full(shape, 128, np.uint8)) == []


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((0, 0), np.uint8), "non-empty"),
        (np.zeros((0, 48), np.uint8), "non-empty"),
        (np.zeros((48, 48, 3), np.uint8), "2-D grayscale"),
        (np.zeros(48, np.uint8), "2-D grayscale"),
        (np.zeros((48, 48), np.float32), "uint8"),
    ],
)
def test_bad_input_is_refused(detector: FaceDetector, image: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        detector.detect(image)
    with pytest.raises(ValueError, match=message):
        align_face(image, Face((0, 0, 1, 1), None, None, 0.0), margin=0.2)


def test_align_face_crops_a_square_with_the_margin(astronaut: np.ndarray, upright: Face) -> None:
    crop = align_face(astronaut, upright, margin=0.2)
    assert crop.dtype == np.uint8
    assert crop.shape == (round(upright.box[2] * 1.4),) * 2


def test_align_face_pads_by_replicating_edges_outside_the_image() -> None:
    image = np.random.default_rng(0).integers(0, 256, (60, 80), dtype=np.uint8)
    corner = Face(box=(0, 0, 40, 40), left_eye=None, right_eye=None, angle=0.0)

    crop = align_face(image, corner, margin=0.5)  # 80x80 centred on (20, 20)

    assert crop.shape == (80, 80)
    np.testing.assert_array_equal(crop[20:, 20:], image[:60, :60])
    assert (crop[:20, :20] == image[0, 0]).all()
    np.testing.assert_array_equal(crop[:20, 20:], np.broadcast_to(image[0, :60], (20, 60)))

    turned = align_face(image, dataclasses.replace(corner, box=(50, 30, 30, 30), angle=30.0), 1.0)
    assert turned.shape == (90, 90)


def test_align_face_refuses_a_negative_margin(astronaut: np.ndarray, upright: Face) -> None:
    with pytest.raises(ValueError, match="margin"):
        align_face(astronaut, upright, margin=-0.1)


def test_detector_survives_pickling(detector: FaceDetector, astronaut: np.ndarray) -> None:
    copy = pickle.loads(pickle.dumps(detector))
    assert copy.detect(astronaut) == detector.detect(astronaut)


def test_default_detector_is_built_once() -> None:
    assert default_detector() is default_detector()


def test_missing_cascades_raise_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="haarcascade_frontalface"):
        FaceDetector(cascade_dir=tmp_path)


def test_broken_cascade_file_raises_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "haarcascade_frontalface_alt2.xml").write_text("not a cascade")
    with pytest.raises(RuntimeError, match="cannot load the Haar cascade"):
        FaceDetector(cascade_dir=tmp_path)
