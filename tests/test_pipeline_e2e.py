"""The whole pipeline under DVC, in a scratch git repository: `dvc repro` runs the four
stages, DVC reads their metrics and plots, a second `dvc repro` has nothing to do, and
`dvc exp run -S` makes an experiment that `dvc exp show` and the diffs report. MLflow
tracks into the repository's own store (no MLFLOW_TRACKING_URI)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import GIT_IDENTITY, ROOT, subprocess_env, tiny_params, write_params
from PIL import Image

from pipeline.paths import Paths

STAGES = ["download", "preprocess", "train", "evaluate", "export"]
# files DVC caches, and the MLflow store: never for git
NOT_FOR_GIT = ("data/raw", "data/processed", "models/model.", "models/run.json", "mlflow.db")


def environment(repo: Path) -> dict[str, str]:
    """The copied pipeline importable, no MLflow URI, and git with no identity but the
    variables' (an empty home: neither git nor DVC's own git library sees ~/.gitconfig)."""
    home = repo.parent / "home"
    home.mkdir(exist_ok=True)
    return subprocess_env(
        PYTHONPATH=str(repo),
        HOME=str(home),
        XDG_CONFIG_HOME=None,
        GIT_CONFIG_NOSYSTEM="1",
        DVC_NO_ANALYTICS="1",
        **GIT_IDENTITY,
    )


def execute(repo: Path, *command: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command,
        cwd=repo,
        env=environment(repo),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"{' '.join(command)}:\n{(done.stdout + done.stderr)[-5000:]}"
    return done


def run(repo: Path, *command: str) -> str:
    done = execute(repo, *command)
    return done.stdout + done.stderr


def run_json(repo: Path, *command: str):
    return json.loads(execute(repo, *command).stdout)


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def make_repo(repo: Path) -> Path:
    """The project's pipeline code and DVC files, tiny params, one commit."""
    shutil.copytree(
        ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("dvc.yaml", "pyproject.toml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    (repo / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    (repo / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    params = tiny_params(
        **{"train.epochs": 2, "train.batch_size": 16, "train.bn_recalibration_batches": 2}
    )
    write_params(repo / "params.yaml", params)
    run(repo, "git", "init", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "pipeline")
    return repo


def mlflow_runs(repo: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("facial-emotion-recognition")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])


@pytest.mark.slow
def test_dvc_repro_then_an_experiment(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    paths = Paths(repo)

    # ------------------------------------------------ the whole pipeline, once
    output = run(repo, "dvc", "repro")
    assert stages_run(output) == STAGES
    assert set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == set(STAGES)
    for path in (
        paths.model,
        paths.run_info,
        paths.model_summary,
        paths.history,
        paths.training_curves,
        paths.metrics,
        paths.classification_report,
        paths.classification_report_csv,
        paths.confusion_csv,
        paths.confusion_figure,
        paths.samples_figure,
    ):
        assert path.is_file() and path.stat().st_size > 0, path
    metrics = json.loads(paths.metrics.read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["best_epoch"] in (1, 2)
    assert len(paths.history.read_text().splitlines()) == 1 + 2  # header, two epochs
    assert len(paths.confusion_csv.read_text().splitlines()) == 1 + 70
    assert f"Validation Accuracy : {metrics['accuracy']:.2f}" in output

    shown = run_json(repo, "dvc", "metrics", "show", "--json")
    (workspace,) = shown.values()
    assert workspace["data"]["reports/metrics.json"]["data"] == metrics

    plots = run_json(repo, "dvc", "plots", "show", "--json", "-o", str(tmp_path / "plots"))
    assert not plots.get("errors")
    rendered = plots["data"]
    for name in ("Loss", "Accuracy", "Learning rate", "Confusion matrix"):
        (plot,) = rendered[name]
        assert plot["type"] == "vega", name
    loss = rendered["Loss"][0]["content"]["data"]["values"]
    assert sorted((row["field"], row["epoch"]) for row in loss) == [
        ("loss", "1"),
        ("loss", "2"),
        ("val_loss", "1"),
        ("val_loss", "2"),
    ]
    confusion = rendered["Confusion matrix"][0]["content"]
    assert len(confusion["data"]["values"]) == 70
    assert "xy_count" in json.dumps(confusion["spec"])  # the confusion template
    for figure in ("training_curves", "confusion_matrix", "samples"):
        (plot,) = rendered[f"reports/figures/{figure}.png"]
        with Image.open(plot["url"]) as image:
            assert image.width > 100, figure

    (tracked,) = mlflow_runs(repo)
    assert tracked.info.status == "FINISHED"
    assert tracked.data.tags["stage"] == "evaluated"
    assert tracked.data.params["train.learning_rate"] == "0.001"
    for key in ("accuracy", "loss", "f1_macro", "f1_weighted"):
        assert tracked.data.metrics[f"eval_{key}"] == pytest.approx(metrics[key])
    assert json.loads(paths.run_info.read_text())["run_id"] == tracked.info.run_id

    # ------------------------------------------------ nothing changed, nothing runs
    model_bytes = paths.model.read_bytes()
    again = run(repo, "dvc", "repro")
    assert stages_run(again) == []
    assert "Data and pipelines are up to date." in again
    assert paths.model.read_bytes() == model_bytes

    status = run(repo, "git", "status", "--porcelain", "--untracked-files=all")
    changed = [line[3:] for line in status.splitlines()]
    assert "dvc.lock" in changed
    assert "reports/metrics.json" in changed  # metrics and plots live in git
    assert not [p for p in changed if p.startswith(NOT_FOR_GIT)], changed
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "results")

    # ------------------------------------------------ an experiment with one param changed
    experiment = run(repo, "dvc", "exp", "run", "-S", "train.learning_rate=0.0005")
    assert stages_run(experiment) == ["train", "evaluate", "export"]
    assert "Stage 'preprocess' didn't change, skipping" in experiment
    (name,) = re.findall(r"Ran experiment\(s\): (\S+)", experiment)
    new_metrics = json.loads(paths.metrics.read_text())

    table = run_json(repo, "dvc", "exp", "show", "--json")
    (baseline,) = [row for row in table if row.get("experiments")]
    (exp,) = baseline["experiments"]
    assert exp["name"] == name
    (exp_rev,) = exp["revs"]
    for row, rate, expected in ((baseline, 0.001, metrics), (exp_rev, 0.0005, new_metrics)):
        data = row["data"]
        assert data["params"]["params.yaml"]["data"]["train"]["learning_rate"] == rate
        assert data["metrics"]["reports/metrics.json"]["data"] == expected

    params_diff = run_json(repo, "dvc", "params", "diff", "--json")
    assert params_diff == {
        "params.yaml": {
            "train.learning_rate": {"old": 0.001, "new": 0.0005, "diff": pytest.approx(-0.0005)}
        }
    }
    metrics_diff = run_json(repo, "dvc", "metrics", "diff", "--json")["reports/metrics.json"]
    assert metrics_diff["loss"]["old"] == metrics["loss"]
    assert metrics_diff["loss"]["new"] == new_metrics["loss"] != metrics["loss"]

    first, second = mlflow_runs(repo)
    assert first.info.run_id == tracked.info.run_id
    assert second.info.run_name == name
    assert second.info.status == "FINISHED"
    assert second.data.params["train.learning_rate"] == "0.0005"
    assert second.data.metrics["eval_loss"] == pytest.approx(new_metrics["loss"])
