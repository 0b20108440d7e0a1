"""MLflow tracking: each training is one MLflow run, shared by `train` and `evaluate`.

`train` opens a run in the experiment `mlflow.experiment`, named after the DVC
experiment when there is one, logs every param, the tags that say what was
trained on what (git commit, data hash, library versions, precision), one
point per epoch of the training curves, the training reports and the model,
then writes the run id to `models/run.json` and ends the run FINISHED.
`evaluate` reopens that run, adds its metrics and reports, and ends it
FINISHED again. A run that fails ends FAILED; one stopped by Ctrl-C or
SIGTERM ends KILLED. A process killed outright (SIGKILL, the out-of-memory
killer, a lost machine) cannot end its run: the next stage that opens a run on
the same host marks such runs KILLED (`end_abandoned_runs`), so none stays
RUNNING. A stage whose DVC process is killed outright (`dvc queue kill
--force`, `dvc queue stop --kill`) stops as if sent SIGTERM (`sigterm_raises`),
since nothing would record what it goes on to write.

The store is `MLFLOW_TRACKING_URI` when set, else `mlflow.db` and
`mlartifacts/` in the project root, the root of the main checkout even when
DVC runs the stage in a temporary copy (`dvc exp run --temp`, `--queue`).
`python -m pipeline.tracking ui` browses it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.onnx
import numpy as np
import pandas as pd
import psutil
import yaml
from dvc_data.hashfile.build import build
from dvc_data.hashfile.db import HashFileDB
from dvc_objects.fs.local import LocalFileSystem
from filelock import FileLock
from filelock import Timeout as LockTimeout
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature

from pipeline import CLASSES
from pipeline.atomic import write_json_atomic
from pipeline.imageops import read_image
from pipeline.inference import OnnxModel
from pipeline.machine import machine_tags
from pipeline.params import Params, ParamsError, flatten, load_params
from pipeline.paths import PARAMS_FILE, Paths
from pipeline.runtime import resolve_precision
from pipeline.serving import log_pyfunc_model

log = logging.getLogger(__name__)

STORE_DB = "mlflow.db"
LOCK_FILE = "mlflow.db.lock"
LOCK_TIMEOUT_SECONDS = 300  # a schema upgrade of a large store takes a while
ARTIFACTS_DIR = "mlartifacts"
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
EVAL_METRICS = ("accuracy", "loss", "f1_macro", "f1_weighted", "ece", "ece_uncalibrated")
KERAS_MODEL_NAME = "keras_model"
PYFUNC_MODEL_NAME = "emotion_model"
ONNX_MODEL_NAME = "onnx_model"
# the pyfunc image model on the ONNX export: serving it needs no TensorFlow. Not registered:
# the registry's versions are trainings, gated by `promote` on the Keras model's metrics.
ONNX_PYFUNC_MODEL_NAME = "emotion_model_onnx"
PROBE_TIMEOUT_SECONDS = 5
STAGE_TAG = "stage"
# the process that holds a run open, so that a later stage on the same host can tell
# whether it still lives (`end_abandoned_runs`)
HOST_TAG, PID_TAG, PROCESS_STARTED_TAG = "process.host", "process.pid", "process.started"
ABANDONED_TAG = "process.abandoned"
STOPPED_TAG = "process.stopped"  # why a run ended KILLED: the signal, or its DVC process gone
# set by DVC in the environment of every stage command it runs
DVC_STAGE_VARIABLE = "DVC_STAGE"
# what DVC runs a stage's command in ($SHELL -c); the process behind it is DVC's
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "fish", "ksh", "mksh"})
RUNNER_POLL_SECONDS = 1.0
# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces,
# tokens); this value makes it open on the runs table, as for model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the run ends KILLED and outputs stay whole."""

    exit_status = 143  # 128 + SIGTERM, as a shell reports it


@dataclass(frozen=True)
class RunInfo:
    """What `models/run.json` hands from `train` to `evaluate`."""

    run_id: str
    experiment_id: str
    tracking_uri: str


# ---------------------------------------------------------------- the store


def project_root(start: Path | None = None) -> Path:
    """The project's own root, also from inside a DVC experiment's temporary copy.

    DVC sets `DVC_ROOT` for every stage it runs, and points it at the main
    checkout for `dvc exp run --temp` and `--queue`. Outside DVC, walk up to
    the folder holding `.dvc`, stepping out of `<root>/.dvc/tmp/exps/...`.
    """
    env_root = os.environ.get("DVC_ROOT")
    if env_root and Path(env_root).is_dir():
        return Path(env_root).resolve()
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return here


