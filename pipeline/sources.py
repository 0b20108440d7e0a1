"""The data sources of the `download` stage other than the embedded sample.

Each source ends in the same layout, `<dest>/train/<class>/…` and
`<dest>/validation/<class>/…` with the class names of `pipeline.CLASSES`, and is
written atomically: everything goes into a scratch folder next to `dest`, which
replaces `dest` by a rename only once it is complete. A failure or an interrupt
removes the scratch folder and leaves `dest` as it was.

The layouts recognised, in a zip or a folder, optionally inside one top folder:
`images/train/<class>/` + `images/validation/<class>/` (the Kaggle dataset
jonathanoheix/face-expression-recognition-dataset) and `train/<class>/` +
`test/<class>/` (msambare/fer2013, where `test` becomes `validation`); a source with
train/, validation/ and test/ keeps its test split. Split and
class folder names match case-insensitively. Only image files are taken, by
extension; hidden files, `__MACOSX` and other non-images are ignored. Images are
not decoded here: `preprocess` reads them and reports the bad ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import CLASSES, REQUIRED_SPLITS, SPLITS
from pipeline.atomic import atomic_dir

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "test": "validation"}
_IGNORED_NAMES = frozenset({"__macosx"})
_CHUNK = 1 << 20

OFFLINE_ALTERNATIVES = (
    "To work without Kaggle, set in params.yaml either `data.source: sample` (the embedded "
    "sample: no account, no network), or `data.source: archive` with "
    "`data.archive: path/to/archive.zip` (the .zip downloaded from the dataset's Kaggle web "
    "page), or `data.source: directory` with `data.directory:` a folder of train/ and "
    "validation/ class folders."
)
_EXPECTED_LAYOUT = (
    "expected images/train/<class>/ + images/validation/<class>/, or train/<class>/ + "
    "test/<class>/, optionally inside one top folder, with the classes " + ", ".join(CLASSES)
)

Counts = dict[str, dict[str, int]]


class SourceError(RuntimeError):
    """A data source failed; the message says what, where and what to do."""


def count_images(root: Path) -> Counts:
    """Images per split and class in a finished `<root>/<split>/<class>/` tree."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: no such folder; run the download stage first")
    counts: Counts = {}
    for split in SPLITS:
        if split not in REQUIRED_SPLITS and not (root / split).is_dir():
            continue
        counts[split] = {}
        for cls in CLASSES:
            folder = root / split / cls
            files = folder.iterdir() if folder.is_dir() else ()
            counts[split][cls] = sum(1 for f in files if _is_image(f.name) and f.is_file())
    return counts


def carve_test_split(root: Path, fraction: float, seed: int) -> Counts:
    """Move `fraction` of each class of `root/validation` into `root/test`; return the counts.

    Stratified (the same share of every class, rounded, at least one face left in
    validation) and seeded: the faces are drawn from the sorted file names with a
    generator of its own made from `seed`, so the same data and seed give the same split.
    """
    root = Path(root)
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(7,))))
    for cls in CLASSES:
        files = sorted(p for p in (root / "validation" / cls).iterdir() if _is_image(p.name))
        take = min(round(len(files) * fraction), len(files) - 1)
        target = root / "test" / cls
        target.mkdir(parents=True, exist_ok=True)
        for index in sorted(generator.permutation(len(files))[:take]):
            files[index].replace(target / files[index].name)
    return count_images(root)


def extract_archive(archive: Path, dest: Path) -> Counts:
    """Extract a local .zip of the dataset into `dest` (replaced atomically)."""
    archive = Path(archive)
    if not archive.is_file():
        raise SourceError(
            f"data.archive: {archive} (resolved: {archive.resolve()}) is not a file; download "
            "the dataset's .zip from its Kaggle web page and set data.archive in params.yaml to "
            "its path, or set data.source: sample to use the embedded sample"
        )
    with atomic_dir(dest) as out:
        _extract_zip(archive, out, where=str(archive))
    return _report(dest)


def copy_directory(src: Path, dest: Path) -> Counts:
    """Copy a local dataset folder into `dest` (replaced atomically); `src` is only read."""
    src = Path(src)
    if not src.is_dir():
        raise SourceError(
            f"data.directory: {src} (resolved: {src.resolve()}) is not a folder; set "
            "data.directory in params.yaml to a folder with train/ and validation/ (or test/) "
            "class folders, or set data.source: sample to use the embedded sample"
        )
    a, b = src.resolve(), Path(dest).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise SourceError(
            f"data.directory: {src} overlaps the stage output {dest}; "
            "point data.directory to a folder outside it"
        )
    files = _walk_files(src)
    plan = _plan_layout(files, where=str(src))
    with atomic_dir(dest) as out:
        _make_class_folders(out, {split for split, _ in plan.values()})
        for rel, (split, cls) in tqdm(plan.items(), desc="copy", unit="file", disable=None):
            try:
                shutil.copyfile(files[rel], out / split / cls / PurePosixPath(rel).name)
            except OSError as exc:
                raise SourceError(f"{src}: could not copy {rel}: {exc}") from exc
    return _report(dest)


