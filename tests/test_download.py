"""Stage `download`: raw images, `reports/data.json`, the Keras-style summary, exit codes."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml

from pipeline import CLASSES, download
from pipeline.params import DataParams, load_params, read_raw_params
from pipeline.paths import Paths
from pipeline.sample import generate_sample

ROOT = Path(__file__).resolve().parents[1]


def data_params(**changes) -> DataParams:
    return load_params(ROOT / "params.yaml").data.model_copy(update=changes)


def counts_on_disk(raw: Path) -> dict[str, dict[str, int]]:
    return {
        split: {name: len(list((raw / split / name).iterdir())) for name in CLASSES}
        for split in ("train", "validation")
    }


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
    params = data_params(source="sample", sample_train_images=70, sample_validation_images=35)

    report = download.run(params, paths)

    on_disk = counts_on_disk(paths.raw)
    assert sum(on_disk["train"].values()) == 70
    assert sum(on_disk["validation"].values()) == 35
    assert all(n >= 2 for split in on_disk.values() for n in split.values())
    assert report == {
        "source": "sample",
        "train": {**on_disk["train"], "total": 70},
        "validation": {**on_disk["validation"], "total": 35},
        "total": 105,
    }
    assert json.loads(paths.data_report.read_text(encoding="utf-8")) == report
    assert capsys.readouterr().out.splitlines() == [
        "train: Found 70 images belonging to 7 classes.",
        "validation: Found 35 images belonging to 7 classes.",
    ]


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
        params = data_params(source="archive", archive=str(archive))
    else:
        params = data_params(source="directory", directory=str(dataset / "images"))
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
    )
    assert download.main(["--params", str(params)]) == 0
    assert sum(counts_on_disk(tmp_path / "data" / "raw")["train"].values()) == 14
    assert json.loads((tmp_path / "reports" / "data.json").read_text())["total"] == 28
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
