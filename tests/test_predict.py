"""`fer-predict` on real photographs shipped with scikit-image, FER-style crops, a video
the test writes itself, broken files of every kind, and a model logged in MLflow.

The model is the seed CNN with its initial weights, stamped like the train stage
stamps its output: its quality does not matter here, its plumbing does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import keras
import mlflow
import numpy as np
import pytest
from conftest import subprocess_env, untrained_model
from PIL import Image
from skimage import data

from pipeline import CLASSES
from pipeline.detectors import detector_for
from pipeline.explain import heat_maps, overlay
from pipeline.faces import align_face, default_detector
from pipeline.imageops import MAX_PIXELS, ImageError, read_image, to_model_input
from pipeline.modelmeta import info_for, write_model_info
from pipeline.params import load_params
from pipeline.predict import Report, gui_problem, iter_frames, main, run
from pipeline.predictor import Predictor, load_predictor, model_batch
from pipeline.sample import draw_image

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_params(ROOT / "params.yaml")
TILT = 20.0
# a JSON line's keys, in order: "track" was added, the others are as they always were
KEYS = [
    "input",
    "frame",
    "faces",
    "face",
    "track",
    "box",
    "angle",
    "label",
    "probabilities",
    "error",
]


def save_rgb(path: Path, rgb: np.ndarray) -> Path:
    Image.fromarray(rgb).save(path)
    return path


def cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, list[dict]]:
    """Run `fer-predict` in-process; its exit status and its JSON lines."""
    code = main([str(a) for a in args])
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines()]


def centre(box: list[int]) -> tuple[float, float]:
    x, y, w, h = box
    return x + w / 2, y + h / 2


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def png(width: int, height: int, pixels: bytes) -> bytes:
    """A grayscale PNG with this header and these (zlib-compressed) pixel rows."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def black_png(side: int) -> bytes:
    """A real side×side black PNG, built without holding its pixels in memory: 1.7 MB on
    disk for 20,000², 400 MB once decoded."""
    rows = zlib.compressobj(1)
    block = b"\0" * ((side + 1) * 500)  # each row: filter byte 0, then the pixels
    parts = [rows.compress(block) for _ in range(side // 500)]
    parts.append(rows.compress(b"\0" * ((side + 1) * (side % 500))))
    return png(side, side, b"".join([*parts, rows.flush()]))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_model(tmp_path_factory.mktemp("model") / "model.h5", PARAMS.preprocess)


@pytest.fixture(scope="module")
def predictor(model_path: Path) -> Predictor:
    return load_predictor(model_path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The astronaut (a face), a copy tilted by TILT about her face, and two without a face."""
    folder = tmp_path_factory.mktemp("photos")
    astronaut = data.astronaut()
    face = default_detector().detect(cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY))[0]
    x, y, w, h = face.box
    turn = cv2.getRotationMatrix2D((x + w / 2, y + h / 2), TILT, 1.0)
    tilted = cv2.warpAffine(astronaut, turn, (512, 512), borderMode=cv2.BORDER_REPLICATE)
    return {
        "astronaut": save_rgb(folder / "astronaut.jpg", astronaut),
        "tilted": save_rgb(folder / "tilted.png", tilted),
        "brick": save_rgb(folder / "brick.png", data.brick()),
        "rocket": save_rgb(folder / "rocket.webp", data.rocket()),
    }


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FER-style 48×48 grayscale faces in nested folders, plus a file that is no picture."""
    folder = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(7)
    for name, emotion in [("b/1.png", "happy"), ("0.jpg", "sad"), ("a/2.png", "surprise")]:
        path = folder / "faces" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(draw_image(emotion, rng, 48)).save(path)
    (folder / "faces" / "README.txt").write_text("not a picture, skipped")
    return folder / "faces"


def test_astronaut_face_gets_seven_probabilities(
    capsys: pytest.CaptureFixture, model_path: Path, photos: dict[str, Path]
) -> None:
    code, lines = cli(capsys, "--model", model_path, photos["astronaut"])

    assert code == 0
    [line] = lines
    assert list(line) == KEYS and line["track"] is None
    assert line["input"] == str(photos["astronaut"]) and line["frame"] is None
    assert line["faces"] == 1 and line["face"] == 0 and line["error"] is None
    # her face spans about x 178-270, y 69-161 (tests/test_faces.py)
    cx, cy = centre(line["box"])
    assert 190 <= cx <= 260 and 80 <= cy <= 150, line["box"]
    assert 70 <= line["box"][2] <= 140, line["box"]
    probabilities = line["probabilities"]
    assert list(probabilities) == list(CLASSES)
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert all(0.0 <= p <= 1.0 for p in probabilities.values())
    assert line["label"] == max(probabilities, key=probabilities.get)


def test_tilted_face_is_found_and_levelled(
    capsys: pytest.CaptureFixture,
    model_path: Path,
    predictor: Predictor,
    photos: dict[str, Path],
) -> None:
    code, [line] = cli(capsys, "--model", model_path, photos["tilted"])

    assert code == 0 and line["faces"] == 1, line
    assert abs(line["angle"] - TILT) < 7, line
    upright = predictor.face_inputs(read_image(photos["astronaut"]))[0].crop
    tilted = predictor.face_inputs(read_image(photos["tilted"]))[0].crop
    unlevelled = to_model_input(
        align_face(
            read_image(photos["tilted"]),
            dataclasses.replace(
                default_detector().detect(read_image(photos["tilted"]))[0], angle=0
            ),
            PARAMS.preprocess.face_margin,
        ),
        PARAMS.preprocess,
    )
    # measured: about 0.87 levelled, 0.4 left tilted (tests/test_faces.py)
    assert ncc(tilted, upright) > 0.75
    assert ncc(unlevelled, upright) < 0.6


def test_pictures_without_a_face_say_so(
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    model_path: Path,
    photos: dict[str, Path],
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)

    code = main(["--model", str(model_path), str(photos["brick"]), str(photos["rocket"])])

    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [line["input"] for line in lines] == [str(photos["brick"]), str(photos["rocket"])]
    for line in lines:
        assert line["faces"] == 0 and line["error"] is None
        assert line["label"] is None and line["probabilities"] is None and line["box"] is None
        assert list(line) == KEYS and line["track"] is None
    assert f"{photos['brick']}: no face found" in err
    assert f"{photos['rocket']}: no face found" in err


def test_summary_names_the_label_on_a_terminal_only(
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    model_path: Path,
    photos: dict[str, Path],
) -> None:
    main(["--model", str(model_path), str(photos["astronaut"])])
    assert capsys.readouterr().err == ""  # not a terminal: the JSON lines only

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    main(["--model", str(model_path), str(photos["astronaut"])])

    out, err = capsys.readouterr()
    line = json.loads(out)
    top = max(line["probabilities"].values())
    assert f"{photos['astronaut']}: 1 face — {line['label']} {top:.2f}" in err


def test_no_detect_classifies_whole_crops_from_folders(
    capsys: pytest.CaptureFixture, model_path: Path, crops: Path
) -> None:
    code, lines = cli(capsys, "--model", model_path, "--no-detect", crops)

    assert code == 0
    assert [Path(line["input"]).relative_to(crops).as_posix() for line in lines] == [
        "0.jpg",
        "a/2.png",
        "b/1.png",
    ]
    for line in lines:
        assert line["faces"] == 1 and line["box"] == [0, 0, 48, 48] and line["angle"] is None
        assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_faces_are_prepared_with_the_models_own_params(
    capsys: pytest.CaptureFixture, tmp_path: Path, crops: Path, photos: dict[str, Path]
) -> None:
    """A model stamped with other preprocessing than params.yaml's gets faces made its way."""
    own = PARAMS.preprocess.model_copy(
        update={
            "picture_size": 40,
            "equalization": "clahe",
            "denoise": "median",
            "face_margin": 0.3,
        }
    )
    assert own != PARAMS.preprocess
    path = untrained_model(tmp_path / "other.h5", own)
    model = keras.models.load_model(path, compile=False)
    crop = crops / "b" / "1.png"

    code, [line] = cli(capsys, "--model", path, "--no-detect", crop)

    assert code == 0
    expected = model.predict(to_model_input(read_image(crop), own)[None, ..., None], verbose=0)[0]
    assert list(line["probabilities"].values()) == pytest.approx(expected.tolist(), abs=2e-6)

    gray = read_image(photos["astronaut"])
    [face] = detector_for(own.face_detector, own.face_tilt_search).detect(gray)
    [found] = load_predictor(path).face_inputs(gray)
    assert found.crop.shape == (40, 40)
    np.testing.assert_array_equal(found.crop, to_model_input(align_face(gray, face, 0.3), own))


def test_bad_inputs_each_get_their_own_error(
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    model_path: Path,
    photos: dict[str, Path],
) -> None:
    jpeg = photos["astronaut"].read_bytes()
    bad = {
        "missing.jpg": (None, "no such file"),
        "notes.jpg": (b"a shopping list, not a picture\n", "not an image"),
        "empty.png": (b"", "empty file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        # Pillow refuses to identify a 0×0 file, so it never reaches the size check
        "zero.png": (png(0, 0, zlib.compress(b"")), "no pixels|not an image"),
        "huge.png": (black_png(20_000), f"{MAX_PIXELS:,}"),
        "broken.mp4": (b"\x00\x00\x00\x18ftypmp42" + b"junk" * 100, "cannot be opened as a video"),
        "gone.avi": (None, "no such file"),
    }
    for name, (content, _) in bad.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
    paths = [tmp_path / name for name in bad]

    with caplog.at_level(logging.ERROR):
        code, lines = cli(capsys, "--model", model_path, paths[0], photos["astronaut"], *paths[1:])

    assert code == 1
    assert [line["input"] for line in lines] == [str(paths[0]), str(photos["astronaut"])] + [
        str(p) for p in paths[1:]
    ]
    good = lines.pop(1)
    assert good["error"] is None and good["faces"] == 1 and good["label"] in CLASSES
    for line, (name, (_, pattern)) in zip(lines, bad.items(), strict=True):
        assert line["error"] and re.search(pattern, line["error"]), (name, line["error"])
        assert line["label"] is None and line["probabilities"] is None
        assert any(rec.getMessage().startswith(f"{tmp_path / name}: ") for rec in caplog.records), (
            name
        )
    # the 20,000² picture is refused from its header, not after a 400 MB decode
    started = time.perf_counter()
    with pytest.raises(ImageError, match=f"{MAX_PIXELS:,}"):
        read_image(tmp_path / "huge.png")
    assert time.perf_counter() - started < 0.25


def test_annotated_copies_are_written(
    capsys: pytest.CaptureFixture, tmp_path: Path, model_path: Path, photos: dict[str, Path]
) -> None:
    folder = tmp_path / "annotated"
    inputs = [photos["astronaut"], photos["brick"]]

    code, lines = cli(capsys, "--model", model_path, "--annotate", folder, *inputs)

    assert code == 0 and len(lines) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["astronaut.jpg", "brick.png"]
    for source in inputs:
        original = np.asarray(Image.open(source).convert("RGB"))
        copy = np.asarray(Image.open(folder / source.name).convert("RGB"))
        assert copy.shape == original.shape
        changed = np.abs(copy.astype(int) - original.astype(int)).max(axis=2) > 60
        assert changed.sum() > 500, source.name  # a box and a caption, not JPEG noise
    # the box is drawn around the face: the pixels changed on its outline
    x, y, _, h = lines[0]["box"]
    original = np.asarray(Image.open(inputs[0]).convert("RGB")).astype(int)
    copy = np.asarray(Image.open(folder / "astronaut.jpg").convert("RGB")).astype(int)
    outline = np.abs(copy - original)[y + h // 4 : y + 3 * h // 4, max(0, x - 4) : x + 5]
    assert (outline.max(axis=2) > 60).any()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 frames of the astronaut at 320×240, Motion-JPEG in AVI (opencv-python-headless
    writes MJPG/.avi and mp4v/.mp4; it has no H.264 encoder)."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    bgr = cv2.cvtColor(cv2.resize(data.astronaut(), (240, 240)), cv2.COLOR_RGB2BGR)
    frame = cv2.copyMakeBorder(bgr, 0, 0, 40, 40, cv2.BORDER_CONSTANT, value=(90, 90, 90))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    assert writer.isOpened()
    for _ in range(30):
        writer.write(frame)
    writer.release()
    return path


def test_video_every_tenth_frame(
    capsys: pytest.CaptureFixture, tmp_path: Path, model_path: Path, clip: Path
) -> None:
    folder = tmp_path / "annotated"

    code, lines = cli(
        capsys, "--model", model_path, "--every", 10, "--annotate", folder, "--explain", clip
    )

    assert code == 0
    assert [line["frame"] for line in lines] == [0, 10, 20]
    for line in lines:
        assert line["input"] == str(clip) and line["faces"] == 1 and line["label"] in CLASSES
        cx, cy = centre(line["box"])
        assert 40 + 80 <= cx <= 40 + 125 and 35 <= cy <= 75, line["box"]
    written = sorted(p.name for p in folder.iterdir())
    frames = [f"clip_frame{n:06d}" for n in (0, 10, 20)]
    assert written == sorted(
        [f"{f}.png" for f in frames] + [f"{f}_face0_gradcam.png" for f in frames]
    )
    assert cv2.imread(str(folder / f"{frames[0]}.png")).shape == (240, 320, 3)


def test_video_faces_are_followed_with_one_track_id(
    capsys: pytest.CaptureFixture, model_path: Path, predictor: Predictor, clip: Path
) -> None:
    code, followed = cli(capsys, "--model", model_path, "--every", 1, "--redetect-every", 10, clip)
    assert code == 0
    assert [line["frame"] for line in followed] == list(range(30))
    assert all(list(line) == KEYS for line in followed)
    assert all(line["faces"] == 1 and line["track"] == 0 for line in followed), followed

    # detecting on every frame gives the detector's own boxes, as before there were tracks
    code, detected = cli(capsys, "--model", model_path, "--every", 1, "--redetect-every", 1, clip)
    grays = [frame.gray for frame in iter_frames([clip], every=1)]
    assert [line["box"] for line in detected] == [
        list(predictor.detector.detect(gray)[0].box) for gray in grays
    ]
    assert all(line["track"] == 0 for line in detected)
    for mine, theirs in zip(followed, detected, strict=True):
        assert np.hypot(*np.subtract(centre(mine["box"]), centre(theirs["box"]))) < 10


def test_each_video_gets_its_own_tracks(
    capsys: pytest.CaptureFixture, model_path: Path, clip: Path
) -> None:
    code, lines = cli(capsys, "--model", model_path, "--every", 5, clip, clip)

    assert code == 0
    assert [line["frame"] for line in lines] == [0, 5, 10, 15, 20, 25] * 2
    assert [line["track"] for line in lines] == [0] * 12, "ids start again at 0"


def test_out_writes_a_jsonl_file(
    capsys: pytest.CaptureFixture, tmp_path: Path, model_path: Path, photos: dict[str, Path]
) -> None:
    out = tmp_path / "results" / "faces.jsonl"

    code, printed = cli(
        capsys, "--model", model_path, "--out", out, photos["astronaut"], photos["brick"]
    )

    assert code == 0 and printed == []
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["faces"] for line in lines] == [1, 0]
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind


def test_faces_from_many_files_are_classified_together(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model_path: Path
) -> None:
    folder = tmp_path / "faces"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for n in range(10):
        Image.fromarray(draw_image(CLASSES[n % 7], rng, 48)).save(folder / f"{n:02d}.png")
    predictor = load_predictor(model_path, batch_size=4)
    batches: list[int] = []
    predict_on_batch = predictor.model.predict_on_batch

    def counting(images: np.ndarray) -> np.ndarray:
        batches.append(len(images))
        return predict_on_batch(images)

    monkeypatch.setattr(predictor.model, "predict_on_batch", counting)
    out = tmp_path / "out.jsonl"

    report = Report(predictor.classes, out)
    run(predictor, iter_frames([folder], every=10), report, detect=False)
    report.close()

    assert batches == [4, 4, 2]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(line["input"]).name for line in lines] == [f"{n:02d}.png" for n in range(10)]
    one_by_one = load_predictor(model_path, batch_size=1)
    for line in lines:
        gray = read_image(Path(line["input"]))
        alone = one_by_one.probabilities([to_model_input(gray, PARAMS.preprocess)])[0]
        assert list(line["probabilities"].values()) == pytest.approx(alone.tolist(), abs=1e-5)


def test_tta_averages_other_views(
    capsys: pytest.CaptureFixture, model_path: Path, photos: dict[str, Path]
) -> None:
    _, [plain] = cli(capsys, "--model", model_path, photos["astronaut"])
    code, [tta] = cli(capsys, "--model", model_path, "--tta", photos["astronaut"])

    assert code == 0 and tta["box"] == plain["box"]
    assert sum(tta["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    difference = np.subtract(
        list(tta["probabilities"].values()), list(plain["probabilities"].values())
    )
    assert np.abs(difference).max() > 1e-5


def expected_heat_pictures(
    predictor: Predictor, crops: list[np.ndarray], labels: list[str]
) -> list[np.ndarray]:
    """What --explain should write for a batch of faces: Grad-CAM over each crop, 4× larger
    (a batch as the command makes it: another batch may differ in the last bits)."""
    indices = np.array([CLASSES.index(label) for label in labels])
    heat = heat_maps(predictor.model, model_batch(crops), indices)
    return [
        overlay(cv2.resize(crop, None, fx=4, fy=4, interpolation=cv2.INTER_NEAREST), one)
        for crop, one in zip(crops, heat, strict=True)
    ]


def test_explain_writes_a_heat_map_of_each_face_beside_its_annotated_copy(
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    model_path: Path,
    predictor: Predictor,
    photos: dict[str, Path],
) -> None:
    folder = tmp_path / "annotated"
    again = tmp_path / "again" / "astronaut.jpg"  # same name: its copy becomes astronaut-2.jpg
    again.parent.mkdir()
    again.write_bytes(photos["astronaut"].read_bytes())
    inputs = [photos["astronaut"], photos["brick"], tmp_path / "missing.jpg", again]

    code, lines = cli(capsys, "--model", model_path, "--annotate", folder, "--explain", *inputs)

    assert code == 1  # the missing file, with its own line; the others are done
    assert [line["faces"] for line in lines] == [1, 0, None, 1]
    assert sorted(p.name for p in folder.iterdir()) == [
        "astronaut-2.jpg",
        "astronaut-2_face0_gradcam.png",
        "astronaut.jpg",
        "astronaut_face0_gradcam.png",
        "brick.png",
    ]
    [face] = predictor.face_inputs(read_image(photos["astronaut"]))
    expected = expected_heat_pictures(predictor, [face.crop] * 2, [lines[0]["label"]] * 2)
    assert (expected[0][..., 0] != expected[0][..., 2]).any()  # coloured, not the gray crop
    for name, picture in zip(["astronaut", "astronaut-2"], expected, strict=True):
        written = np.asarray(Image.open(folder / f"{name}_face0_gradcam.png"))
        assert written.shape == (192, 192, 3)
        np.testing.assert_array_equal(written, picture)


def test_explain_runs_one_gradient_pass_per_batch_of_faces(
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    model_path: Path,
    predictor: Predictor,
    crops: Path,
) -> None:
    import pipeline.explain

    batches: list[int] = []

    def counting(model, faces, labels=None):
        batches.append(len(faces))
        return heat_maps(model, faces, labels)

    monkeypatch.setattr(pipeline.explain, "heat_maps", counting)
    folder = tmp_path / "annotated"

    code, lines = cli(
        capsys, "--model", model_path, "--no-detect", "--batch-size", 2, "--annotate", folder,
        "--explain", crops,
    )  # fmt: skip

    assert code == 0 and batches == [2, 1]
    written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*_gradcam.png"))
    assert written == [
        "faces/0_face0_gradcam.png",
        "faces/a/2_face0_gradcam.png",
        "faces/b/1_face0_gradcam.png",
    ]
    crops = [to_model_input(read_image(Path(line["input"])), PARAMS.preprocess) for line in lines]
    labels = [line["label"] for line in lines]
    expected = [
        *expected_heat_pictures(predictor, crops[:2], labels[:2]),
        *expected_heat_pictures(predictor, crops[2:], labels[2:]),
    ]
    for name, picture in zip(written, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(folder / name)), picture)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("model.onnx", "ONNX Runtime"), ("model.tflite", "LiteRT")],
    ids=["onnx", "litert"],
)
def test_explain_refuses_an_exported_model_before_any_work(
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    photos: dict[str, Path],
    name: str,
    kind: str,
) -> None:
    """Refused by its name, before it is loaded: an export has no gradients to follow."""
    folder = tmp_path / "annotated"
    with caplog.at_level(logging.ERROR):
        code = main(
            ["--model", str(tmp_path / name), "--annotate", str(folder), "--explain",
             str(photos["astronaut"])]
        )  # fmt: skip

    assert code == 2
    assert capsys.readouterr().out == "" and not folder.exists()
    [message] = caplog.messages
    assert (
        message.startswith("--explain: ")
        and f"is an export for {kind}, which has no gradients" in message
    )
    assert "--model models/model.h5" in message


def test_explain_refuses_a_model_without_a_convolution(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, photos: dict[str, Path]
) -> None:
    path = tmp_path / "dense.h5"
    keras.Sequential(
        [keras.Input((48, 48, 1)), keras.layers.Flatten(), keras.layers.Dense(7, "softmax")]
    ).save(path)
    write_model_info(path, info_for(PARAMS.preprocess, "dense"))
    argv = ["--model", str(path), "--annotate", str(tmp_path / "out"), str(photos["astronaut"])]
    assert main(argv) == 0  # a usable model, that Grad-CAM cannot explain

    with caplog.at_level(logging.ERROR):
        code = main([*argv, "--explain"])

    assert code == 2
    assert "--explain: model" in caplog.text and "no convolutional layer" in caplog.text


def test_an_unusable_model_is_a_usage_error(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, photos: dict[str, Path]
) -> None:
    unstamped = tmp_path / "plain.h5"
    keras.Sequential([keras.Input((48, 48, 1))]).save(unstamped)
    native = tmp_path / "plain.keras"
    keras.Sequential([keras.Input((48, 48, 1))]).save(native)

    for model, message in [
        (tmp_path / "nowhere.h5", "no model"),
        (unstamped, "fer_pipeline"),
        (native, "plain.keras: a .keras file is not read here"),
    ]:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            code = main(["--model", str(model), str(photos["astronaut"])])
        assert code == 2, model
        assert message in caplog.text


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--every", "0", "x.jpg"],
        ["--redetect-every", "0", "x.mp4"],
        ["--camera", "0", "x.jpg"],
        ["--out", ".", "x.jpg"],
        ["--explain", "x.jpg"],
        ["--explain", "--annotate", "out", "--camera", "0"],
    ],
    ids=str,
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


