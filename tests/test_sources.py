"""The archive, directory and Kaggle sources of the download stage, on tiny generated datasets."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from pipeline import CLASSES
from pipeline.sources import (
    SourceError,
    copy_directory,
    count_images,
    extract_archive,
    fetch_kaggle,
)

ROOT = Path(__file__).resolve().parents[1]
DATASET = "jonathanoheix/face-expression-recognition-dataset"

_PIXELS = np.arange(64, dtype=np.uint8).reshape(8, 8)
IMAGES = {
    ".png": cv2.imencode(".png", _PIXELS)[1].tobytes(),
    ".jpg": cv2.imencode(".jpg", _PIXELS)[1].tobytes(),
    ".JPEG": cv2.imencode(".jpg", 255 - _PIXELS)[1].tobytes(),
}
EXPECTED = {
    "train": {cls: i + 1 for i, cls in enumerate(CLASSES)},
    "validation": {cls: 1 + i % 2 for i, cls in enumerate(CLASSES)},
}
# Never part of the dataset: hidden files, macOS and Windows litter, non-images.
NOISE = {
    "__MACOSX/images/train/angry/._angry_0.png": b"apple double",
    "README.md": b"# faces",
    ".DS_Store": b"\0",
}


def dataset(
    prefix: str = "images/",
    train: str = "train",
    validation: str = "validation",
    name: Callable[[str], str] = str,
) -> dict[str, bytes]:
    """Files of a tiny dataset, `EXPECTED` images per split and class, plus noise."""
    files = dict(NOISE)
    for split, folder in (("train", train), ("validation", validation)):
        for cls, n in EXPECTED[split].items():
            base = f"{prefix}{folder}/{name(cls)}/"
            for k in range(n):
                ext = list(IMAGES)[k % len(IMAGES)]
                files[f"{base}{cls}_{k}{ext}"] = IMAGES[ext]
            files[f"{base}.hidden.png"] = IMAGES[".png"]
            files[f"{base}Thumbs.db"] = b"thumbs"
            files[f"{base}notes.txt"] = b"not an image"
    return files


def zip_bytes(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def listing(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def expected_listing(files: dict[str, bytes]) -> set[str]:
    """The dest files a correct source makes of `dataset()` files."""
    names = set()
    for split in EXPECTED:
        for cls, n in EXPECTED[split].items():
            names |= {f"{split}/{cls}/{cls}_{k}{list(IMAGES)[k % len(IMAGES)]}" for k in range(n)}
    return names


class FakeKaggle:
    """The Kaggle client boundary: writes `<dataset-name>.zip` into `path` like the real one."""

    def __init__(self, files: dict[str, bytes] | None = None, error: BaseException | None = None):
        self.files, self.error, self.calls = files, error, []

    def authenticate(self) -> None:
        self.calls.append("authenticate")
        if isinstance(self.error, SystemExit):  # what KaggleApi.authenticate does
            raise self.error

    def dataset_download_files(self, dataset, path=None, unzip=False, quiet=True) -> None:
        self.calls.append(("download", dataset, Path(path), unzip))
        if self.error is not None:
            raise self.error
        if self.files is not None:
            (Path(path) / f"{dataset.split('/')[1]}.zip").write_bytes(zip_bytes(self.files))


@pytest.fixture
def kaggle_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No Kaggle credentials anywhere: a clean environment and an empty HOME."""
    for key in list(os.environ):
        if key.startswith("KAGGLE_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return home


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """The stage output, alone in its folder, so leftovers of a failed run show."""
    (tmp_path / "data").mkdir()
    return tmp_path / "data" / "raw"


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir())


def run_source(source: str, files: dict[str, bytes], dest: Path, tmp_path: Path):
    if source == "archive":
        archive = tmp_path / "dataset.zip"
        archive.write_bytes(zip_bytes(files))
        return extract_archive(archive, dest)
    if source == "directory":
        return copy_directory(write_tree(tmp_path / "dataset", files), dest)
    return fetch_kaggle(DATASET, dest, client_factory=lambda: FakeKaggle(files))


LAYOUTS = {
    "images/train+validation": dataset(),
    "train+test": dataset(prefix="", validation="test"),
    "top/images/train+validation": dataset(prefix="face-expression-recognition-dataset/images/"),
    "top/train+test": dataset(prefix="fer2013/", validation="test"),
    "mixed case": dataset(
        train="Train",
        validation="VALIDATION",
        name=lambda c: c.upper() if len(c) > 4 else c.title(),
    ),
    "nested duplicate images/images": {
        **dataset(prefix="images/images/"),
        **dataset(),
        "images/images/train/angry/only_in_duplicate.png": IMAGES[".png"],
    },
}


