"""Stage `download`: raw images, `reports/data.json`, the Keras-style summary, exit codes."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml

from pipeline import CLASSES, SPLITS, download
from pipeline.params import DataParams, load_params, read_raw_params
from pipeline.paths import Paths
from pipeline.sample import generate_sample

ROOT = Path(__file__).resolve().parents[1]


def data_params(**changes) -> DataParams:
    return load_params(ROOT / "params.yaml").data.model_copy(update=changes)


def counts_on_disk(raw: Path) -> dict[str, dict[str, int]]:
    return {
        split: {name: len(list((raw / split / name).iterdir())) for name in CLASSES}
        for split in SPLITS
        if (raw / split).is_dir()
    }


def names_on_disk(raw: Path, split: str) -> set[str]:
    return {f"{p.parent.name}/{p.name}" for p in (raw / split).glob("*/*")}


def write_params(path: Path, **changes: object) -> Path:
    """The repo's params.yaml with dotted `data.*` keys changed (`data__source=...`)."""
    raw = read_raw_params(ROOT / "params.yaml")
    for key, value in changes.items():
        group, name = key.split("__")
        raw[group][name] = value
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_sample_source_writes_raw_and_data_report(tmp_path: Path, capsys) -> None:
    paths = Paths(tmp_path)
    params = data_params(
        source="sample", sample_train_images=70, sample_validation_images=35, sample_test_images=21
    )

    report = download.run(params, paths)

    on_disk = counts_on_disk(paths.raw)
    assert sum(on_disk["train"].values()) == 70
    assert sum(on_disk["validation"].values()) == 35
    assert sum(on_disk["test"].values()) == 21  # the sample's own test split: nothing carved
    assert all(n >= 2 for split in on_disk.values() for n in split.values())
    assert report == {
        "source": "sample",
        "train": {**on_disk["train"], "total": 70},
        "validation": {**on_disk["validation"], "total": 35},
        "test": {**on_disk["test"], "total": 21},
        "total": 126,
    }
    assert json.loads(paths.data_report.read_text(encoding="utf-8")) == report
    assert capsys.readouterr().out.splitlines() == [
        "train: Found 70 images belonging to 7 classes.",
        "validation: Found 35 images belonging to 7 classes.",
        "test: Found 21 images belonging to 7 classes.",
    ]


def test_sample_train_and_validation_do_not_depend_on_its_test_split(tmp_path: Path) -> None:
    with_test = Paths(tmp_path / "a")
    without = Paths(tmp_path / "b")
    common = {"source": "sample", "sample_train_images": 28, "sample_validation_images": 14}
    download.run(data_params(**common, sample_test_images=14), with_test)
    download.run(data_params(**common, sample_test_images=0, test_fraction=0.0), without)

    assert not (without.raw / "test").exists()
    for split in ("train", "validation"):
        files = sorted((with_test.raw / split).glob("*/*.jpg"))
        assert files
        for file in files:
            assert file.read_bytes() == (without.raw / file.relative_to(with_test.raw)).read_bytes()


def test_test_split_is_a_stratified_seeded_share_carved_off_validation(
    tmp_path: Path, capsys
) -> None:
    dataset = tmp_path / "dataset"
    generate_sample(dataset, 14, 70, seed=1)  # 10 validation faces a class, some fewer
    before = counts_on_disk(dataset)["validation"]
    params = data_params(source="directory", directory=str(dataset), test_fraction=0.3, seed=5)

    report = download.run(params, Paths(tmp_path / "a"))
    raw = tmp_path / "a" / "data" / "raw"

    taken = {name: min(round(n * 0.3), n - 1) for name, n in before.items()}
    for name in CLASSES:
        assert report["test"][name] == taken[name] > 0
        assert report["validation"][name] == before[name] - taken[name]
    validation, test = names_on_disk(raw, "validation"), names_on_disk(raw, "test")
    assert not validation & test
    assert validation | test == names_on_disk(dataset, "validation")
    assert report["train"]["total"] == 14
    message = f"test: {sum(taken.values())} validation images set aside as the test split"
    assert message in capsys.readouterr().out

    download.run(params, Paths(tmp_path / "b"))  # same data and seed: the same faces
    assert names_on_disk(tmp_path / "b" / "data" / "raw", "test") == test
    download.run(params.model_copy(update={"seed": 6}), Paths(tmp_path / "c"))
    assert names_on_disk(tmp_path / "c" / "data" / "raw", "test") != test