@pytest.mark.skipif(gui_problem() is None, reason="this OpenCV can open windows")
def test_camera_without_a_gui_says_why(caplog: pytest.LogCaptureFixture, model_path: Path) -> None:
    with caplog.at_level(logging.ERROR):
        code = main(["--model", str(model_path), "--camera", "0"])
    assert code == 2
    assert re.search(r"without GUI support|no display", caplog.text), caplog.text


@pytest.fixture
def mlflow_store(tmp_path: Path):
    """A fresh MLflow store in a temporary folder, the process's tracking URI meanwhile."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("predict", artifact_location=str(tmp_path / "artifacts"))
    yield experiment
    mlflow.set_tracking_uri(None)


def test_mlflow_runs_uri_works_as_model(
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
    mlflow_store: str,
    model_path: Path,
    photos: dict[str, Path],
) -> None:
    from pipeline.serving import log_pyfunc_model

    with mlflow.start_run(experiment_id=mlflow_store) as active:
        log_pyfunc_model(model_path)
    _, [local] = cli(capsys, "--model", model_path, photos["astronaut"])

    code, [logged] = cli(
        capsys, "--model", f"runs:/{active.info.run_id}/emotion_model", photos["astronaut"]
    )

    assert code == 0
    assert logged == local
    with caplog.at_level(logging.ERROR):
        code = main(["--model", "runs:/0123456789abcdef/emotion_model", str(photos["astronaut"])])
    assert code == 2 and "cannot download" in caplog.text


def test_explain_works_with_an_mlflow_model(
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    mlflow_store: str,
    model_path: Path,
    photos: dict[str, Path],
) -> None:
    from pipeline.serving import log_pyfunc_model

    with mlflow.start_run(experiment_id=mlflow_store) as active:
        log_pyfunc_model(model_path)
    heat = {}
    for where, model in [
        ("local", model_path),
        ("logged", f"runs:/{active.info.run_id}/emotion_model"),
    ]:
        folder = tmp_path / where
        code, _ = cli(
            capsys, "--model", model, "--annotate", folder, "--explain", photos["astronaut"]
        )
        assert code == 0
        heat[where] = np.asarray(Image.open(folder / "astronaut_face0_gradcam.png"))

    np.testing.assert_array_equal(heat["logged"], heat["local"])


def test_explain_refuses_an_onnx_model_logged_in_mlflow(
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    mlflow_store: str,
    model_path: Path,
    photos: dict[str, Path],
) -> None:
    """A URI does not say it holds an export, so the refusal comes once it is loaded."""
    from pipeline.export import float32_copy, onnx_bytes
    from pipeline.modelmeta import encode_info

    predictor = load_predictor(model_path)
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(onnx_bytes(float32_copy(predictor.model), encode_info(predictor.info)))
    with mlflow.start_run(experiment_id=mlflow_store) as active:
        mlflow.log_artifact(str(onnx_path), "emotion_model_onnx")
    folder = tmp_path / "annotated"
    with caplog.at_level(logging.ERROR):
        code = main(
            ["--model", f"runs:/{active.info.run_id}/emotion_model_onnx", "--annotate",
             str(folder), "--explain", str(photos["astronaut"])]
        )  # fmt: skip

    assert code == 2 and not folder.exists()
    [message] = caplog.messages
    assert message.startswith("--explain: heat maps need the model's gradients")


def test_console_script_runs(model_path: Path, photos: dict[str, Path]) -> None:
    script = Path(sys.executable).with_name("fer-predict")
    assert script.is_file(), "install the project (pip install -e .) for its fer-predict"

    done = subprocess.run(
        [script, "--model", model_path, photos["astronaut"], photos["tilted"], "missing.png"],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
    )

    assert done.returncode == 1, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["faces"] for line in lines] == [1, 1, None]
    assert "missing.png: no such file" in done.stderr
    assert "Traceback" not in done.stderr
