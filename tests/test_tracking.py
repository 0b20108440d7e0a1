"""MLflow tracking against a real tracking server on loopback (and a real `dvc exp run`).

Every training here is tiny (~10 images per class and split, one or two
epochs of the seed model); each test uses an experiment of its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import (
    GIT_IDENTITY,
    ROOT,
    free_port,
    git,
    start_mlflow_server,
    stop_process_group,
    subprocess_env,
    tiny_params,
    wait_for_http,
    write_params,
)

from pipeline import CLASSES, evaluate, machine, tracking, train
from pipeline.params import flatten
from pipeline.paths import Paths

EPOCH_CURVES = ("loss", "accuracy", "val_loss", "val_accuracy", "lr")
TRAINING_ARTIFACTS = {
    "models/model.h5",
    "reports/model_summary.txt",
    "reports/history.csv",
    "reports/figures/training_curves.png",
    "reports/data.json",
}
EVALUATION_ARTIFACTS = {
    "reports/classification_report.txt",
    "reports/figures/confusion_matrix.png",
    "reports/figures/confusion_matrix_test.png",
    "reports/figures/reliability.png",
}


def commit_all(repo: Path) -> str:
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "test project")
    return git(repo, "rev-parse", "HEAD")


def artifact_files(client, run_id: str, folder: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, folder):
        found |= artifact_files(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def only_run(client, experiment: str):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def steps_and_values(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def history_rows(path: Path) -> list[dict[str, float]]:
    import pandas as pd

    return pd.read_csv(path).to_dict("records")


@pytest.fixture
def client(mlflow_server: str, monkeypatch: pytest.MonkeyPatch):
    """An MLflow client of the test server, which the pipeline also tracks to."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for name in ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    return MlflowClient(mlflow_server)


# ---------------------------------------------------------------- where the store is


