"""The detector choice (`pipeline.detectors`) on a real photograph: scikit-image's astronaut.

Eileen Collins' face spans about x 178-270, y 69-161 in `skimage.data.astronaut()`, and
her eyes sit about 2.5 degrees clockwise of level (tests/test_faces.py). The wheels
behind `yunet` and `mtcnn` are project dependencies: their imports are required here.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import subprocess_env, untrained_model
from skimage import data

from pipeline import detectors
from pipeline.detectors import (
    DETECTORS,
    DetectorUnavailable,
    HaarDetector,
    MtcnnDetector,
    TiltedSearch,
    YuNetDetector,
    detector_for,
    resolve,
)
from pipeline.faces import Face, align_face
from pipeline.modelmeta import ATTRIBUTE, decode_info
from pipeline.params import ParamsError, load_params
from pipeline.predict import main
from pipeline.predictor import load_predictor

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_params(ROOT / "params.yaml")
OWN_TILT = -2.5  # her eyes in the photo
FACE_CENTRE = (224.0, 115.0)


def _gray(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def _centre(face: Face) -> tuple[float, float]:
    x, y, w, h = face.box
    return x + w / 2, y + h / 2


def _turned(gray: np.ndarray, tilt: float) -> np.ndarray:
    """The photo turned by `tilt` about her face, which stays where it was."""
    turn = cv2.getRotationMatrix2D(FACE_CENTRE, tilt, 1.0)
    return cv2.warpAffine(gray, turn, gray.shape[::-1], borderMode=cv2.BORDER_REPLICATE)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return _gray(data.astronaut())


@pytest.fixture
def fresh_choice():
    """`resolve` and `detector_for` remember their answer per process: forget it around a
    test that changes what can be imported."""
    resolve.cache_clear()
    detector_for.cache_clear()
    yield
    resolve.cache_clear()
    detector_for.cache_clear()


@pytest.mark.parametrize("name", DETECTORS)
def test_each_detector_finds_her_face(name: str, astronaut: np.ndarray) -> None:
    [face] = detector_for(name, False).detect(astronaut)

    assert np.hypot(*np.subtract(_centre(face), FACE_CENTRE)) < 12, face
    assert 75 <= face.box[2] <= 125, face
    assert abs(face.angle - OWN_TILT) < 5, face
    assert face.left_eye is not None and face.right_eye is not None
    assert face.left_eye[0] < face.right_eye[0]
    if name == "haar":
        assert face.landmarks is None
    else:
        assert len(face.landmarks) == 5
        (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = face.landmarks
        assert lx < nx < rx and mlx < mrx, face.landmarks
        assert max(ly, ry) < ny < min(mly, mry), "eyes, then the nose, then the mouth"


@pytest.mark.parametrize("name", DETECTORS)
def test_no_detector_finds_a_face_in_bricks(name: str) -> None:
    assert detector_for(name, True).detect(data.brick()) == []


@pytest.mark.parametrize("name", DETECTORS)
@pytest.mark.parametrize("tilt", [45.0, -45.0])
def test_tilted_search_finds_her_face_turned_45_degrees(
    name: str, tilt: float, astronaut: np.ndarray
) -> None:
    # The upright detectors may or may not find her at 45° (YuNet does, with landmarks
    # as if she were upright); the tilted search must, with her tilt.
    [face] = detector_for(name, True).detect(_turned(astronaut, tilt))

    assert np.hypot(*np.subtract(_centre(face), FACE_CENTRE)) < 15, face
    assert abs(face.angle - (OWN_TILT + tilt)) < 7, face


@pytest.mark.parametrize("name", DETECTORS)
def test_aligned_crop_of_a_tilted_face_has_level_eyes(name: str, astronaut: np.ndarray) -> None:
    [face] = detector_for(name, True).detect(_turned(astronaut, 40.0))
    crop = align_face(_turned(astronaut, 40.0), face, PARAMS.preprocess.face_margin)

    # judged by another detector than the one that found her: MTCNN's landmarks
    judge = "mtcnn" if name != "mtcnn" else "haar"
    [levelled] = detector_for(judge, False).detect(crop)
    assert abs(levelled.angle) < 6, levelled
    side = crop.shape[0]
    assert np.hypot(*np.subtract(_centre(levelled), (side / 2, side / 2))) < 0.15 * side


def test_the_choice_builds_the_detector_it_names() -> None:
    assert isinstance(detector_for("yunet", False), YuNetDetector)
    assert isinstance(detector_for("mtcnn", False), MtcnnDetector)
    assert isinstance(detector_for("haar", False), HaarDetector)
    searched = detector_for("haar", True)
    assert isinstance(searched, TiltedSearch) and searched.upright.tilts == ()
    assert detector_for("yunet", True) is detector_for("yunet", True)


def test_yunet_import_leaves_the_thread_setting_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    YuNetDetector()
    assert "OMP_NUM_THREADS" not in detectors.os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    YuNetDetector()
    assert detectors.os.environ["OMP_NUM_THREADS"] == "3"


# Builds YuNet in a fresh process (malloc's thresholds are process-wide and set once),
# runs the tilt search on a 640×480 frame twice, and prints the second run's page faults.
_FAULTS_OF_A_SEARCH = """
import resource, sys
import numpy as np
from pipeline.detectors import TiltedSearch, YuNetDetector, keep_freed_memory
search = TiltedSearch(YuNetDetector())
frame = np.random.default_rng(0).integers(0, 256, (480, 640), dtype=np.uint8)
search.detect(frame)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
search.detect(frame)
print(keep_freed_memory(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    sys.platform != "linux" or detectors.platform.libc_ver()[0] != "glibc",
    reason="malloc's thresholds are set on glibc only",
)
def test_yunet_reuses_its_freed_memory_unless_the_user_tuned_malloc() -> None:
    def faults(**env: str | None) -> tuple[str, int]:
        done = subprocess.run(
            [sys.executable, "-c", _FAULTS_OF_A_SEARCH],
            env=subprocess_env(**env),
            capture_output=True,
            text=True,
            check=True,
        )
        kept, count = done.stdout.split()
        return kept, int(count)

    kept, count = faults(
        GLIBC_TUNABLES=None, MALLOC_TRIM_THRESHOLD_=None, MALLOC_MMAP_THRESHOLD_=None
    )
    # the feature maps of three passes, mapped afresh, would be ~12,000 faults (50 MB)
    assert kept == "True" and count < 1000
    # a user's own setting is left alone: glibc's default value, set by hand
    kept, count = faults(MALLOC_TRIM_THRESHOLD_="131072")
    assert kept == "False" and count > 5000


def test_auto_falls_back_to_haar_when_yuface_cannot_import(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_choice: None
) -> None:
    assert resolve("auto") == "yunet"
    resolve.cache_clear()
    monkeypatch.setitem(sys.modules, "yuface", None)  # `import yuface` now raises ImportError

    with caplog.at_level(logging.WARNING, logger="pipeline.detectors"):
        assert resolve("auto") == "haar"
    assert "skipping yunet" in caplog.text and "yuface" in caplog.text
    assert isinstance(detector_for("auto", False), HaarDetector)
    with pytest.raises(DetectorUnavailable, match=r"yuface.*choose mtcnn or haar"):
        resolve("yunet")


def test_unknown_detector_is_refused() -> None:
    with pytest.raises(ValueError, match="'retina' is unknown; allowed: auto, yunet"):
        resolve("retina")
    with pytest.raises(ParamsError, match=r"preprocess\.face_detector"):
        load_params(ROOT / "params.yaml", overrides={"preprocess.face_detector": "retina"})


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    cv2.imwrite(str(path), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def haar_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose params name the Haar cascades, upright only."""
    own = PARAMS.preprocess.model_copy(update={"face_detector": "haar", "face_tilt_search": False})
    return untrained_model(tmp_path_factory.mktemp("model") / "haar.h5", own)


def test_bad_detector_option_is_a_usage_error(
    capsys: pytest.CaptureFixture, haar_model: Path, photo: Path
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(haar_model), "--detector", "retina", str(photo)])
    assert exit_.value.code == 2
    assert "--detector: invalid choice: 'retina'" in capsys.readouterr().err


def test_model_is_served_with_the_detector_its_params_name(
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
    haar_model: Path,
    photo: Path,
) -> None:
    predictor = load_predictor(haar_model)
    assert isinstance(predictor.detector, HaarDetector)
    assert predictor.detector.tilts  # today's Haar detector, with its own ±15°, ±30° copies

    with caplog.at_level(logging.INFO):
        assert main(["--model", str(haar_model), str(photo)]) == 0
    assert "face detector: haar (OpenCV" in caplog.text
    [line] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    [expected] = predictor.detector.detect(_gray(data.astronaut()))
    assert line["box"] == list(expected.box)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["--model", str(haar_model), "--detector", "yunet", str(photo)]) == 0
    assert "face detector: yunet (yuface" in caplog.text
    assert "tilt search" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["--model", str(haar_model), "--tilt-search", str(photo)]) == 0
    assert "face detector: haar (OpenCV" in caplog.text and "tilt search ±40°" in caplog.text


def test_a_detector_that_cannot_run_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    haar_model: Path,
    photo: Path,
    fresh_choice: None,
) -> None:
    monkeypatch.setitem(sys.modules, "yuface", None)
    assert main(["--model", str(haar_model), "--detector", "yunet", str(photo)]) == 2
    assert "--detector: yunet needs the yuface wheel" in caplog.text


def test_models_stamped_before_the_choice_keep_the_haar_cascades() -> None:
    old = PARAMS.preprocess.model_dump()
    del old["face_detector"], old["face_tilt_search"]
    stamp = {"classes": ["a"], "preprocess": old, "arch": "seed", "pipeline_version": "0.1.0"}

    info = decode_info(json.dumps(stamp), Path(f"old.h5 ({ATTRIBUTE})"))

    assert info.preprocess.face_detector == "haar"
    assert info.preprocess.face_tilt_search is False