def local_store_uri(root: Path) -> str:
    return f"sqlite:///{(root / STORE_DB).resolve()}"


def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else the SQLite store in `root`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri(root)


def is_remote(uri: str) -> bool:
    """True for an MLflow tracking server (http or https), false for a local store."""
    return uri.startswith(("http://", "https://"))


@contextlib.contextmanager
def _short_http_timeouts() -> Iterator[None]:
    """One attempt with a short timeout, instead of MLflow's minutes of retries."""
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_SECONDS),
    }
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _reason(exc: Exception) -> str:
    """The gist of a connection error ("Connection refused"), else its first line."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text)
    if found:
        return found.group(1).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


USER_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def _refusal(exc: Exception, uri: str) -> str | None:
    """What to do when the server at `uri` answered 401 or 403, else None."""
    status = exc.get_http_status_code() if isinstance(exc, MlflowException) else None
    if status not in (401, 403):
        return None
    user = os.environ.get(USER_VARIABLES[0])
    server = f"the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI)"
    if status == 403:
        return (
            f"{server} does not let the user {user!r} read its experiments (403): ask its "
            "admin for READ or EDIT permission, or log in as another user with "
            + " and ".join(USER_VARIABLES)
        )
    if not user or not os.environ.get(USER_VARIABLES[1]):
        return (
            f"{server} asks for a user (401): set {' and '.join(USER_VARIABLES)} to a user "
            'of that server (for the team stack: eval "$(python -m pipeline.stack env)")'
        )
    return (
        f"{server} refused the user {user!r} (401: wrong password or no such user): check "
        f"{' and '.join(USER_VARIABLES)} (for the team stack: "
        'eval "$(python -m pipeline.stack env)")'
    )


def _shown(uri: str) -> str:
    """`uri` with any password in it masked, as it may be printed."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(uri).render_as_string(hide_password=True)
    except Exception:  # not a database URL: nothing to hide
        return uri


def _known_schema_versions() -> set[str]:
    """The schema versions this MLflow's migrations know, from its own alembic scripts."""
    from alembic.script import ScriptDirectory

    migrations = Path(mlflow.__file__).parent / "store" / "db_migrations"
    return {revision.revision for revision in ScriptDirectory(str(migrations)).walk_revisions()}


def _stale_schema(exc: Exception, uri: str) -> str | None:
    """What to do when the database store at `uri` has another schema version than this
    MLflow's (its `_verify_schema` refuses it), else None."""
    if not isinstance(exc, MlflowException) or "out-of-date database schema" not in str(exc):
        return None
    found = re.search(r"found version (\S+), but expected (\S+?)\)", str(exc))
    store, shown = f"the MLflow store {_shown(uri)}", _shown(uri)
    this = f"MLflow {mlflow.__version__}"
    if not found:
        return f"{store} has another schema than {this} expects: run mlflow db upgrade {shown}"
    version, expected = found.groups()
    try:
        newer = version not in _known_schema_versions()
    except Exception:  # cannot tell: say what helps the usual case, an older store
        newer = False
    if newer:
        return (
            f"{store} has a newer schema (version {version}) than {this} knows (up to "
            f"{expected}): a newer MLflow wrote it. Install that MLflow version here, or "
            "track elsewhere (MLFLOW_TRACKING_URI)"
        )
    return (
        f"{store} has an older schema (version {version}) than {this} needs "
        f"({expected}): back it up, then run mlflow db upgrade {shown}"
    )


def check_reachable(uri: str, root: Path) -> None:
    """Fail fast, before any training, when the store at `uri` cannot be used: not
    reachable, refusing the user in `MLFLOW_TRACKING_USERNAME`/`_PASSWORD`, or a database
    at another schema version than this MLflow's."""
    try:
        with _short_http_timeouts():
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:
        refusal = _refusal(exc, uri) if is_remote(uri) else None
        if refusal:
            raise TrackingError(refusal) from None
        stale = None if is_remote(uri) else _stale_schema(exc, uri)
        if stale:
            raise TrackingError(stale) from None
        if is_remote(uri):
            raise TrackingError(
                f"the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) is not reachable: "
                f"{_reason(exc)}. Start it (mlflow server --host 127.0.0.1 --port 5000), "
                "or unset MLFLOW_TRACKING_URI to track in the project's local store "
                f"{root / STORE_DB}"
            ) from None
        raise TrackingError(f"cannot open the MLflow store {uri}: {_reason(exc)}") from None


