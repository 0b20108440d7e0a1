"""`python -m pipeline.promote` against a real MLflow server's registry on loopback."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import subprocess_env, tiny_params, write_params

from pipeline import CLASSES
from pipeline.promote import run_metrics


def test_run_metrics_take_the_shape_the_gate_names_address() -> None:
    metrics = {"eval_accuracy": 0.9, "eval_f1_macro": 0.8, "eval_f1_disgust": 0.1, "loss": 1.0}

    shaped = run_metrics(metrics)

    assert shaped == {"accuracy": 0.9, "f1_macro": 0.8, "per_class": {"disgust": {"f1": 0.1}}}
    assert "disgust" in CLASSES


def register(client, name: str, metrics: dict[str, float]) -> str:
    """A finished run with these metrics, registered as a new version of `name`."""
    experiment = client.get_experiment_by_name("promote-test")
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment("promote-test")
    )
    run = client.create_run(experiment_id)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    source = f"runs:/{run.info.run_id}/emotion_model"
    return client.create_model_version(name, source, run_id=run.info.run_id).version


def promote(project: Path, uri: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.promote", *args],
        cwd=project,
        env=subprocess_env(MLFLOW_TRACKING_URI=uri),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_champion_moves_only_to_a_version_that_passes_the_gate(
    mlflow_server: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    name = f"fer-{uuid.uuid4().hex[:8]}"
    (tmp_path / ".dvc").mkdir()
    params = tiny_params(**{"mlflow.registered_model": name})
    assert params.gate.tolerances == {"accuracy": 0.03, "f1_macro": 0.05}
    write_params(tmp_path / "params.yaml", params)
    client = MlflowClient(mlflow_server)

    def champion() -> str:
        return client.get_model_version_by_alias(name, "champion").version

    first = register(client, name, {"eval_accuracy": 0.80, "eval_f1_macro": 0.60})
    done = promote(tmp_path, mlflow_server)
    assert done.returncode == 0, done.stderr
    assert f"{name} version {first} is now @champion: no champion yet" in done.stdout
    assert champion() == first

    # 0.01 less accuracy is within its tolerance of 0.03: the gate passes, the alias moves
    second = register(client, name, {"eval_accuracy": 0.79, "eval_f1_macro": 0.62})
    done = promote(tmp_path, mlflow_server)
    assert done.returncode == 0, done.stderr
    assert f"passes the gate against champion version {first}" in done.stdout
    assert champion() == second

    third = register(client, name, {"eval_accuracy": 0.70, "eval_f1_macro": 0.65})
    dry = promote(tmp_path, mlflow_server, "--dry-run")
    assert dry.returncode == 1 and "would get @challenger" in dry.stdout
    assert not client.get_model_version(name, third).aliases
    done = promote(tmp_path, mlflow_server)
    assert done.returncode == 1, done.stderr
    assert "REGRESSION" in done.stdout and "accuracy 0.7900 -> 0.7000" in done.stdout
    assert f"{name} version {third} is now @challenger" in done.stdout
    assert champion() == second
    assert client.get_model_version_by_alias(name, "challenger").version == third
    tags = client.get_model_version(name, third).tags
    assert tags["gate.verdict"] == "challenger" and tags["gate.baseline_version"] == second

    done = promote(tmp_path, mlflow_server, "--version", second)
    assert done.returncode == 0 and "already the champion" in done.stdout

    unevaluated = register(client, name, {})
    done = promote(tmp_path, mlflow_server)
    assert done.returncode == 2
    assert f"version {unevaluated}" in done.stderr and "run the evaluate stage" in done.stderr
    assert champion() == second and not client.get_model_version(name, unevaluated).aliases


@pytest.mark.slow
def test_without_a_registered_model_it_says_what_to_set(mlflow_server: str, tmp_path: Path) -> None:
    (tmp_path / ".dvc").mkdir()
    write_params(tmp_path / "params.yaml", tiny_params(**{"mlflow.registered_model": None}))

    done = promote(tmp_path, mlflow_server)

    assert done.returncode == 2
    assert "mlflow.registered_model" in done.stderr and "Traceback" not in done.stderr
