"""Stage `preprocess` on small raw trees: outputs, bad files, atomicity, faces, workers."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from skimage import data as skdata

from pipeline import CLASSES, preprocess
from pipeline.detectors import detector_for, resolve
from pipeline.faces import align_face
from pipeline.imageops import read_image, to_model_input
from pipeline.params import PreprocessParams, load_params, read_raw_params
from pipeline.paths import Paths
from pipeline.preprocess import PreprocessError, list_jobs, run
from pipeline.sample import generate_sample

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "validation")


def make_params(**changes) -> PreprocessParams:
    base = load_params(ROOT / "params.yaml").preprocess
    return base.model_copy(update={"workers": 1, **changes})


@pytest.fixture(scope="module")
def sample_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("sample") / "raw"
    generate_sample(raw, 70, 70, seed=11)
    return raw


@pytest.fixture
def paths(tmp_path: Path, sample_raw: Path) -> Paths:
    paths = Paths(tmp_path / "project")
    shutil.copytree(sample_raw, paths.raw)
    return paths


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def raw_images(raw: Path) -> list[Path]:
    return sorted(p for p in raw.rglob("*") if p.is_file())


def leftovers(paths: Paths) -> list[str]:
    """What lies in data/ besides raw and processed: scratch folders of a stage."""
    return sorted(p.name for p in paths.raw.parent.iterdir() if p.name not in ("raw", "processed"))


def png_of(mode_image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    mode_image.save(buffer, "PNG")
    return buffer.getvalue()


def odd_but_good_images() -> dict[str, bytes]:
    """Images in colour modes the decoder must handle; written into train/happy."""
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (60, 50, 4), dtype=np.uint8)
    deep = (rng.integers(0, 65536, (40, 40))).astype(np.uint16)
    cmyk = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)).convert("CMYK").save(
        cmyk, "JPEG"
    )
    return {
        "rgba.png": png_of(Image.fromarray(rgba, "RGBA")),
        "deep.png": png_of(Image.fromarray(deep)),
        "cmyk.jpg": cmyk.getvalue(),
    }


def bad_images(sample_jpeg: bytes) -> dict[str, tuple[bytes, str]]:
    """Unreadable files, written into train/angry, and the reason each must be given."""
    return {
        "broken.jpg": (sample_jpeg[: len(sample_jpeg) // 2], "damaged or truncated image"),
        "empty.jpg": (b"", "empty file (0 bytes)"),
        "notes.jpg": (b"meeting notes, not a face\n", "not an image file"),
    }


def add_odd_and_bad(paths: Paths) -> dict[str, str]:
    """Put good odd images and bad ones into the raw tree; return {bad file: reason}."""
    for name, content in odd_but_good_images().items():
        (paths.raw / "train" / "happy" / name).write_bytes(content)
    sample_jpeg = next((paths.raw / "train" / "angry").glob("*.jpg")).read_bytes()
    reasons = {}
    for name, (content, reason) in bad_images(sample_jpeg).items():
        path = paths.raw / "train" / "angry" / name
        path.write_bytes(content)
        reasons[path.as_posix()] = reason
    (paths.raw / "train" / "angry" / "README.txt").write_text("not an image, not counted\n")
    return reasons


def check_outputs_match_sources(paths: Paths, params: PreprocessParams, skip=()) -> int:
    """Every readable raw image has a PNG output equal to its model input; return their count."""
    outputs = {p.relative_to(paths.processed) for p in paths.processed.rglob("*.png")}
    expected = set()
    for source in raw_images(paths.raw):
        if source.suffix == ".txt" or source.as_posix() in skip:
            continue
        relative = source.relative_to(paths.raw).with_suffix(".png")
        expected.add(relative)
        written = cv2.imread(str(paths.processed / relative), cv2.IMREAD_UNCHANGED)
        assert written is not None, relative
        np.testing.assert_array_equal(written, to_model_input(read_image(source), params))
    assert outputs == expected
    return len(expected)


def test_run_writes_lossless_model_inputs_reports_and_figure(paths: Paths) -> None:
    params = make_params(equalization="clahe", denoise="median")

    report = run(params, paths)

    written = check_outputs_match_sources(paths, params)
    assert written == 140
    for split in SPLITS:
        on_disk = {c: len(list((paths.processed / split / c).glob("*.png"))) for c in CLASSES}
        assert report["images"][split] == {**on_disk, "total": sum(on_disk.values())}
        assert report["images"][split]["total"] == 70
    assert (report["bad_files"], report["bad_fraction"], report["bad"]) == (0, 0.0, [])
    assert "faces_found" not in report
    assert json.loads(paths.preprocess_report.read_text()) == report

    figure = Image.open(paths.samples_figure)
    assert figure.format == "PNG"
    assert min(figure.size) > 200
    assert np.asarray(figure.convert("L")).std() > 10  # faces drawn, not a blank canvas
    assert leftovers(paths) == []


def test_bad_files_are_skipped_listed_and_counted_odd_modes_are_fine(paths: Paths) -> None:
    reasons = add_odd_and_bad(paths)
    params = make_params(max_bad_fraction=0.05)

    report = run(params, paths)

    assert report["bad_files"] == 3
    assert report["bad_fraction"] == round(3 / 146, 6)
    assert sorted(e["file"] for e in report["bad"]) == sorted(reasons)
    for entry in report["bad"]:
        assert reasons[entry["file"]] in entry["reason"]
        assert not entry["reason"].startswith(entry["file"])  # the file is said once
    assert report["images"]["train"]["happy"] == len(list((paths.raw / "train/happy").iterdir()))
    assert report["images"]["train"]["total"] == 73
    check_outputs_match_sources(paths, params, skip=reasons)
    assert json.loads(paths.preprocess_report.read_text())["bad"] == report["bad"]


def test_too_many_bad_files_fail_and_leave_no_output(paths: Paths) -> None:
    reasons = add_odd_and_bad(paths)

    with pytest.raises(PreprocessError) as caught:
        run(make_params(max_bad_fraction=0.01), paths)

    message = str(caught.value)
    assert "3 of 146 images could not be read" in message
    assert "preprocess.max_bad_fraction=0.01" in message
    assert not paths.processed.exists()
    assert leftovers(paths) == []
    # the report still says which files and why, for the user to fix them
    listed = json.loads(paths.preprocess_report.read_text())["bad"]
    assert sorted(e["file"] for e in listed) == sorted(reasons)


def test_class_left_without_readable_images_fails(paths: Paths) -> None:
    folder = paths.raw / "validation" / "disgust"
    for image in folder.iterdir():
        image.write_bytes(b"")
    with pytest.raises(PreprocessError, match=r"no readable images left in validation/disgust"):
        run(make_params(max_bad_fraction=0.5), paths)
    assert not paths.processed.exists()
    assert leftovers(paths) == []


def interrupt_after(monkeypatch: pytest.MonkeyPatch, n: int) -> list:
    original, calls = preprocess.preprocess_image, []

    def interrupted(source, params):
        calls.append(source)
        if len(calls) == n:
            raise KeyboardInterrupt
        return original(source, params)

    monkeypatch.setattr(preprocess, "preprocess_image", interrupted)
    return calls


def test_interrupted_run_leaves_no_output(paths: Paths, monkeypatch) -> None:
    calls = interrupt_after(monkeypatch, 50)
    with pytest.raises(KeyboardInterrupt):
        run(make_params(), paths)
    assert len(calls) == 50
    assert not paths.processed.exists()
    assert not paths.preprocess_report.exists()
    assert leftovers(paths) == []


def test_interrupted_run_keeps_the_earlier_output(paths: Paths, monkeypatch) -> None:
    run(make_params(), paths)
    before = tree_bytes(paths.processed)
    report_before = paths.preprocess_report.read_bytes()
    interrupt_after(monkeypatch, 50)

    with pytest.raises(KeyboardInterrupt):
        run(make_params(equalization="global"), paths)

    assert tree_bytes(paths.processed) == before
    assert paths.preprocess_report.read_bytes() == report_before
    assert leftovers(paths) == []


def test_a_new_run_replaces_the_earlier_output(paths: Paths) -> None:
    run(make_params(), paths)
    (paths.processed / "train" / "angry" / "stale.png").write_bytes(b"from an older run")
    params = make_params(equalization="global")
    run(params, paths)
    check_outputs_match_sources(paths, params)  # no stale file left, all re-made
    assert leftovers(paths) == []


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skdata.astronaut()


@pytest.mark.parametrize("choice", ["auto", "haar"])
def test_face_detection_crops_big_photos_and_keeps_faceless_ones_whole(
    tmp_path: Path, astronaut: np.ndarray, choice: str
) -> None:
    paths = Paths(tmp_path)
    generate_sample(paths.raw, 14, 14, seed=3)
    photo = paths.raw / "train" / "happy" / "astronaut.png"
    Image.fromarray(astronaut).save(photo)
    texture = paths.raw / "train" / "neutral" / "brick.png"
    brick = cv2.resize(skdata.brick(), (160, 160), interpolation=cv2.INTER_AREA)
    Image.fromarray(brick).save(texture)  # a wall: no face
    params = make_params(face_detection=True, face_margin=0.2, face_detector=choice)

    report = run(params, paths)

    gray = read_image(photo)
    whole = to_model_input(gray, params)
    face = cv2.imread(str(paths.processed / "train" / "happy" / "astronaut.png"), 0)
    assert not np.array_equal(face, whole)
    detector = detector_for(params.face_detector, params.face_tilt_search)
    [found] = detector.detect(gray)
    np.testing.assert_array_equal(face, to_model_input(align_face(gray, found, 0.2), params))
    # Eileen Collins' face spans about x 178-270, y 69-161; with the margin, about this square
    # (the Haar cascades' crop; the other detectors' squares are a little larger or smaller):
    expected = to_model_input(gray[51:180, 160:289], params)
    assert ncc(face, expected) > (0.9 if detector.name == "haar" else 0.5)
    assert ncc(face, whole) < 0.5
    assert report["face_detector"] == resolve(params.face_detector)

    kept = cv2.imread(str(paths.processed / "train" / "neutral" / "brick.png"), 0)
    np.testing.assert_array_equal(kept, to_model_input(read_image(texture), params))

    with_face = sum(bool(detector.detect(read_image(p))) for p in raw_images(paths.raw))
    assert report["faces_found"] == with_face
    assert report["no_face_kept_whole"] == 30 - with_face
    assert report["faces_found"] >= 1
    assert report["no_face_kept_whole"] >= 1


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(float) - a.mean(), b.astype(float) - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_two_workers_give_the_same_bytes_as_one(tmp_path: Path, sample_raw: Path) -> None:
    results = {}
    for workers in (1, 2):
        paths = Paths(tmp_path / f"workers{workers}")
        shutil.copytree(sample_raw, paths.raw)
        params = make_params(workers=workers, equalization="clahe", denoise="gaussian")
        report = run(params, paths)
        results[workers] = (tree_bytes(paths.processed), report)
    one, two = results[1], results[2]
    assert len(one[0]) == 140
    assert one[0] == two[0]
    for report in (one[1], two[1]):
        del report["seconds"], report["images_per_second"]
    assert one[1] == two[1]


def test_same_stem_in_two_formats_gets_two_outputs(paths: Paths) -> None:
    folder = paths.raw / "train" / "sad"
    source = next(folder.glob("*.jpg"))
    shutil.copy(source, source.with_suffix(".png"))
    jobs = [j for j in list_jobs(paths.raw) if j.source.parent == folder]
    jobs = [j for j in jobs if j.source.stem == source.stem]
    assert sorted(j.relative_output.name for j in jobs) == sorted(
        [f"{source.stem}_jpg.png", f"{source.stem}_png.png"]
    )


def test_names_made_for_duplicates_never_collide_with_existing_names(paths: Paths) -> None:
    folder = paths.raw / "train" / "sad"
    source = next(folder.glob("*.jpg"))
    for name in ("a.jpg", "a.png", "a_jpg.jpg", "A.bmp"):
        shutil.copy(source, folder / name)
    jobs = [j for j in list_jobs(paths.raw) if j.source.parent == folder]
    names = [j.relative_output.name.lower() for j in jobs]
    assert len(set(names)) == len(names) == len(list(folder.iterdir()))
    by_source = {j.source.name: j.relative_output.name for j in jobs}
    assert by_source["a.jpg"] == "a_jpg.png" and by_source["a.png"] == "a_png.png"
    assert by_source["a_jpg.jpg"] == "a_jpg_2.png"
    assert by_source[source.name] == f"{source.stem}.png"  # unique stems keep their name
    run(make_params(), paths)
    written = list((paths.processed / "train" / "sad").iterdir())
    assert len(written) == len(names)


def test_missing_raw_or_class_folder_says_what_to_do(tmp_path: Path, paths: Paths) -> None:
    with pytest.raises(PreprocessError, match=r"not found; run the download stage first"):
        run(make_params(), Paths(tmp_path / "empty"))
    shutil.rmtree(paths.raw / "validation" / "surprise")
    with pytest.raises(PreprocessError, match=r"validation/surprise: missing; .* one folder per"):
        run(make_params(), paths)
    assert not paths.processed.exists()


def test_main_exit_codes(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    raw = read_raw_params(ROOT / "params.yaml")
    raw["preprocess"]["equalization"] = "fancy"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw), encoding="utf-8")

    assert preprocess.main(["--params", str(bad)]) == 2
    assert "invalid params: preprocess.equalization: 'fancy'" in caplog.text
    caplog.clear()
    assert preprocess.main(["--params", str(ROOT / "params.yaml")]) == 1
    assert "run the download stage first" in caplog.text
    assert not (tmp_path / "data").exists()