def _artifact_location(root: Path, experiment: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", experiment).strip("-") or "default"
    return (root / ARTIFACTS_DIR / slug).resolve().as_uri()


def open_experiment(name: str, uri: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created on first use with `artifact_location`."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location, tags=EXPERIMENT_KIND
            )
        except MlflowException:  # created meanwhile by a parallel run
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"the MLflow experiment {name!r} in {uri} is deleted; restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) "
            "or choose another name in params.yaml mlflow.experiment"
        )
    for key, value in EXPERIMENT_KIND.items():  # an experiment made by an older version
        if key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def local_store_lock(root: Path) -> FileLock:
    """Held while a process opens the project's SQLite store: MLflow creates and upgrades
    its schema on first use, and two processes doing so at once (`dvc queue start -j 2`
    on a fresh clone) fail with "table experiments already exists" and the like."""
    return FileLock(root / LOCK_FILE, timeout=LOCK_TIMEOUT_SECONDS)


def connect(experiment: str) -> tuple[str, str]:
    """Point MLflow at the project's store, check it answers, return (uri, experiment id)."""
    root = project_root()
    uri = tracking_uri(root)
    local = uri == local_store_uri(root)
    try:
        with local_store_lock(root) if local else contextlib.nullcontext():
            check_reachable(uri, root)
            # in the local store, artifacts go beside it; elsewhere the store decides
            location = _artifact_location(root, experiment) if local else None
            mlflow.set_tracking_uri(uri)  # (which also sets MLFLOW_TRACKING_URI)
            return uri, open_experiment(experiment, uri, location)
    except LockTimeout:
        raise TrackingError(
            f"another process has been opening the MLflow store {uri} for over "
            f"{LOCK_TIMEOUT_SECONDS} s (it holds {root / LOCK_FILE}); wait for it, or stop it"
        ) from None


# ---------------------------------------------------------------- what a run records


def run_name(params: Params) -> str:
    """The DVC experiment's name during `dvc exp run`, else the architecture and the time."""
    return os.environ.get("DVC_EXP_NAME") or f"{params.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}"


def _git(cwd: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_tags(paths: Paths) -> dict[str, str]:
    """The commit checked out, and whether code, params or other inputs differ from it.

    The pipeline's own outputs (data, models, reports, `dvc.lock`) are left out:
    a stage rewriting them does not make the run's inputs dirty.
    """
    root = paths.root.resolve()
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return {}
    outputs = (paths.processed.parent, paths.models, paths.reports, paths.root / "dvc.lock")
    excluded = [f":(exclude){path.relative_to(paths.root).as_posix()}" for path in outputs]
    status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded)
    return {
        "mlflow.source.git.commit": commit,
        "git.dirty": "unknown" if status is None else str(bool(status)).lower(),
    }


def _locked_md5(lock_file: Path, out: str) -> str | None:
    try:
        with lock_file.open(encoding="utf-8") as fh:
            lock = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError):
        return None
    for stage in (lock.get("stages") or {}).values():
        for entry in stage.get("outs") or []:
            if entry.get("path") == out and entry.get("md5"):
                return str(entry["md5"])
    return None


def _computed_md5(folder: Path) -> str:
    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(HashFileDB(fs, scratch), str(folder.resolve()), fs, "md5", dry_run=True)
    return obj.hash_info.value


def data_md5(paths: Paths) -> str | None:
    """DVC's md5 of `data/processed`, as `dvc.lock` records it.

    Inside a DVC stage (`DVC_STAGE` set), DVC has just checked that the data
    matches `dvc.lock`, so the lock's entry is read. Elsewhere the lock may be
    stale, and the hash is computed the way DVC does.
    """
    out = paths.processed.relative_to(paths.root).as_posix()
    if os.environ.get("DVC_STAGE"):
        locked = _locked_md5(paths.root / "dvc.lock", out)
        if locked:
            return locked
    try:
        return _computed_md5(paths.processed)
    except Exception as exc:  # a missing hash must not cost a training
        log.warning("cannot hash %s for the run's tags: %s", paths.processed, exc)
        return None