def test_project_root_is_where_dvc_says(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.project_root(tmp_path / "somewhere" / "else") == tmp_path.resolve()


def test_project_root_steps_out_of_a_dvc_experiment_copy(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DVC_ROOT", raising=False)
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    (copy / ".dvc").mkdir(parents=True)  # the copy is a DVC repository of its own
    (copy / "pipeline").mkdir()
    assert tracking.project_root(copy / "pipeline") == tmp_path.resolve()


def test_project_root_walks_up_to_the_dvc_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "reports" / "figures").mkdir(parents=True)
    assert tracking.project_root(tmp_path / "reports" / "figures") == tmp_path.resolve()


def test_local_store_unless_mlflow_tracking_uri_is_set(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5000"


# ---------------------------------------------------------------- what a run holds


def check_run(client, run_id: str, params, paths: Paths, metrics: dict, commit: str, dirty: str):
    import keras
    import tensorflow as tf

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert re.fullmatch(r"seed-\d{8}-\d{6}", run.info.run_name)
    assert run.data.params == {k: str(v) for k, v in flatten(params).items()}

    history = history_rows(paths.history)
    assert [row["epoch"] for row in history] == [1, 2]
    for key in EPOCH_CURVES:
        logged = steps_and_values(client, run_id, key)
        assert [step for step, _ in logged] == [1, 2], key
        for (_, value), row in zip(logged, history, strict=True):
            assert math.isclose(value, row[key], rel_tol=1e-4), key
    first_rate = steps_and_values(client, run_id, "lr")[0][1]
    assert math.isclose(first_rate, params.train.learning_rate, rel_tol=1e-6)

    logged = run.data.metrics
    for key in ("accuracy", "loss", "f1_macro", "f1_weighted"):
        assert logged[f"eval_{key}"] == pytest.approx(metrics[key])
    for name in CLASSES:
        assert logged[f"eval_f1_{name}"] == pytest.approx(metrics["per_class"][name]["f1"])
    assert logged["best_epoch"] == metrics["best_epoch"]

    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == commit
    assert tags["git.dirty"] == dirty
    assert re.fullmatch(r"[0-9a-f]{32}\.dir", tags["data.md5"])
    assert tags["tensorflow.version"] == tf.__version__
    assert tags["keras.version"] == keras.__version__
    assert tags["precision"] in ("float32", "mixed_bfloat16", "mixed_float16")
    assert tags["stage"] == "evaluated"
    assert tags["cpu.model"] == machine.cpu_model() != ""
    assert tags["cpu.bfloat16"] in ("amx_bf16", "avx512_bf16", "none")
    assert int(tags["cpu.cores"]) >= 1

    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "embedded-sample"
    assert dataset.dataset.digest == tags["data.md5"]
    assert str(paths.processed.resolve()) in dataset.dataset.source
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "training"
    assert "system/cpu_utilization_percentage" in logged  # MLflow's system metrics

    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    assert artifact_files(client, run_id) == TRAINING_ARTIFACTS | EVALUATION_ARTIFACTS
    assert json.loads(paths.run_info.read_text())["run_id"] == run_id
    return run


@pytest.mark.slow
def test_two_runs_hold_params_curves_metrics_artifacts_models_and_tags(
    client, tiny_project: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keras
    import mlflow
    import numpy as np

    # a sample a second: a tiny training ends before MLflow's default 10 s interval
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    paths = tiny_project
    experiment = "test-two-runs"
    (paths.root / ".gitignore").write_text("data\nmodels\n")
    paths.metrics.write_text("{}")  # a committed output, as DVC's metrics are
    choices = [(0.001, None), (0.0005, "test-emotion-model")]
    runs = {}
    for index, (rate, registered) in enumerate(choices):
        params = tiny_params(
            **{
                "train.epochs": 2,
                "train.early_stopping.enabled": False,
                "train.learning_rate": rate,
                "mlflow.experiment": experiment,
                "mlflow.registered_model": registered,
            }
        )
        write_params(paths.root / "params.yaml", params)
        if index == 0:  # the second run's params.yaml differs from the commit
            commit = commit_all(paths.root)
            paths.metrics.write_text('{"accuracy": 0.5}')  # rewritten outputs are not dirt
        train.run_tracked(params, paths)
        metrics = evaluate.run_tracked(params, paths)
        assert mlflow.active_run() is None
        run_id = json.loads(paths.run_info.read_text())["run_id"]
        check_run(client, run_id, params, paths, metrics, commit, ["false", "true"][index])
        runs[rate] = run_id

        downloaded = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="models/model.h5", dst_path=str(tmp_path / run_id)
        )
        assert Path(downloaded).read_bytes() == paths.model.read_bytes()
        model = keras.models.load_model(downloaded, compile=False)
        image = np.full((1, 48, 48, 1), 128.0, dtype="float32")
        probabilities = model.predict(image, verbose=0)
        assert probabilities.shape == (1, len(CLASSES))

        experiment_id = client.get_experiment_by_name(experiment).experiment_id
        logged = {
            m.name: m
            for m in client.search_logged_models([experiment_id])
            if m.source_run_id == run_id
        }
        assert set(logged) == {"keras_model", "emotion_model"}
        flavoured = mlflow.keras.load_model(logged["keras_model"].model_uri)
        assert np.allclose(flavoured.predict(image, verbose=0), probabilities, atol=1e-6)
        assert mlflow.models.get_model_info(logged["keras_model"].model_uri).signature

    assert len(set(runs.values())) == 2
    tags = [client.get_run(run_id).data.tags for run_id in runs.values()]
    assert tags[0]["data.md5"] == tags[1]["data.md5"]  # the same data

    versions = client.search_model_versions("name = 'test-emotion-model'")
    assert [v.run_id for v in versions] == [runs[0.0005]]  # only the run that asked for it
    pyfunc = next(
        m
        for m in client.search_logged_models([experiment_id])
        if m.source_run_id == runs[0.0005] and m.name == "emotion_model"
    )
    assert pyfunc.model_id in versions[0].source


@pytest.mark.slow
def test_evaluation_with_other_evaluate_params_goes_to_a_new_run(
    client, tiny_project: Paths
) -> None:
    paths = tiny_project
    experiment = "test-reevaluate"
    params = tiny_params(**{"mlflow.experiment": experiment, "mlflow.log_model": False})
    train.run_tracked(params, paths)
    trained = json.loads(paths.run_info.read_text())["run_id"]

    other = tiny_params(
        **{"mlflow.experiment": experiment, "mlflow.log_model": False, "evaluate.tta": True}
    )
    evaluate.run_tracked(other, paths)

    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = {run.info.run_id: run for run in client.search_runs([experiment_id])}
    assert len(runs) == 2
    first = runs.pop(trained)
    (second,) = runs.values()
    assert first.info.status == "FINISHED"
    assert first.data.tags["stage"] == "trained"
    assert "eval_accuracy" not in first.data.metrics
    assert second.info.status == "FINISHED"
    assert second.data.tags["stage"] == "evaluated"
    assert second.data.tags["train_run_id"] == trained
    assert "evaluate.tta" in second.data.tags["mlflow.note.content"]
    assert second.data.params["evaluate.tta"] == "True"
    assert "eval_accuracy" in second.data.metrics
    assert [s for s, _ in steps_and_values(client, second.info.run_id, "loss")] == [1]
    assert artifact_files(client, second.info.run_id) == TRAINING_ARTIFACTS | EVALUATION_ARTIFACTS
    assert client.search_logged_models([experiment_id]) == []  # mlflow.log_model: false


# ---------------------------------------------------------------- failures


@pytest.mark.slow
def test_a_run_whose_training_raises_ends_failed(client, tiny_data: Paths, tmp_path: Path) -> None:
    import mlflow

    processed = tmp_path / "data" / "processed"
    processed.mkdir(parents=True)
    (processed / "train").symlink_to(tiny_data.processed / "train")  # no validation split
    paths = Paths(tmp_path)
    params = tiny_params(**{"mlflow.experiment": "test-failed"})

    with pytest.raises(FileNotFoundError, match="validation"):
        train.run_tracked(params, paths)

    assert mlflow.active_run() is None
    run = only_run(client, "test-failed")
    assert run.info.status == "FAILED"
    assert run.data.tags["stage"] == "training"
    assert run.data.params["train.epochs"] == "1"
    assert not paths.run_info.exists()


@contextlib.contextmanager
def training_in_its_second_epoch(
    client, mlflow_server: str, root: Path, experiment: str
) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """`python -m pipeline.train` of 1000 epochs in `root`, once its first epoch is logged:
    yields the process, its run id and its log file; killed at the end if still alive."""
    params = tiny_params(
        **{
            "train.epochs": 1000,
            "train.early_stopping.enabled": False,
            "mlflow.experiment": experiment,
        }
    )
    write_params(root / "params.yaml", params)
    log_file = root / "train.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.train"],
            cwd=root,
            env=subprocess_env(MLFLOW_TRACKING_URI=mlflow_server),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        run_id = None
        while time.monotonic() < deadline and process.poll() is None:
            found = client.get_experiment_by_name(experiment)
            runs = client.search_runs([found.experiment_id]) if found else []
            if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
                run_id = runs[0].info.run_id  # epoch 1 is over, epoch 2 has begun
                break
            time.sleep(0.5)
        assert run_id, "no epoch finished:\n" + log_file.read_text(errors="replace")[-3000:]
        yield process, run_id, log_file
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_sigterm_during_training_ends_the_run_killed(
    client, mlflow_server: str, tiny_project: Paths
) -> None:
    with training_in_its_second_epoch(client, mlflow_server, tiny_project.root, "test-sigterm") as (
        process,
        run_id,
        log_file,
    ):
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=120)

    output = log_file.read_text(errors="replace")
    assert returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped: SIGTERM" in output
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[tracking.STOPPED_TAG] == "SIGTERM"
    assert 1 <= len(client.get_metric_history(run_id, "loss")) < 1000
    assert not tiny_project.run_info.exists()