@pytest.mark.parametrize("source", ["archive", "directory", "kaggle"])
def test_a_source_with_train_validation_and_test_keeps_its_test_split(
    source: str, dest: Path, tmp_path: Path, kaggle_env: Path, monkeypatch
) -> None:
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    files = {
        **dataset(prefix="", validation="test"),
        **dataset(prefix=""),
        "test/angry/only_in_test.png": IMAGES[".png"],
    }

    counts = run_source(source, files, dest, tmp_path)

    assert sorted(p.name for p in dest.iterdir()) == ["test", "train", "validation"]
    assert {k: counts[k] for k in EXPECTED} == EXPECTED
    assert counts["test"] == {
        **EXPECTED["validation"],
        "angry": EXPECTED["validation"]["angry"] + 1,
    }
    assert count_images(dest) == counts
    assert "test/angry/only_in_test.png" in listing(dest)
    assert leftovers(dest) == ["raw"]


@pytest.mark.parametrize("source", ["archive", "directory", "kaggle"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_source_makes_train_and_validation_class_folders(
    source: str, layout: str, dest: Path, tmp_path: Path, kaggle_env: Path, monkeypatch
) -> None:
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    files = LAYOUTS[layout]

    counts = run_source(source, files, dest, tmp_path)

    assert counts == EXPECTED
    assert count_images(dest) == EXPECTED
    assert set(listing(dest)) == expected_listing(files)
    assert sorted(p.name for p in dest.iterdir()) == ["train", "validation"]
    assert listing(dest)["validation/happy/happy_1.jpg"] == IMAGES[".jpg"]
    assert listing(dest)["train/sad/sad_2.JPEG"] == IMAGES[".JPEG"]
    assert leftovers(dest) == ["raw"]


@pytest.mark.parametrize("source", ["archive", "directory", "kaggle"])
def test_source_replaces_an_existing_dest(
    source: str, dest: Path, tmp_path: Path, kaggle_env: Path, monkeypatch
) -> None:
    monkeypatch.setenv("KAGGLE_API_TOKEN", "token")
    write_tree(dest, {"train/angry/stale.png": b"old", "stale.txt": b"old"})

    assert run_source(source, dataset(), dest, tmp_path) == EXPECTED
    assert set(listing(dest)) == expected_listing(dataset())
    assert leftovers(dest) == ["raw"]


def test_copy_directory_leaves_the_source_alone_and_copies_files(
    dest: Path, tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "dataset", dataset(prefix="", validation="test"))
    before = listing(src)

    copy_directory(src, dest)

    assert listing(src) == before
    copied = dest / "train" / "angry" / "angry_0.png"
    assert copied.read_bytes() == before["train/angry/angry_0.png"]
    assert copied.stat().st_nlink == 1
    assert not copied.samefile(src / "train" / "angry" / "angry_0.png")


@pytest.mark.parametrize("inside", [".", "raw", "train/raw"])
def test_copy_directory_refuses_a_dest_overlapping_the_source(tmp_path: Path, inside: str) -> None:
    src = write_tree(tmp_path / "dataset", dataset(prefix=""))
    before = listing(src)

    with pytest.raises(SourceError, match="overlaps the stage output"):
        copy_directory(src, src / inside)
    assert listing(src) == before


def test_missing_archive_says_how_to_set_data_archive(dest: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"data\.archive: .*nowhere\.zip.*set data\.archive"):
        extract_archive(tmp_path / "nowhere.zip", dest)
    assert leftovers(dest) == []


def test_missing_directory_says_how_to_set_data_directory(dest: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"data\.directory: .*nowhere.*set data\.directory"):
        copy_directory(tmp_path / "nowhere", dest)
    assert leftovers(dest) == []


def _without(files: dict[str, bytes], part: str) -> dict[str, bytes]:
    return {name: data for name, data in files.items() if part not in name}


def _flip_payload(files: dict[str, bytes]) -> bytes:
    payload = b"PAYLOAD-" * 64
    data = zip_bytes({**files, "images/train/angry/bad_crc.png": payload}, zipfile.ZIP_STORED)
    return data.replace(payload, payload.replace(b"-", b"+", 1))


def _encrypted(files: dict[str, bytes]) -> bytes:
    data = bytearray(zip_bytes(files))
    central = data.index(b"PK\x01\x02")
    data[central + 8] |= 0x1  # general purpose flag: encrypted
    return bytes(data)


def _with_entry(files: dict[str, bytes], info: zipfile.ZipInfo, content: bytes) -> bytes:
    buffer = io.BytesIO(zip_bytes(files))
    with zipfile.ZipFile(buffer, "a") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name"
        zf.writestr(info, content)
    return buffer.getvalue()


def _symlink_entry() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("images/train/angry/link.png")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


# Broken layouts: the same check for every source.
BAD_LAYOUTS = {
    "missing class": (
        _without(dataset(), "validation/disgust/"),
        r"no images for class\(es\) disgust in the validation split "
        r"\(found class folders: .*images/validation/angry/.*\); "
        r"expected exactly the classes angry, disgust, fear, happy, neutral, sad, surprise",
    ),
    "unknown class": (
        {**dataset(), "images/train/contempt/x.png": IMAGES[".png"]},
        r"unknown class folder images/train/contempt/; expected exactly the classes angry, ",
    ),
    "no validation split": (
        _without(dataset(), "validation/"),
        r"no train/ and validation/ \(or test/\) class folders found "
        r"\(split folders found: \['images/train'\]",
    ),
    "image outside a class folder": (
        {**dataset(), "images/train/loose.png": IMAGES[".png"]},
        r"image images/train/loose.png is not directly inside a class folder of images/train/",
    ),
    "class folder twice": (
        {**dataset(), "images/train/Angry/x.png": IMAGES[".png"]},
        r"both images/train/(angry|Angry)/ and images/train/(angry|Angry)/ hold class 'angry'",
    ),
    "two datasets side by side": (
        {**dataset(prefix="a/"), **dataset(prefix="b/")},
        r"several datasets side by side: a, b",
    ),
    "no images at all": (NOISE, r"no train/ and validation/ .*expected images/train/<class>/"),
}
# Broken archives: only a zip can be these.
BAD_ARCHIVES = {
    "truncated": (
        zip_bytes(dataset())[:2000],
        r"not a valid zip archive, or damaged or truncated \(BadZipFile",
    ),
    "not a zip": (b"<html>Sign in to download</html>", r"not a valid zip archive"),
    "bad CRC": (_flip_payload(dataset()), r"damaged or truncated \(BadZipFile: Bad CRC-32"),
    "zip slip": (
        zip_bytes({**dataset(), "../evil.png": IMAGES[".png"]}),
        r"refusing entry '../evil.png': its path leaves the extraction folder",
    ),
    "zip slip inside": (
        zip_bytes({**dataset(), "images/train/../../../evil.png": IMAGES[".png"]}),
        r"refusing entry 'images/train/../../../evil.png'",
    ),
    "absolute path": (
        zip_bytes({**dataset(), "/tmp/evil.png": IMAGES[".png"]}),
        r"refusing entry '/tmp/evil.png': its path leaves the extraction folder",
    ),
    "symlink": (
        _with_entry(dataset(), _symlink_entry(), b"/etc/passwd"),
        r"refusing entry 'images/train/angry/link.png': it is a symbolic link",
    ),
    "encrypted": (_encrypted(dataset()), r"is encrypted; use an unencrypted zip"),
    "duplicate entry": (
        _with_entry(dataset(), zipfile.ZipInfo("images/train/angry/angry_0.png"), b"again"),
        r"entry 'images/train/angry/angry_0.png' appears twice",
    ),
    **{name: (zip_bytes(files), match) for name, (files, match) in BAD_LAYOUTS.items()},
}


@pytest.mark.parametrize("case", BAD_ARCHIVES)
def test_bad_archive_fails_and_leaves_nothing(case: str, dest: Path, tmp_path: Path) -> None:
    data, match = BAD_ARCHIVES[case]
    archive = tmp_path / "dataset.zip"
    archive.write_bytes(data)

    with pytest.raises(SourceError, match=match) as caught:
        extract_archive(archive, dest)

    assert str(archive) in str(caught.value)
    assert leftovers(dest) == []
    assert not list(tmp_path.rglob("evil.png"))


@pytest.mark.parametrize("case", BAD_LAYOUTS)
def test_bad_directory_fails_and_leaves_nothing(case: str, dest: Path, tmp_path: Path) -> None:
    files, match = BAD_LAYOUTS[case]
    src = write_tree(tmp_path / "dataset", files)

    with pytest.raises(SourceError, match=match):
        copy_directory(src, dest)
    assert leftovers(dest) == []


def test_bad_kaggle_download_fails_and_leaves_nothing(
    dest: Path, kaggle_env: Path, monkeypatch
) -> None:
    monkeypatch.setenv("KAGGLE_API_TOKEN", "token")
    files, _ = BAD_LAYOUTS["missing class"]
    with pytest.raises(SourceError, match=rf"Kaggle dataset {DATASET} .*no images for class"):
        fetch_kaggle(DATASET, dest, client_factory=lambda: FakeKaggle(files))
    assert leftovers(dest) == []


def _interrupt_on_third(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
    original, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        reading = name != "open" or kwargs.get("mode", args[2] if len(args) > 2 else "r") == "r"
        if reading:
            calls.append(args)
            if len(calls) == 3:
                raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)


@pytest.mark.parametrize("had_dest", [False, True], ids=["no dest", "old dest"])
@pytest.mark.parametrize("source", ["archive", "directory", "kaggle"])
def test_interrupted_source_leaves_dest_as_it_was(
    source: str, had_dest: bool, dest: Path, tmp_path: Path, kaggle_env: Path, monkeypatch
) -> None:
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    if had_dest:
        write_tree(dest, {"train/angry/old.png": b"old", "validation/sad/old.png": b"old"})
    before = listing(dest) if had_dest else None
    if source == "directory":
        _interrupt_on_third(monkeypatch, shutil, "copyfile")
    else:
        _interrupt_on_third(monkeypatch, zipfile.ZipFile, "open")

    with pytest.raises(KeyboardInterrupt):
        run_source(source, dataset(), dest, tmp_path)

    assert leftovers(dest) == (["raw"] if had_dest else [])
    if had_dest:
        assert listing(dest) == before


def test_interrupt_while_swapping_in_the_new_dest_keeps_the_old_one(
    dest: Path, tmp_path: Path, monkeypatch
) -> None:
    write_tree(dest, {"train/angry/old.png": b"old"})
    original = Path.replace

    def interrupted(self: Path, target):
        if Path(target) == dest and self.name != "old":  # the finished new dest moving in
            raise KeyboardInterrupt
        return original(self, target)

    monkeypatch.setattr(Path, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_source("archive", dataset(), dest, tmp_path)

    assert listing(dest) == {"train/angry/old.png": b"old"}
    assert leftovers(dest) == ["raw"]


@pytest.mark.parametrize(
    "credentials",
    [
        {"env": {"KAGGLE_USERNAME": "someone", "KAGGLE_KEY": "secret"}},
        {"env": {"KAGGLE_API_TOKEN": "KGAT_token"}},
        {"file": "config/kaggle.json", "env": {"KAGGLE_CONFIG_DIR": "{tmp}/config"}},
        {"file": "home/.kaggle/kaggle.json"},
        {"file": "xdg/kaggle/kaggle.json"},
        {"file": "home/.kaggle/access_token", "text": "KGAT_token"},
        {
            "file": "home/.kaggle/kaggle.json",
            "text": '{"username": "someone"}',
            "env": {"KAGGLE_KEY": "secret"},
        },
    ],
    ids=["username+key", "api token", "config dir", "home", "xdg", "access_token", "file+env"],
)
def test_fetch_kaggle_finds_credentials_where_the_client_does(
    credentials: dict, dest: Path, tmp_path: Path, kaggle_env: Path, monkeypatch
) -> None:
    for key, value in credentials.get("env", {}).items():
        monkeypatch.setenv(key, value.format(tmp=tmp_path))
    if "file" in credentials:
        text = credentials.get("text", '{"username": "someone", "key": "secret"}')
        write_tree(tmp_path, {credentials["file"]: text.encode()})
    client = FakeKaggle(dataset(prefix="", validation="test"))

    assert fetch_kaggle(DATASET, dest, client_factory=lambda: client) == EXPECTED

    assert client.calls[0] == "authenticate"
    _, slug, path, unzip = client.calls[1]
    assert (slug, unzip) == (DATASET, False)
    assert path.parent.parent == dest.parent  # a scratch folder next to dest, now gone
    assert not path.exists()
    assert leftovers(dest) == ["raw"]


@pytest.mark.parametrize(
    "credentials",
    [
        {},
        {"env": {"KAGGLE_USERNAME": "someone"}},
        {"file": "config/kaggle.json", "text": '{"username": "someone"}'},
        {"file": "config/kaggle.json", "text": "not json"},
        {"file": "home/.kaggle/access_token", "text": "\n"},
        {"file": "home/.kaggle/kaggle.json", "env": {"KAGGLE_CONFIG_DIR": "{tmp}/config"}},
    ],
    ids=["none", "username only", "no key", "broken json", "empty token", "outside config dir"],
)
def test_fetch_kaggle_without_credentials_says_what_to_set_before_any_call(
    credentials: dict, dest: Path, tmp_path: Path, kaggle_env: Path, monkeypatch
) -> None:
    (tmp_path / "config").mkdir()
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "config"))
    for key, value in credentials.get("env", {}).items():
        monkeypatch.setenv(key, value.format(tmp=tmp_path))
    if "file" in credentials:
        text = credentials.get("text", '{"username": "someone", "key": "secret"}')
        write_tree(tmp_path, {credentials["file"]: text.encode()})
    made = []

    with pytest.raises(SourceError) as caught:
        fetch_kaggle(DATASET, dest, client_factory=lambda: made.append(FakeKaggle()))

    message = str(caught.value)
    for needed in [
        "KAGGLE_USERNAME",
        "KAGGLE_KEY",
        "KAGGLE_API_TOKEN",
        f"{tmp_path / 'config' / 'kaggle.json'}",
        "chmod 600",
        "Settings → API",
        "data.source: sample",
        "data.source: archive",
        "data.archive: path/to/archive.zip",
        "data.source: directory",
    ]:
        assert needed in message
    assert made == []
    assert leftovers(dest) == []


@pytest.mark.parametrize(
    "error",
    [
        requests.exceptions.ConnectionError("Failed to resolve 'api.kaggle.com'"),
        requests.exceptions.HTTPError("404 Client Error: Not Found for url"),
        SystemExit(1),
    ],
    ids=["unreachable", "not found", "auth failed"],
)
def test_fetch_kaggle_client_failure_names_the_dataset_and_the_alternatives(
    error: BaseException, dest: Path, kaggle_env: Path, monkeypatch
) -> None:
    monkeypatch.setenv("KAGGLE_API_TOKEN", "token")
    with pytest.raises(SourceError) as caught:
        fetch_kaggle(DATASET, dest, client_factory=lambda: FakeKaggle(error=error))

    message = str(caught.value)
    assert f"Kaggle download of '{DATASET}' failed: {type(error).__name__}: {error}" in message
    assert f"https://www.kaggle.com/datasets/{DATASET}" in message
    assert "data.source: sample" in message
    assert "data.source: archive" in message
    assert leftovers(dest) == []


def test_fetch_kaggle_without_a_zip_from_the_client_fails(
    dest: Path, kaggle_env: Path, monkeypatch
) -> None:
    monkeypatch.setenv("KAGGLE_API_TOKEN", "token")
    with pytest.raises(SourceError, match=r"face-expression-recognition-dataset\.zip in .*nothing"):
        fetch_kaggle(DATASET, dest, client_factory=lambda: FakeKaggle(files=None))
    assert leftovers(dest) == []


def test_importing_sources_does_not_import_kaggle() -> None:
    # `import kaggle` authenticates at import time and exits without credentials.
    code = "import sys, pipeline.sources; print('kaggle' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"


def test_count_images_counts_only_images_in_class_folders(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path / "raw",
        {
            "train/angry/a.png": b"",
            "train/angry/b.JPG": b"",
            "train/angry/.c.png": b"",
            "train/angry/notes.txt": b"",
            "train/contempt/d.png": b"",
            "validation/surprise/e.webp": b"",
        },
    )
    counts = count_images(root)
    assert counts["train"] == {**dict.fromkeys(CLASSES, 0), "angry": 2}
    assert counts["validation"] == {**dict.fromkeys(CLASSES, 0), "surprise": 1}
    with pytest.raises(SourceError, match="no such folder"):
        count_images(tmp_path / "missing")


REAL_COUNTS = {
    "train": {
        "angry": 3995,
        "disgust": 436,
        "fear": 4097,
        "happy": 7215,
        "neutral": 4965,
        "sad": 4830,
        "surprise": 3171,
    },
    "validation": {
        "angry": 467,
        "disgust": 56,
        "fear": 496,
        "happy": 895,
        "neutral": 607,
        "sad": 653,
        "surprise": 415,
    },
}


@pytest.mark.realdata
def test_extract_real_archive(dest: Path, capsys) -> None:
    archive = os.environ.get("FER_REAL_ARCHIVE")
    if not archive or not Path(archive).is_file():
        pytest.skip("set FER_REAL_ARCHIVE to the real FER2013 images .zip to run this")
    started = time.perf_counter()

    counts = extract_archive(Path(archive), dest)

    with capsys.disabled():
        print(f"\nextracted {archive} in {time.perf_counter() - started:.1f} s")
    assert counts == REAL_COUNTS
    assert sum(counts["train"].values()) == 28_709
    assert sum(counts["validation"].values()) == 3_589
    assert leftovers(dest) == ["raw"]