def run_tags(params: Params, paths: Paths, md5: str | None) -> dict[str, str]:
    import keras  # Keras and TensorFlow: only once a stage has checked its params
    import tensorflow as tf

    tags = {
        **git_tags(paths),
        **machine_tags(),
        "tensorflow.version": tf.__version__,
        "keras.version": keras.__version__,
        "precision": resolve_precision(params.train.precision),
    }
    if md5:
        tags["data.md5"] = md5
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.baseline")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def dataset_name(params: Params) -> str:
    """What the processed data was made from: `embedded-sample`, the Kaggle slug, the
    archive's or the folder's name."""
    data = params.data
    return {
        "sample": "embedded-sample",
        "kaggle": data.kaggle_dataset,
        "archive": Path(data.archive or "archive").name,
        "directory": Path(data.directory or "directory").name,
    }[data.source]


def log_dataset(params: Params, paths: Paths, digest: str | None) -> None:
    """`data/processed` as the run's dataset input, with DVC's hash as its digest, so the
    runs table's Dataset column says what each model learned from."""
    with warnings.catch_warnings():  # two equal local sources registered (mlflow's own doing)
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(paths.processed.resolve()))
    dataset = MetaDataset(source, name=dataset_name(params), digest=digest)
    mlflow.log_input(dataset, context="training", tags={"data.source": params.data.source})


def _param_values(params: Params) -> dict[str, str]:
    return {key: str(value) for key, value in flatten(params).items()}


def record_inputs(params: Params, paths: Paths, **extra_tags: str) -> None:
    """What a new run was made from: every param, the tags, and the dataset input."""
    mlflow.log_params(_param_values(params))
    md5 = data_md5(paths)
    mlflow.set_tags({**run_tags(params, paths, md5), **extra_tags})
    log_dataset(params, paths, md5)