_WATCHING = """
import sys, time, psutil
from pipeline import tracking
with tracking.sigterm_raises(psutil.Process(int(sys.argv[1]))):
    print("watching", flush=True)
    time.sleep(120)
print("not stopped")
"""


def test_a_stage_stops_as_if_sent_sigterm_when_the_dvc_process_running_it_is_killed() -> None:
    runner = subprocess.Popen(["sleep", "300"])  # stands in for `dvc exp exec-run`
    stage = subprocess.Popen(
        [sys.executable, "-c", _WATCHING, str(runner.pid)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        assert stage.stdout.readline() == "watching\n", stage.stderr.read()
        runner.kill()  # left a zombie (not waited for), as a killed child often is at first
        out, err = stage.communicate(timeout=60)
    finally:
        for process in (runner, stage):
            process.kill()
            process.wait()

    assert "not stopped" not in out
    assert (
        f"Terminated: the DVC process that ran this stage (pid {runner.pid}: sleep 300) ended, "
        "so nothing would record what this stage goes on to write"
    ) in err


_RUNNER = "from pipeline import tracking; r = tracking.stage_runner(); print(r and r.pid)"


@pytest.mark.parametrize("under_dvc", [True, False])
def test_the_stage_runner_is_the_process_behind_the_shell_dvc_starts(under_dvc: bool) -> None:
    env = subprocess_env(DVC_STAGE="train" if under_dvc else None)
    # `; true` keeps the shell from exec-ing the command: it stays between the two
    command = f"{sys.executable} -c '{_RUNNER}'; true"
    done = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (str(os.getpid()) if under_dvc else "None")


@pytest.mark.slow
def test_a_training_killed_outright_is_ended_killed_by_the_next_stage(
    client, mlflow_server: str, tiny_project: Paths
) -> None:
    root = tiny_project.root
    experiment = "test-sigkill"
    with training_in_its_second_epoch(client, mlflow_server, root, experiment) as (
        process,
        run_id,
        _,
    ):
        process.kill()  # SIGKILL: no handler runs, the run cannot be ended by its process
        process.wait(timeout=60)
    assert client.get_run(run_id).info.status == "RUNNING"  # what SIGKILL leaves

    write_params(root / "params.yaml", tiny_params(**{"mlflow.experiment": experiment}))
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.train"],
        cwd=root,
        env=subprocess_env(MLFLOW_TRACKING_URI=mlflow_server),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED"
    assert killed.data.tags[tracking.ABANDONED_TAG] == (
        f"process {process.pid} on {socket.gethostname()}, which held the run open, ended "
        "without ending it"
    )
    assert f"MLflow run {killed.info.run_name} ({run_id}) ended KILLED" in done.stderr
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]


@pytest.mark.slow
def test_runs_of_living_processes_and_of_other_hosts_stay_running(
    client, mlflow_server: str
) -> None:
    import mlflow

    experiment_id = client.create_experiment("test-abandoned")
    here = tracking.process_tags()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    kinds = {
        "mine": here,  # this process: alive
        "reused pid": {**here, tracking.PROCESS_STARTED_TAG: "12.000"},  # another start
        "gone": {**here, tracking.PID_TAG: str(gone.pid)},
        "elsewhere": {**here, tracking.HOST_TAG: "another-host", tracking.PID_TAG: str(gone.pid)},
        "untagged": {},
    }
    ids = {
        kind: client.create_run(experiment_id, tags=tags).info.run_id
        for kind, tags in kinds.items()
    }
    mlflow.set_tracking_uri(mlflow_server)
    try:
        ended = tracking.end_abandoned_runs(experiment_id)
    finally:
        mlflow.set_tracking_uri(None)
    assert sorted(ended) == sorted([ids["reused pid"], ids["gone"]])
    status = {kind: client.get_run(run_id).info.status for kind, run_id in ids.items()}
    assert status == {
        "mine": "RUNNING",
        "reused pid": "KILLED",
        "gone": "KILLED",
        "elsewhere": "RUNNING",
        "untagged": "RUNNING",
    }


def test_an_unreachable_tracking_server_fails_fast_before_training(tiny_project: Paths) -> None:
    root = tiny_project.root
    write_params(root / "params.yaml", tiny_params())
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.train"],
        cwd=root,
        env=subprocess_env(MLFLOW_TRACKING_URI=uri),
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - started

    assert done.returncode == 1, done.stderr
    # MLflow's own retries would take over four minutes (7 retries, backoff factor 2);
    # the bound is loose because TensorFlow's import alone takes 10-30 s on a busy machine
    assert seconds < 120, f"took {seconds:.0f} s to notice"
    for words in (uri, "not reachable", "mlflow server", "unset MLFLOW_TRACKING_URI"):
        assert words in done.stderr
    assert "Found" not in done.stderr  # the data was never loaded
    assert not tiny_project.models.exists()


def train_past_the_first_epoch(
    root: Path, params, uri: str, **env: str
) -> tuple[subprocess.Popen, str, Path]:
    """`python -m pipeline.train` tracking to `uri`, once its first epoch is logged; the
    process, its run id and its log file."""
    from mlflow import MlflowClient

    write_params(root / "params.yaml", params)
    client = MlflowClient(uri)
    log_file = root / "train.log"
    with log_file.open("wb") as log:
        training = subprocess.Popen(
            [sys.executable, "-m", "pipeline.train"],
            cwd=root,
            env=subprocess_env(MLFLOW_TRACKING_URI=uri, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and training.poll() is None:
        found = client.get_experiment_by_name(params.mlflow.experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
            return training, runs[0].info.run_id, log_file  # epoch 2 has begun
        time.sleep(0.2)
    training.kill()
    training.wait()
    pytest.fail("no epoch logged:\n" + log_file.read_text(errors="replace")[-3000:])


def crash(server: subprocess.Popen) -> None:
    """SIGKILL to the server and its worker: a crash, not a shutdown."""
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


EIGHT_EPOCHS = {"train.epochs": 8, "train.early_stopping.enabled": False}


@pytest.mark.slow
def test_a_server_restarted_during_training_still_gets_a_finished_run_with_every_epoch(
    tiny_project: Paths, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    folder, port = tmp_path / "server", free_port()
    folder.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(folder, port)
    training, run_id, log_file = train_past_the_first_epoch(
        tiny_project.root, tiny_params(**EIGHT_EPOCHS), uri
    )
    try:
        crash(server)
        time.sleep(3)  # the training meets a closed port, and retries
        assert training.poll() is None, "the training ended before the server came back"
        server = start_mlflow_server(folder, port)
        returncode = training.wait(timeout=600)
    finally:
        if training.poll() is None:
            training.kill()
            training.wait()
        stop_process_group(server)
        server = start_mlflow_server(folder, port)  # to read what the run holds

    try:
        output = log_file.read_text(errors="replace")
        assert returncode == 0, output[-3000:]
        # the outage was met: an epoch's metrics were refused, and retried (MLflow's client)
        retried = [line for line in output.splitlines() if "Retrying" in line]
        assert any("Connection refused" in line and "runs/log-batch" in line for line in retried)
        client = MlflowClient(uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert sorted(steps) == list(range(1, 9)), key
        assert "models/model.h5" in {f.path for f in client.list_artifacts(run_id, "models")}
        assert json.loads(tiny_project.run_info.read_text())["run_id"] == run_id
    finally:
        stop_process_group(server)


@pytest.mark.slow
def test_a_server_gone_for_good_leaves_the_trained_model_and_names_the_run(
    tiny_project: Paths, tmp_path: Path
) -> None:
    folder, port = tmp_path / "server", free_port()
    folder.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(folder, port)
    # one quick retry instead of MLflow's minutes of them
    short = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
    training, run_id, log_file = train_past_the_first_epoch(
        tiny_project.root, tiny_params(**EIGHT_EPOCHS), uri, **short
    )
    try:
        crash(server)
        returncode = training.wait(timeout=600)
    finally:
        if training.poll() is None:
            training.kill()
            training.wait()
        stop_process_group(server)

    output = log_file.read_text(errors="replace")
    assert returncode == 1, output[-3000:]
    error = next(line for line in output.splitlines() if "train ERROR" in line)
    assert f"the MLflow store {uri} failed (Connection refused): " in error
    assert f"run {run_id} lacks epochs " in error
    assert "of its curves, and its summary metrics, model and reports" in error
    assert "The training itself is whole" in error
    assert "Traceback" not in output
    # every epoch trained, and the checkpoint and the history are there
    history = pd.read_csv(tiny_project.history)
    assert history["epoch"].tolist() == list(range(1, 9))
    assert tiny_project.model.is_file()
    assert not tiny_project.run_info.exists()  # no run for evaluate to reopen


# ---------------------------------------------------------------- a store at another schema


_MAKE_STORE = (
    "import sys; from mlflow import MlflowClient; MlflowClient(sys.argv[1]).search_experiments()"
)
NEWER = "f00dfeed1234"  # a schema version no MLflow release has


def store_at_schema(path: Path, change: str) -> tuple[str, str]:
    """A real SQLite store made by this MLflow, then moved off its schema version with
    MLflow's own alembic scripts; (its URI, the version it is left at).

    `downgrade`: MLflow's downgrade of its newest migration. `stamp`: the version of
    the one before, the tables as they are (a store an older MLflow wrote, when no
    migration since added a table). `unknown`: a version this MLflow does not know, as a
    newer MLflow writes.
    """
    import sqlalchemy
    from alembic import command
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    uri = f"sqlite:///{path}"
    # made in another process: this one would keep MLflow's verified store for the URI
    subprocess.run(
        [sys.executable, "-c", _MAKE_STORE, uri], env=subprocess_env(), check=True, timeout=120
    )
    config = _get_alembic_config(uri)
    head = ScriptDirectory.from_config(config).get_current_head()
    older = ScriptDirectory.from_config(config).get_revision(head).down_revision
    if change == "downgrade":
        command.downgrade(config, older)
        return uri, older
    if change == "stamp":
        command.stamp(config, older)
        return uri, older
    engine = sqlalchemy.create_engine(uri)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f"UPDATE alembic_version SET version_num = '{NEWER}'"))
    engine.dispose()
    return uri, NEWER


def schema_version(uri: str) -> str:
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri)
    with engine.connect() as connection:
        version = connection.execute(sqlalchemy.text("SELECT version_num FROM alembic_version"))
        found = version.scalar_one()
    engine.dispose()
    return found


def test_a_store_at_an_older_schema_stops_the_stage_with_the_upgrade_command(
    tiny_project: Paths,
) -> None:
    root = tiny_project.root
    (root / ".dvc").mkdir()
    write_params(root / "params.yaml", tiny_params())
    uri, version = store_at_schema(root / "mlflow.db", "stamp")

    done = subprocess.run(
        [sys.executable, "-m", "pipeline.train"],
        cwd=root,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 1, done.stderr
    # today MLflow's own words end in "run 'mlflow db upgrade <database_uri>'", cut short
    error = next(line for line in done.stderr.splitlines() if "train ERROR" in line)
    assert error.endswith(
        f"train ERROR: the MLflow store {uri} has an older schema (version {version}) than "
        f"MLflow {mlflow_version()} needs ({schema_version_of_this_mlflow()}): back it up, "
        f"then run mlflow db upgrade {uri}"
    )
    assert "Found" not in done.stderr  # the data was never loaded
    assert not tiny_project.models.exists()
    assert schema_version(uri) == version  # and the store is as it was


def mlflow_version() -> str:
    import mlflow

    return mlflow.__version__


def schema_version_of_this_mlflow() -> str:
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    return ScriptDirectory.from_config(_get_alembic_config("")).get_current_head()


def test_a_store_a_newer_mlflow_wrote_says_so(tmp_path: Path) -> None:
    uri, version = store_at_schema(tmp_path / "mlflow.db", "unknown")
    with pytest.raises(tracking.TrackingError) as caught:
        tracking.check_reachable(uri, tmp_path)
    assert str(caught.value) == (
        f"the MLflow store {uri} has a newer schema (version {version}) than MLflow "
        f"{mlflow_version()} knows (up to {schema_version_of_this_mlflow()}): a newer MLflow "
        "wrote it. Install that MLflow version here, or track elsewhere (MLFLOW_TRACKING_URI)"
    )


def test_a_store_missing_a_newer_table_is_upgraded_by_mlflow_itself(tmp_path: Path) -> None:
    # MLflow 3.17 runs its migrations when one of its tables is missing, and its newest
    # migration adds two (scheduler_leases, job_locks): a store an older MLflow left at an
    # older schema is migrated on first use, and the stage goes on
    uri, version = store_at_schema(tmp_path / "mlflow.db", "downgrade")
    assert version != schema_version_of_this_mlflow()
    tracking.check_reachable(uri, tmp_path)
    assert schema_version(uri) == schema_version_of_this_mlflow()


def test_a_password_in_a_database_uri_is_not_shown() -> None:
    uri = "postgresql+psycopg2://mlflow:s3cret@db.example:5432/mlflow"
    assert tracking._shown(uri) == "postgresql+psycopg2://mlflow:***@db.example:5432/mlflow"
    assert tracking._shown("sqlite:////srv/mlflow.db") == "sqlite:////srv/mlflow.db"


# ---------------------------------------------------------------- the project's own store


@pytest.mark.slow
def test_ui_serves_the_project_store_from_anywhere_inside_the_project(tmp_path: Path) -> None:
    root = tmp_path / "project"
    inside = root / "pipeline"
    (root / ".dvc").mkdir(parents=True)
    inside.mkdir()
    from mlflow import MlflowClient

    experiment = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").create_experiment("ui-test")
    port = free_port()
    log_file = tmp_path / "ui.log"
    command = [sys.executable, "-m", "pipeline.tracking", "ui", "--port", str(port)]
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [*command, "--experiment", "ui-test"],
            cwd=inside,
            env=subprocess_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process, 120, log_file)
    finally:
        stop_process_group(process)
    # the link opens the runs table in the model-training view
    assert tracking.experiment_url(f"http://127.0.0.1:{port}", experiment) in log_file.read_text()
    assert (root / "mlflow.db").is_file()
    assert not (inside / "mlflow.db").exists()


_OPEN_AT = """
import sys, time
from pipeline import tracking
while time.time() < float(sys.argv[1]):
    time.sleep(0.001)
print(tracking.connect("race")[1])
"""


@pytest.mark.slow
def test_processes_opening_a_new_local_store_at_once_all_get_the_same_experiment(
    tmp_path: Path,
) -> None:
    """MLflow's schema creation on a new SQLite file races between processes (four at once
    failed nine times in twelve with "table experiments already exists", "duplicate column
    name" and the like, before the store lock)."""
    (tmp_path / ".dvc").mkdir()
    start = time.time() + 8  # after every process has imported MLflow
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_AT, str(start)],
            cwd=tmp_path,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [process.communicate(timeout=300) for process in processes]
    for process, (_, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err[-2000:]
    assert len({out.strip().splitlines()[-1] for out, _ in results}) == 1


def queue_repo(tmp_path: Path) -> tuple[Path, dict[str, str], list[str]]:
    """A DVC project of the pipeline with tiny params, committed: (repo, env, dvc argv)."""
    repo = tmp_path / "repo"
    shutil.copytree(
        ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    write_params(repo / "params.yaml", tiny_params(**{"mlflow.log_model": False}))
    env = subprocess_env(PYTHONPATH=None, **GIT_IDENTITY)
    dvc = [sys.executable, "-m", "dvc"]
    git(repo, "init", "-q")
    subprocess.run([*dvc, "init", "-q"], cwd=repo, env=env, check=True)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    commit_all(repo)
    return repo, env, dvc


@pytest.mark.slow
def test_two_queued_experiments_on_two_workers_are_two_finished_runs(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    repo, env, dvc = queue_repo(tmp_path)
    assert not (repo / "mlflow.db").exists()  # a fresh clone: the store is made by the runs

    def call(*args: str) -> str:
        done = subprocess.run(
            [*dvc, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
        return done.stdout

    call("exp", "run", "--queue", "-S", "train.learning_rate=0.001,0.0005")
    call("queue", "start", "-j", "2")
    deadline = time.monotonic() + 900
    while "Queued" in (status := call("queue", "status")) or "Running" in status:
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert status.count("Success") == 2, status
    call("queue", "stop", "--kill")

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("facial-emotion-recognition")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.params["train.learning_rate"] for r in runs) == ["0.0005", "0.001"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.data.tags["stage"] == "evaluated" for r in runs)
    assert len({r.info.run_name for r in runs}) == 2


@pytest.mark.slow
def test_dvc_exp_run_temp_lands_in_the_project_store_named_after_the_experiment(
    tmp_path: Path,
) -> None:
    from mlflow import MlflowClient

    repo = tmp_path / "repo"
    shutil.copytree(
        ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    write_params(repo / "params.yaml", tiny_params())
    env = subprocess_env(PYTHONPATH=None, **GIT_IDENTITY)
    dvc = [sys.executable, "-m", "dvc"]
    git(repo, "init", "-q")
    subprocess.run([*dvc, "init", "-q"], cwd=repo, env=env, check=True)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    commit = commit_all(repo)

    done = subprocess.run(
        [*dvc, "exp", "run", "--temp", "--name", "tiny-exp"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]

    assert (repo / "mlflow.db").is_file()
    assert not list((repo / ".dvc").rglob("mlflow.db"))
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    run = only_run(client, "facial-emotion-recognition")
    assert run.info.run_name == "tiny-exp"
    assert run.info.status == "FINISHED"
    assert run.data.tags["dvc.exp_name"] == "tiny-exp"
    assert run.data.tags["stage"] == "evaluated"
    assert run.data.tags["mlflow.source.git.commit"] == commit
    assert "eval_accuracy" in run.data.metrics
    assert run.info.artifact_uri.startswith((repo / "mlartifacts").resolve().as_uri())
    assert list((repo / "mlartifacts").rglob("model.h5"))

    (ref,) = [
        r for r in git(repo, "for-each-ref", "--format=%(refname)").split() if "tiny-exp" in r
    ]
    lock = yaml.safe_load(git(repo, "show", f"{ref}:dvc.lock"))
    (processed,) = [
        out for out in lock["stages"]["preprocess"]["outs"] if out["path"] == "data/processed"
    ]
    assert run.data.tags["data.md5"] == processed["md5"]
