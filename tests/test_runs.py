"""The runs table: read back from a real MLflow store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, subprocess_env
from mlflow.tracking import MlflowClient

from pipeline import runs

START = 1_700_000_000_000  # ms


def _store(tmp_path: Path) -> tuple[str, MlflowClient, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("exp", artifact_location=str(tmp_path / "art"))
    return uri, client, experiment


def _run(client, experiment, name, arch, curve, minutes_per_epoch, evaluated=True, start=START):
    run = client.create_run(experiment, start_time=start, run_name=name)
    client.log_param(run.info.run_id, "model.arch", arch)
    for epoch, value in enumerate(curve, start=1):
        stamp = start + int(epoch * minutes_per_epoch * 60000)
        client.log_metric(run.info.run_id, "val_accuracy", value, timestamp=stamp, step=epoch)
    if evaluated:
        for key, value in {
            "eval_accuracy": 0.61234, "test_accuracy": 0.6, "test_f1_macro": 0.5,
            "test_f1_disgust": 0.25, "test_f1_fear": 0.3, "train_images_per_second": 281.4,
        }.items():  # fmt: skip
            client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    return run


def test_rows_time_the_first_epoch_to_reach_the_threshold(tmp_path: Path) -> None:
    uri, client, experiment = _store(tmp_path)
    _run(client, experiment, "slow", "seed", [0.40, 0.55, 0.57, 0.56], 3.0)
    _run(client, experiment, "fast", "resnet", [0.50, 0.58], 2.0, start=START + 1)
    _run(client, experiment, "never", "vgg", [0.30, 0.40], 1.0, start=START + 2)
    _run(client, experiment, "unevaluated", "vgg", [0.9], 1.0, False, start=START + 3)

    rows = runs.collect(uri, "exp", [], 0.56)
    assert [r.name for r in rows] == ["never", "fast", "slow"]  # evaluated, newest first
    slow = rows[2]
    assert (slow.arch, slow.epochs, slow.reached) == ("seed", 4, (3, pytest.approx(9.0)))
    assert slow.training_minutes == pytest.approx(12.0)
    assert rows[1].reached == (2, pytest.approx(4.0))
    assert rows[0].reached is None

    table = runs.format_table(rows, 0.56)
    lines = table.splitlines()
    assert "first val_accuracy ≥ 0.56" in lines[0] and len(lines) == 5
    assert lines[4] == (
        "| slow | seed | 4 | 0.6000 | 0.6123 | 0.5000 | 0.250 | 0.300 | 12.0 | 281 "
        "| epoch 3, 9.0 min |"
    )
    assert "| not reached |" in lines[2]


def test_named_runs_come_in_the_order_asked_and_unknown_names_are_an_error(tmp_path):
    uri, client, experiment = _store(tmp_path)
    _run(client, experiment, "a", "seed", [0.6], 1.0)
    _run(client, experiment, "b", "vgg", [0.5], 1.0, False, start=START + 1)
    assert [r.name for r in runs.collect(uri, "exp", ["b", "a"], 0.56)] == ["b", "a"]
    b = runs.collect(uri, "exp", ["b"], 0.56)[0]
    assert b.accuracy is b.test_accuracy is None and "| – |" in runs.format_table([b], 0.56)
    with pytest.raises(LookupError, match="no run named c"):
        runs.collect(uri, "exp", ["a", "c"], 0.56)
    with pytest.raises(LookupError, match="no experiment 'other'"):
        runs.collect(uri, "other", [], 0.56)


def test_the_command_reads_the_store_named_by_mlflow_tracking_uri(tmp_path: Path) -> None:
    uri, client, experiment = _store(tmp_path)
    _run(client, experiment, "only", "xception", [0.57], 2.5)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.runs", "--experiment", "exp", "--reach", "0.5"],
        env=subprocess_env(MLFLOW_TRACKING_URI=uri), cwd=tmp_path,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| only | xception | 1 | 0.6000 | 0.6123 |" in done.stdout
    assert "epoch 1, 2.5 min" in done.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "pipeline.runs", "--experiment", "exp", "ghost"],
        env=subprocess_env(MLFLOW_TRACKING_URI=uri), cwd=tmp_path,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 1 and "no run named ghost" in missing.stderr


def test_a_tracking_server_that_is_down_gets_the_short_message(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.runs"],
        env=subprocess_env(MLFLOW_TRACKING_URI=uri), cwd=tmp_path,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"error: the MLflow tracking server at {uri}" in done.stderr
    assert "not reachable" in done.stderr and "Traceback" not in done.stderr