def test_a_source_with_its_own_test_folder_keeps_it(tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    generate_sample(dataset, 14, 21, seed=1, test_images=28)
    params = data_params(source="directory", directory=str(dataset), test_fraction=0.5)

    report = download.run(params, Paths(tmp_path / "project"))

    raw = tmp_path / "project" / "data" / "raw"
    assert names_on_disk(raw, "test") == names_on_disk(dataset, "test")
    assert names_on_disk(raw, "validation") == names_on_disk(dataset, "validation")
    assert (report["validation"]["total"], report["test"]["total"]) == (21, 28)


def test_no_test_split_with_test_fraction_zero(tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    generate_sample(dataset, 14, 21, seed=1)
    params = data_params(source="directory", directory=str(dataset), test_fraction=0.0)

    report = download.run(params, Paths(tmp_path / "project"))

    assert "test" not in report
    assert not (tmp_path / "project" / "data" / "raw" / "test").exists()


@pytest.mark.parametrize("source", ["archive", "directory"])
def test_local_sources_write_raw_and_data_report(tmp_path: Path, source: str, capsys) -> None:
    dataset = tmp_path / "dataset"
    generate_sample(dataset / "images", 14, 21, seed=1)  # the Kaggle zip's layout
    expected = counts_on_disk(dataset / "images")
    if source == "archive":
        archive = tmp_path / "fer.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for file in sorted(dataset.rglob("*.jpg")):
                zf.write(file, file.relative_to(dataset).as_posix())
        params = data_params(source="archive", archive=str(archive), test_fraction=0.0)
    else:
        params = data_params(
            source="directory", directory=str(dataset / "images"), test_fraction=0.0
        )
    paths = Paths(tmp_path / "project")

    report = download.run(params, paths)

    assert counts_on_disk(paths.raw) == expected
    assert report["source"] == source
    assert report["train"]["total"] == 14
    assert report["validation"]["total"] == 21
    assert report["total"] == 35
    assert json.loads(paths.data_report.read_text(encoding="utf-8")) == report
    assert "validation: Found 21 images belonging to 7 classes." in capsys.readouterr().out


def test_main_runs_the_stage_from_params(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    params = write_params(
        tmp_path / "params.yaml",
        data__source="sample",
        data__sample_train_images=14,
        data__sample_validation_images=14,
        data__sample_test_images=14,
    )
    assert download.main(["--params", str(params)]) == 0
    assert sum(counts_on_disk(tmp_path / "data" / "raw")["train"].values()) == 14
    assert json.loads((tmp_path / "reports" / "data.json").read_text())["total"] == 42
    assert "train: Found 14 images belonging to 7 classes." in capsys.readouterr().out


def test_main_refuses_invalid_params_with_exit_code_2(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path / "params.yaml", data__sample_train_images=5)

    assert download.main(["--params", str(params)]) == 2

    assert (
        "invalid params: data.sample_train_images: 5 is out of range; allowed: at least 14"
        in caplog.text
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_main_with_a_missing_archive_exits_1_and_says_what_to_set(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.chdir(tmp_path)
    params = write_params(
        tmp_path / "params.yaml", data__source="archive", data__archive="downloads/fer.zip"
    )

    assert download.main(["--params", str(params)]) == 1

    message = caplog.text
    assert "data.archive: downloads/fer.zip" in message
    assert str(tmp_path / "downloads" / "fer.zip") in message  # where it was looked for
    assert "set data.archive in params.yaml" in message
    assert "data.source: sample" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