def fetch_kaggle(
    dataset: str, dest: Path, *, client_factory: Callable[[], Any] | None = None
) -> Counts:
    """Download `dataset` ('owner/name') with the official Kaggle client into `dest`.

    `client_factory` returns an object with `authenticate()` and
    `dataset_download_files(dataset, path=..., unzip=False, quiet=...)`, by
    default the `kaggle` package's `KaggleApi`.
    """
    found = _kaggle_credentials()
    if found is None:
        raise SourceError(
            "Kaggle credentials not found. Set KAGGLE_API_TOKEN, or KAGGLE_USERNAME and "
            f"KAGGLE_KEY, or save them as {_kaggle_config_dir() / 'kaggle.json'} "
            '({"username": "...", "key": "..."}, then chmod 600 it), or the token as '
            "~/.kaggle/access_token; create them at kaggle.com → Settings → API. "
            + OFFLINE_ALTERNATIVES
        )
    log.info("Kaggle credentials from %s", found)
    factory = client_factory or _kaggle_api
    with atomic_dir(dest) as out:
        download = out.parent / "download"
        download.mkdir()
        try:
            client = factory()
            client.authenticate()
            client.dataset_download_files(dataset, path=str(download), unzip=False, quiet=False)
        except (Exception, SystemExit) as exc:  # the client calls exit(1) on auth failure
            raise SourceError(
                f"Kaggle download of {dataset!r} failed: {type(exc).__name__}: {exc}. Check the "
                "network, your credentials and that https://www.kaggle.com/datasets/"
                f"{dataset} exists. " + OFFLINE_ALTERNATIVES
            ) from exc
        archive = _downloaded_zip(download, dataset)
        _extract_zip(archive, out, where=f"Kaggle dataset {dataset} ({archive.name})")
    return _report(dest)


def _kaggle_api() -> Any:
    # `import kaggle` authenticates at import time and may exit; import the class only.
    from kaggle.api.kaggle_api_extended import KaggleApi

    return KaggleApi()


def _kaggle_config_dir() -> Path:
    """Where kaggle 2.x looks for kaggle.json (mirrors `KaggleApi.config_dir`)."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"])
    home = Path("~/.kaggle").expanduser()
    if home.exists() or os.name == "nt":
        return home
    xdg = os.environ.get("XDG_CONFIG_HOME") or Path("~/.config").expanduser()
    return Path(xdg) / "kaggle"


def _kaggle_credentials() -> str | None:
    """Where the Kaggle client would find credentials, or None, without any network call."""
    env = os.environ
    if env.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    for name in ("access_token", "access_token.txt", "credentials.json"):
        path = Path("~/.kaggle").expanduser() / name
        if path.is_file() and path.read_text(encoding="utf-8").strip():
            return str(path)
    config: dict[str, Any] = {}
    config_file = _kaggle_config_dir() / "kaggle.json"
    if config_file.is_file():
        try:
            loaded = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable, ignored: %s", config_file, exc)
        else:
            config = loaded if isinstance(loaded, dict) else {}
    for key in ("username", "key"):
        if env.get(f"KAGGLE_{key.upper()}"):
            config[key] = env[f"KAGGLE_{key.upper()}"]
    if config.get("username") and config.get("key"):
        return f"KAGGLE_USERNAME/KAGGLE_KEY or {config_file}"
    return None


def _downloaded_zip(folder: Path, dataset: str) -> Path:
    name = dataset.split("/")[1] if "/" in dataset else dataset
    expected = folder / f"{name}.zip"
    if expected.is_file():
        return expected
    zips = sorted(folder.glob("*.zip"))
    if len(zips) == 1:
        return zips[0]
    found = sorted(p.name for p in folder.iterdir())
    raise SourceError(
        f"Kaggle dataset {dataset}: expected the client to leave {expected.name} in {folder}, "
        f"found {found or 'nothing'}. " + OFFLINE_ALTERNATIVES
    )


def _report(dest: Path) -> Counts:
    counts = count_images(dest)
    for split, per_class in counts.items():
        log.info("%s/%s: %d images %s", dest, split, sum(per_class.values()), per_class)
    return counts


def _is_image(name: str) -> bool:
    return not name.startswith(".") and PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _is_ignored(part: str) -> bool:
    return part.startswith(".") or part.lower() in _IGNORED_NAMES


def _make_class_folders(out: Path, splits: Iterable[str]) -> None:
    for split in splits:
        for cls in CLASSES:
            (out / split / cls).mkdir(parents=True)


def _walk_files(src: Path) -> dict[str, Path]:
    """Every file under `src` by its relative POSIX path, hidden folders pruned."""
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not _is_ignored(d))
        folder = Path(dirpath)
        for name in sorted(filenames):
            files[(folder / name).relative_to(src).as_posix()] = folder / name
    return files


def _checked_members(zf: zipfile.ZipFile, where: str) -> dict[str, zipfile.ZipInfo]:
    """The archive's file entries by name, refusing any unsafe or unreadable entry."""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        name = info.filename.replace("\\", "/")
        if name.startswith("/") or re.match(r"[A-Za-z]:", name) or ".." in name.split("/"):
            raise SourceError(
                f"{where}: refusing entry {info.filename!r}: its path leaves the extraction "
                "folder (absolute or with '..'); this archive is not a plain dataset zip"
            )
        if stat.S_ISLNK(info.external_attr >> 16):
            raise SourceError(
                f"{where}: refusing entry {info.filename!r}: it is a symbolic link; "
                "this archive is not a plain dataset zip"
            )
        if info.flag_bits & 0x1:
            raise SourceError(
                f"{where}: entry {info.filename!r} is encrypted; use an unencrypted zip"
            )
        if info.is_dir():
            continue
        if name in members:
            raise SourceError(f"{where}: entry {info.filename!r} appears twice in the archive")
        members[name] = info
    return members