def epoch_logger():
    """A Keras callback logging loss, accuracy, val_loss, val_accuracy and lr, step = epoch.

    Epochs count from 1, as in `reports/history.csv`; `lr` is the rate the epoch used,
    as the learning-rate callbacks put it in the logs (`learning_rate`).

    When the tracking server stays away past the client's retries, the training goes
    on: that epoch's and the later epochs' points wait in `unlogged` (one wait for the
    server, not one an epoch), and `send_unlogged` tries them again at the end.
    """
    import keras

    class EpochLogger(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.unlogged: dict[int, dict[str, float]] = {}

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            values = {k: float(v) for k, v in logs.items() if k in EPOCH_METRICS}
            if "learning_rate" in logs:
                values["lr"] = float(logs["learning_rate"])
            step = epoch + 1
            if self.unlogged:
                self.unlogged[step] = values
                return
            try:
                mlflow.log_metrics(values, step=step)
            except MlflowException as exc:
                log.warning(
                    "MLflow did not take epoch %d's metrics (%s); the training goes on, and "
                    "they are sent again when it ends",
                    step,
                    _reason(exc),
                )
                self.unlogged[step] = values

        def send_unlogged(self) -> None:
            for step in sorted(self.unlogged):
                mlflow.log_metrics(self.unlogged[step], step=step)
                del self.unlogged[step]

    return EpochLogger()


def _log_file(path: Path, root: Path) -> None:
    """Log `path` under the same folder as in the project (`reports/figures/...`)."""
    if not path.is_file():
        log.warning("%s: missing, not logged to MLflow", path)
        return
    folder = path.relative_to(root).parent.as_posix()
    mlflow.log_artifact(str(path), artifact_path=None if folder == "." else folder)


def _input_example(paths: Paths, count: int = 2):
    """A few validation images as the model takes them: float32 [n, size, size, 1] in [0, 255]."""
    files = sorted((paths.processed / "validation").glob("*/*.png"))[:count]
    return np.stack([read_image(f)[..., None] for f in files]).astype("float32")


def _save_keras_model(path: str, **kwargs: Any) -> None:
    """`mlflow.keras.save_model`, with the model folder made first: MLflow writes the input
    example before it creates the folder (mlflow/mlflow#16183, still open in MLflow 3)."""
    import mlflow.keras  # imports Keras, and so TensorFlow: not before the params are good

    Path(path).mkdir(parents=True, exist_ok=True)
    mlflow.keras.save_model(path=path, **kwargs)


def log_models(params: Params, paths: Paths) -> None:
    """`model.h5` in MLflow's Keras 3 flavour, and as the pyfunc image model for serving."""
    import keras
    import tensorflow as tf

    model = keras.models.load_model(paths.model, compile=False)
    example = _input_example(paths)
    # what `mlflow.keras.log_model` does, through the fixed save above
    Model.log(
        artifact_path=None,
        name=KERAS_MODEL_NAME,
        flavor=types.SimpleNamespace(__name__="mlflow.keras", save_model=_save_keras_model),
        model=model,
        signature=infer_signature(example, model.predict(example, verbose=0)),
        input_example=example,
        pip_requirements=[f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}"],
    )
    log_pyfunc_model(
        paths.model,
        artifact_path=PYFUNC_MODEL_NAME,
        registered_model_name=params.mlflow.registered_model,
    )


def log_training_outputs(params: Params, paths: Paths) -> None:
    for path in (
        paths.model,
        paths.model_summary,
        paths.history,
        paths.training_curves,
        paths.data_report,
    ):
        _log_file(path, paths.root)
    if params.mlflow.log_model:
        log_models(params, paths)


def log_training_summary(
    seconds: float,
    images_per_second: float,
    temperature: float,
    ensemble_val_accuracy: float | None = None,
) -> None:
    """How long `model.fit` took (`train_seconds`), its `train_images_per_second`, the
    `temperature` stored with the model (1 without `train.temperature_scaling`), and with
    `train.snapshots`, the validation accuracy of the snapshots' average in model.h5
    (`snapshot_ensemble_val_accuracy`; no TTA)."""
    metrics = {
        "train_seconds": seconds,
        "train_images_per_second": images_per_second,
        "temperature": temperature,
    }
    if ensemble_val_accuracy is not None:
        metrics["snapshot_ensemble_val_accuracy"] = ensemble_val_accuracy
    mlflow.log_metrics(metrics)


def log_history(history_csv: Path) -> None:
    """The per-epoch curves from `history.csv`, for a run that did not watch the training."""
    for row in pd.read_csv(history_csv).to_dict("records"):
        values = {k: float(row[k]) for k in (*EPOCH_METRICS, "lr")}
        mlflow.log_metrics(values, step=int(row["epoch"]))


def evaluation_metrics(metrics: dict) -> dict[str, float]:
    """`metrics.json` as MLflow metrics: `eval_accuracy`, ..., `eval_f1_<class>`, `best_epoch`
    for the validation split, and `test_accuracy`, ..., `test_f1_<class>` for the test split.

    The `eval_` prefix keeps them apart from the per-epoch `loss` and `accuracy` curves.
    """
    flat = {"best_epoch": float(metrics["best_epoch"])}
    for prefix, scores in (("eval", metrics), ("test", metrics.get("test"))):
        if scores is None:
            continue
        flat.update({f"{prefix}_{key}": float(scores[key]) for key in EVAL_METRICS})
        flat.update(
            {f"{prefix}_f1_{name}": float(scores["per_class"][name]["f1"]) for name in CLASSES}
        )
    return flat


def log_evaluation(metrics: dict, paths: Paths) -> None:
    mlflow.log_metrics(evaluation_metrics(metrics))
    figures = (paths.confusion_figure, paths.confusion_test_figure, paths.reliability_figure)
    for path in (paths.classification_report, *figures):
        if path.exists():
            _log_file(path, paths.root)


# ---------------------------------------------------------------- run life cycle


def stage_runner() -> psutil.Process | None:
    """The DVC process running this stage (`dvc repro`, `dvc exp run`, a queue's
    `dvc exp exec-run`): the nearest ancestor that is not the shell DVC runs the command
    in. None outside DVC, where a parent that ends (a closed terminal, `nohup`) is no
    reason to stop."""
    if DVC_STAGE_VARIABLE not in os.environ:
        return None
    try:
        for parent in psutil.Process().parents():
            if parent.name() not in SHELLS:
                return parent
    except psutil.Error:
        pass
    return None


def _ended(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        return "dvc"


def _watch(runner: psutil.Process, command: str, stop: threading.Event, why: list[str]) -> None:
    """SIGTERM this process once `runner` (`command`) has ended (checked every second),
    saying why."""
    while not stop.wait(RUNNER_POLL_SECONDS):
        if _ended(runner):
            why.append(
                f"the DVC process that ran this stage (pid {runner.pid}: {command}) ended, "
                "so nothing would record what this stage goes on to write"
            )
            os.kill(os.getpid(), signal.SIGTERM)
            return


@contextlib.contextmanager
def sigterm_raises(runner: psutil.Process | None = None) -> Iterator[None]:
    """Turn SIGTERM into `Terminated` (once; a second SIGTERM kills as usual), and raise
    it as well when `runner`, by default the DVC process running this stage
    (`stage_runner`), ends before the stage does: DVC's `queue kill --force` and
    `queue stop --kill` SIGKILL that process alone, and the stage would train on,
    orphaned, in a workspace DVC has deleted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    why: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, previous)
        raise Terminated(why[0] if why else signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    runner = runner or stage_runner()
    stop = threading.Event()
    if runner is not None:
        watch = (runner, _command(runner), stop, why)  # its command while it still runs
        threading.Thread(target=_watch, args=watch, daemon=True).start()
    try:
        yield
    finally:
        stop.set()
        signal.signal(signal.SIGTERM, previous)


def process_tags() -> dict[str, str]:
    """The tags naming this process: host, pid and start time (a pid alone can be reused)."""
    me = psutil.Process()
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(me.pid),
        PROCESS_STARTED_TAG: f"{me.create_time():.3f}",
    }


def _process_lives(pid: str | None, started: str | None) -> bool:
    """Whether the process of these tags still runs on this host; True when unsure."""
    try:
        process = psutil.Process(int(pid))
        return (
            abs(process.create_time() - float(started)) < 1.0
            and process.status() != psutil.STATUS_ZOMBIE
        )
    except (TypeError, ValueError):
        return True  # tags this module did not write: not ours to judge
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # e.g. another user's process: it exists


def end_abandoned_runs(experiment_id: str) -> list[str]:
    """End KILLED the runs of the experiment that a process of this host left RUNNING and
    that process is gone: killed outright (SIGKILL, the out-of-memory killer) it could not
    end them itself. Runs of other hosts are left alone (their processes cannot be seen
    from here), like those of processes that still run. Returns the ids it ended."""
    client = MlflowClient()
    host = socket.gethostname()
    quoted = host.replace("'", "\\'")
    found = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{quoted}'",
    )
    ended = []
    for run in found:
        pid, started = run.data.tags.get(PID_TAG), run.data.tags.get(PROCESS_STARTED_TAG)
        if _process_lives(pid, started):
            continue
        why = f"process {pid} on {host}, which held the run open, ended without ending it"
        client.set_tag(run.info.run_id, ABANDONED_TAG, why)
        client.set_terminated(run.info.run_id, "KILLED")
        log.warning("MLflow run %s (%s) ended KILLED: %s", run.info.run_name, run.info.run_id, why)
        ended.append(run.info.run_id)
    return ended


def start_run(experiment_id: str, run_id: str | None = None, **kwargs: Any) -> mlflow.ActiveRun:
    """A new run in the experiment, or run `run_id` of it reopened, tagged with this process,
    after ending the experiment's runs whose process is gone (housekeeping: when the store
    refuses it, a warning says so and the stage goes on)."""
    try:
        end_abandoned_runs(experiment_id)
    except MlflowException as exc:
        log.warning("could not look for runs left RUNNING by killed processes: %s", _reason(exc))
    if run_id is None:
        run = mlflow.start_run(experiment_id=experiment_id, **kwargs)
    else:
        run = mlflow.start_run(run_id=run_id, **kwargs)
    mlflow.set_tags(process_tags())
    return run


@contextlib.contextmanager
def ending_run() -> Iterator[None]:
    """End the active run FINISHED, or KILLED on Ctrl-C or SIGTERM, or FAILED on an error."""
    try:
        yield
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        if status == "KILLED" and mlflow.active_run() is not None:
            with contextlib.suppress(Exception):  # ending it matters more than saying why
                mlflow.set_tag(STOPPED_TAG, str(exc) or "SIGINT")
        try:
            mlflow.end_run(status)
        except Exception as end_exc:
            log.warning("could not mark the MLflow run %s: %s", status, _reason(end_exc))
        raise
    mlflow.end_run("FINISHED")


def write_run_info(path: Path, info: RunInfo) -> None:
    write_json_atomic(path, info.__dict__)


def read_run_info(path: Path) -> RunInfo | None:
    try:
        return RunInfo(**json.loads(Path(path).read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        log.warning("%s: unreadable (%s)", path, exc)
        return None


def _steps(steps: list[int]) -> str:
    """[2, 3, 4, 7] as "2-4, 7"."""
    spans: list[list[int]] = []
    for step in sorted(steps):
        if spans and step == spans[-1][-1] + 1:
            spans[-1].append(step)
        else:
            spans.append([step])
    return ", ".join(f"{s[0]}-{s[-1]}" if len(s) > 1 else f"{s[0]}" for s in spans)


def lost_run_message(
    run_id: str, uri: str, unlogged: dict[int, dict], exc: Exception, paths: Paths
) -> str:
    """Which run lost what, when the store failed it after the training."""
    lost = "its summary metrics, model and reports"
    if unlogged:
        lost = f"epochs {_steps(list(unlogged))} of its curves, and {lost}"
    kept = (
        f"The training itself is whole ({paths.model}, {paths.history}); run"
        if paths.history.is_file()
        else "Run"
    )
    return (
        f"the MLflow store {_shown(uri)} failed ({_reason(exc)}): run {run_id} "
        f"lacks {lost}. {kept} the stage again once the store answers"
    )


@contextlib.contextmanager
def training_run(params: Params, paths: Paths) -> Iterator[list]:
    """A new MLflow run around a training; yields the Keras callbacks that log its epochs.

    Before: params, tags (commit, data hash, CPU, versions) and the dataset. After the
    training: its reports and model, and `models/run.json` naming the run for
    `evaluate`. The run ends FINISHED, FAILED or KILLED (`ending_run`).
    """
    uri, experiment_id = connect(params.mlflow.experiment)
    with sigterm_raises(), ending_run():
        run = start_run(experiment_id, run_name=run_name(params), log_system_metrics=True)
        log.info("MLflow run %s (%s) in %s", run.info.run_name, run.info.run_id, uri)
        record_inputs(params, paths, **{STAGE_TAG: "training"})
        logger = epoch_logger()
        try:
            yield [logger]  # the stage logs its summary metrics before it comes back
            logger.send_unlogged()
            log_training_outputs(params, paths)
        except MlflowException as exc:
            raise TrackingError(
                lost_run_message(run.info.run_id, uri, logger.unlogged, exc, paths)
            ) from None
        write_run_info(paths.run_info, RunInfo(run.info.run_id, experiment_id, uri))
        mlflow.set_tag(STAGE_TAG, "trained")


def _training_run(info: RunInfo | None, uri: str, run_info: Path):
    """The run `run_info` names in the store at `uri`, and None; or None and why there is
    no usable one."""
    if info is None:
        return None, f"{run_info} names no MLflow run"
    try:
        run = MlflowClient(tracking_uri=uri).get_run(info.run_id)
    except MlflowException:
        return None, (
            f"run {info.run_id} of {run_info} is not in {uri} "
            f"(it was tracked in {info.tracking_uri})"
        )
    if run.info.lifecycle_stage == "deleted":
        return None, f"run {info.run_id} of {run_info} is deleted"
    return run, None


def _resumable(info: RunInfo | None, params: Params, uri: str, run_info: Path) -> str | None:
    """Why the training run cannot take this evaluation, or None when it can."""
    run, why_not = _training_run(info, uri, run_info)
    if why_not:
        return why_not
    # a change in any other group reruns `train`, which opens a new run
    changed = sorted(
        key
        for key, value in _param_values(params).items()
        if key.startswith("evaluate.") and run.data.params.get(key, value) != value
    )
    if changed:
        return f"run {info.run_id} was evaluated with other params ({', '.join(changed)})"
    return None


@contextlib.contextmanager
def evaluation_run(params: Params, paths: Paths) -> Iterator[None]:
    """The training's MLflow run reopened around an evaluation, ended FINISHED again.

    When that run cannot take it (it is in another store, deleted, or holds
    other values of the `evaluate` params, as after `dvc exp run -S
    evaluate.tta=true`), the evaluation goes to a new run that also gets the training's record from
    the files: params, tags, curves from `history.csv`, reports and model.
    """
    uri, experiment_id = connect(params.mlflow.experiment)
    info = read_run_info(paths.run_info)
    why_not = _resumable(info, params, uri, paths.run_info)
    with sigterm_raises(), ending_run():
        if why_not is None:
            run = start_run(experiment_id, run_id=info.run_id)
        else:
            log.warning("%s: logging this evaluation to a new MLflow run", why_not)
            run = start_run(experiment_id, run_name=run_name(params))
            record_inputs(params, paths, **{"mlflow.note.content": why_not})
            if info is not None:
                mlflow.set_tag("train_run_id", info.run_id)
            log_history(paths.history)
            log_training_outputs(params, paths)
        log.info("MLflow run %s (%s) in %s", run.info.run_name, run.info.run_id, uri)
        yield
        mlflow.set_tag(STAGE_TAG, "evaluated")


@contextlib.contextmanager
def export_run(params: Params, paths: Paths) -> Iterator[bool]:
    """The training's MLflow run reopened around an export, ended FINISHED again; yields
    False, with a warning and no run, when `models/run.json` names none in the store."""
    uri, experiment_id = connect(params.mlflow.experiment)
    info = read_run_info(paths.run_info)
    _, why_not = _training_run(info, uri, paths.run_info)
    if why_not:
        log.warning("%s: the exported models are not logged to MLflow", why_not)
        yield False
        return
    with sigterm_raises(), ending_run():
        run = start_run(experiment_id, run_id=info.run_id)
        log.info("MLflow run %s (%s) in %s", run.info.run_name, run.info.run_id, uri)
        yield True


def log_exports(paths: Paths) -> None:
    """The ONNX and LiteRT files and their check, and the ONNX file as two MLflow models: in
    MLflow's ONNX flavour (tensors in, probabilities out) and as the pyfunc image model."""
    import onnx  # here: only the export stage needs it

    for path in (paths.onnx_model, paths.litert_model, paths.export_report):
        _log_file(path, paths.root)
    example = _input_example(paths)
    session = OnnxModel(paths.onnx_model)
    mlflow.onnx.log_model(
        onnx.load(str(paths.onnx_model)),
        name=ONNX_MODEL_NAME,
        signature=infer_signature(example, session.predict_on_batch(example)),
        input_example=example,
    )
    log_pyfunc_model(paths.onnx_model, artifact_path=ONNX_PYFUNC_MODEL_NAME)


# ---------------------------------------------------------------- `ui`


def experiment_url(base: str, experiment_id: str) -> str:
    """The runs table of an experiment in MLflow's UI, in its model-training view (MLflow 3
    opens in its GenAI view, whatever the experiment is, unless the link asks)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _experiment_id(uri: str, experiment: str) -> str | None:
    try:
        with _short_http_timeouts():
            found = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    except Exception:  # the UI still starts; it just opens on its home page
        return None
    return found.experiment_id if found else None


def ui_command(uri: str, root: Path, host: str, port: int) -> list[str]:
    """`mlflow ui` on the local store `uri`, with the project's artifacts folder."""
    return [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", uri,
        "--artifacts-destination", str(root / ARTIFACTS_DIR),
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip


def ui(host: str, port: int, experiment: str | None = None) -> int:
    """Run `mlflow ui` on the project's store until Ctrl-C; print the link to the runs of
    `experiment` (default: the project's `mlflow.experiment`)."""
    root = project_root()
    uri = tracking_uri(root)
    if experiment is None:
        with contextlib.suppress(OSError, ParamsError):  # then the UI opens on its home page
            experiment = load_params(root / PARAMS_FILE).mlflow.experiment
    found = _experiment_id(uri, experiment) if experiment else None
    if is_remote(uri):
        where = experiment_url(uri, found) if found else uri
        print(f"runs are tracked on the server {uri} (MLFLOW_TRACKING_URI): open {where}")
        return 0
    command = ui_command(uri, root, host, port)
    base = f"http://{host}:{port}"
    where = experiment_url(base, found) if found else base
    print(f"MLflow UI for {uri}: {where} (Ctrl-C stops it)", flush=True)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tracking",
        description="The project's MLflow store (mlflow.db and mlartifacts/ in the root).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    ui_parser = commands.add_parser("ui", help="browse the runs with `mlflow ui`")
    ui_parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    ui_parser.add_argument("--port", type=int, default=5000, help="port to listen on")
    ui_parser.add_argument(
        "--experiment",
        help="the experiment whose runs to link to (default: params.yaml mlflow.experiment)",
    )
    args = parser.parse_args(argv)
    return ui(args.host, args.port, args.experiment)


if __name__ == "__main__":
    sys.exit(main())