def _extract_zip(archive: Path, out: Path, where: str) -> None:
    """Check every entry of `archive`, then stream its dataset images into `out`."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = _checked_members(zf, where)
            plan = _plan_layout(members, where)
            _make_class_folders(out, {split for split, _ in plan.values()})
            for name, (split, cls) in tqdm(plan.items(), desc="extract", unit="file", disable=None):
                target = out / split / cls / PurePosixPath(name).name
                with zf.open(members[name]) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise SourceError(
            f"{where}: not a valid zip archive, or damaged or truncated "
            f"({type(exc).__name__}: {exc}); download it again"
        ) from exc


def _plan_layout(paths: Iterable[str], where: str) -> dict[str, tuple[str, str]]:
    """Map each dataset image path (relative, POSIX) to its (split, class).

    The layout root is the shallowest folder holding `train/` and `validation/`
    (or `test/`) folders of images in class folders; images elsewhere (such as the
    nested duplicate `images/images/` of the default dataset) are ignored.
    """
    images = {
        key: path
        for key, path in ((key, PurePosixPath(key)) for key in paths)
        if _is_image(path.name) and not any(map(_is_ignored, path.parts))
    }
    splits_at: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for path in images.values():
        if len(path.parts) >= 3 and path.parts[-3].lower() in _SPLIT_ALIASES:
            splits_at[path.parts[:-3]].add(path.parts[-3].lower())
    roots = [r for r, s in splits_at.items() if "train" in s and s & {"validation", "test"}]
    if not roots:
        found = sorted("/".join((*r, s)) for r, splits in splits_at.items() for s in splits)
        top = sorted({p.parts[0] for p in images.values()})[:10]
        raise SourceError(
            f"{where}: no train/ and validation/ (or test/) class folders found "
            f"(split folders found: {found or 'none'}; top-level entries with images: "
            f"{top or 'none'}); {_EXPECTED_LAYOUT}"
        )
    depth = min(len(r) for r in roots)
    shallowest = sorted(r for r in roots if len(r) == depth)
    if len(shallowest) > 1:
        raise SourceError(
            f"{where}: several datasets side by side: "
            + ", ".join("/".join(r) for r in shallowest)
            + "; keep only one of them"
        )
    root = shallowest[0]
    wanted = {"train": "train"}
    if "validation" in splits_at[root]:
        wanted["validation"] = "validation"
        if "test" in splits_at[root]:
            wanted["test"] = "test"  # the source's own test split, kept as it is
    else:
        wanted["test"] = "validation"

    prefix = "/".join(root) + "/" if root else ""
    plan: dict[str, tuple[str, str]] = {}
    folders: dict[str, dict[str, str]] = {split: {} for split in wanted.values()}  # class → folder
    skipped: list[str] = []
    for key, path in images.items():
        rel = path.parts[len(root) :]
        if path.parts[: len(root)] != root or rel[0].lower() not in wanted:
            skipped.append(key)
            continue
        split = wanted[rel[0].lower()]
        if len(rel) != 3:
            raise SourceError(
                f"{where}: image {path} is not directly inside a class folder of "
                f"{prefix}{rel[0]}/; {_EXPECTED_LAYOUT}"
            )
        cls = rel[1].lower()
        if cls not in CLASSES:
            raise SourceError(
                f"{where}: unknown class folder {prefix}{rel[0]}/{rel[1]}/; "
                f"expected exactly the classes {', '.join(CLASSES)}"
            )
        folder = f"{prefix}{rel[0]}/{rel[1]}/"
        seen = folders[split].setdefault(cls, folder)
        if seen != folder:
            raise SourceError(
                f"{where}: both {seen} and {folder} hold class {cls!r}; merge them into one"
            )
        plan[key] = (split, cls)
    for split, found_classes in folders.items():
        missing = [c for c in CLASSES if c not in found_classes]
        if missing:
            raise SourceError(
                f"{where}: no images for class(es) {', '.join(missing)} in the {split} split "
                f"(found class folders: {', '.join(sorted(found_classes.values())) or 'none'}); "
                f"expected exactly the classes {', '.join(CLASSES)}"
            )
    log.info("%s: taking %s", where, " and ".join(f"{prefix}{name}/" for name in wanted))
    if skipped:
        log.info("%s: ignored %d images elsewhere, e.g. %s", where, len(skipped), skipped[0])
    return plan
