"""The metric gate `python -m pipeline.check_metrics`, in a temporary git repository."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, git, subprocess_env

from pipeline import check_metrics
from pipeline.params import read_raw_params

BASELINE = {
    "accuracy": 0.60,
    "loss": 1.10,
    "f1_macro": 0.50,
    "f1_weighted": 0.58,
    "per_class": {"disgust": {"f1": 0.20}},
}
TOLERANCES = {"accuracy": 0.02, "f1_macro": 0.03, "loss": 0.05}


def write_metrics(path: Path, changes: dict | None = None, **values: float) -> Path:
    metrics = json.loads(json.dumps(BASELINE))
    metrics.update(values)
    metrics.update(changes or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics), encoding="utf-8")
    return path


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository whose HEAD holds the baseline metrics and params with TOLERANCES."""
    raw = read_raw_params(ROOT / "params.yaml")
    raw["gate"]["tolerances"] = dict(TOLERANCES)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    write_metrics(tmp_path / "reports" / "metrics.json")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "baseline")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def new_metrics(repo: Path, changes: dict | None = None, **values: float) -> None:
    write_metrics(repo / "reports" / "metrics.json", changes, **values)


def table_rows(output: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in output.splitlines() if line.strip()}


def test_small_drops_within_tolerance_pass(repo: Path, capsys) -> None:
    new_metrics(repo, accuracy=0.59, f1_macro=0.48, loss=1.14)

    assert check_metrics.main([]) == check_metrics.PASS

    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows["metric"] == ["metric", "baseline", "new", "delta", "tolerance", "verdict"]
    assert rows["accuracy"] == ["accuracy", "0.6000", "0.5900", "-0.0100", "-0.0200", "ok"]
    assert rows["f1_macro"][-1] == "ok"
    assert rows["loss"] == ["loss", "1.1000", "1.1400", "+0.0400", "+0.0500", "ok"]
    assert "baseline: HEAD:reports/metrics.json" in out
    assert "passed" in out


def test_a_planted_accuracy_regression_fails(repo: Path, capsys) -> None:
    new_metrics(repo, accuracy=0.55)

    assert check_metrics.main([]) == check_metrics.REGRESSION

    out = capsys.readouterr().out
    assert table_rows(out)["accuracy"][-1] == "REGRESSION"
    assert table_rows(out)["f1_macro"][-1] == "ok"
    assert "FAILED: accuracy" in out


def test_loss_is_gated_in_the_other_direction(repo: Path, capsys) -> None:
    new_metrics(repo, loss=0.90)  # much lower: better
    assert check_metrics.main([]) == check_metrics.PASS
    assert table_rows(capsys.readouterr().out)["loss"][-1] == "better"

    new_metrics(repo, loss=1.20)  # higher by more than 0.05
    assert check_metrics.main([]) == check_metrics.REGRESSION
    assert table_rows(capsys.readouterr().out)["loss"][-1] == "REGRESSION"


def test_a_nested_metric_can_be_gated_and_nan_is_a_regression(repo: Path, capsys) -> None:
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["gate"]["tolerances"] = {"per_class.disgust.f1": 0.05, "accuracy": 0.02}
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    new_metrics(repo, {"per_class": {"disgust": {"f1": 0.10}}})
    assert check_metrics.main([]) == check_metrics.REGRESSION
    assert table_rows(capsys.readouterr().out)["per_class.disgust.f1"][-1] == "REGRESSION"

    (repo / "reports" / "metrics.json").write_text(
        json.dumps({**BASELINE, "accuracy": float("nan")})
    )
    assert check_metrics.main([]) == check_metrics.REGRESSION
    assert table_rows(capsys.readouterr().out)["accuracy"][-1] == "REGRESSION"


def test_baseline_from_a_file_or_a_revision(repo: Path, tmp_path: Path, capsys) -> None:
    older = write_metrics(tmp_path / "elsewhere" / "old.json", accuracy=0.70)
    new_metrics(repo)  # 0.60: 0.10 below the file's accuracy
    assert check_metrics.main(["--baseline", str(older)]) == check_metrics.REGRESSION
    assert f"baseline: {older}" in capsys.readouterr().out

    new_metrics(repo, accuracy=0.50)
    git(repo, "commit", "-q", "-am", "a worse model")
    assert check_metrics.main([]) == check_metrics.PASS  # HEAD is now the worse one
    capsys.readouterr()
    assert check_metrics.main(["--baseline", "HEAD~1"]) == check_metrics.REGRESSION
    assert "baseline: HEAD~1:reports/metrics.json" in capsys.readouterr().out


def test_a_missing_baseline_is_an_error_not_a_pass(tmp_path: Path, monkeypatch, caplog) -> None:
    raw = read_raw_params(ROOT / "params.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "no metrics yet")
    write_metrics(tmp_path / "reports" / "metrics.json")  # never committed
    monkeypatch.chdir(tmp_path)

    assert check_metrics.main([]) == check_metrics.ERROR
    assert "HEAD:reports/metrics.json: not in git" in caplog.text


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("no-such-revision", "neither a file nor a git revision"),
        ("missing.json", "neither a file nor a git revision"),
    ],
)
def test_a_bad_baseline_argument_is_an_error(repo: Path, caplog, argument, message) -> None:
    new_metrics(repo)
    assert check_metrics.main(["--baseline", argument]) == check_metrics.ERROR
    assert message in caplog.text


def test_unreadable_files_are_errors(repo: Path, caplog) -> None:
    broken = repo / "broken.json"
    broken.write_text("{ not json")
    new_metrics(repo)
    assert check_metrics.main(["--baseline", str(broken)]) == check_metrics.ERROR
    assert "broken.json: not valid JSON" in caplog.text

    (repo / "reports" / "metrics.json").unlink()
    assert check_metrics.main([]) == check_metrics.ERROR
    assert "reports/metrics.json: not found" in caplog.text


def test_a_gated_metric_missing_from_either_side_is_an_error(repo: Path, caplog) -> None:
    metrics = dict(BASELINE)
    del metrics["f1_macro"]
    (repo / "reports" / "metrics.json").write_text(json.dumps(metrics))
    assert check_metrics.main([]) == check_metrics.ERROR
    assert "has no metric 'f1_macro'" in caplog.text

    (repo / "reports" / "metrics.json").write_text(json.dumps({**BASELINE, "accuracy": "high"}))
    assert check_metrics.main([]) == check_metrics.ERROR
    assert "'high', not a number" in caplog.text


def test_the_module_runs_as_a_command(repo: Path) -> None:
    new_metrics(repo, accuracy=0.50)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.check_metrics"],
        cwd=repo,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == check_metrics.REGRESSION
    assert "REGRESSION" in done.stdout


def test_reproduce_also_fails_a_metric_that_moved_up_beyond_its_tolerance(
    repo: Path, capsys
) -> None:
    new_metrics(repo, accuracy=0.65)  # baseline 0.60, tolerance 0.02: better, but not a rerun

    assert check_metrics.main([]) == check_metrics.PASS
    assert table_rows(capsys.readouterr().out)["accuracy"][-1] == "better"

    assert check_metrics.main(["--reproduce"]) == check_metrics.REGRESSION
    out = capsys.readouterr().out
    assert table_rows(out)["accuracy"][-1] == "REPRODUCED"  # "NOT REPRODUCED", split
    assert "FAILED: accuracy moved further from the baseline" in out

    new_metrics(repo, accuracy=0.61, f1_macro=0.49, loss=1.09)
    assert check_metrics.main(["--reproduce"]) == check_metrics.PASS
    assert "within its tolerance of the baseline" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("deltas", "status"),
    [
        # the sample's reports are committed from an AMD EPYC without AVX-512, which trains
        # in float32 (0.950, macro F1 0.823); `make repro` on an AMD EPYC with AVX512-BF16
        # gives 0.961 (0.831), on an Intel Xeon with AMX 0.963
        ({"accuracy": +0.011, "f1_macro": +0.008}, check_metrics.PASS),
        ({"accuracy": +0.013}, check_metrics.PASS),
        # and the other way round: float32 against reports committed from a bfloat16 kind
        ({"accuracy": -0.011, "f1_macro": -0.008}, check_metrics.PASS),
        ({"accuracy": -0.011, "f1_macro": -0.023}, check_metrics.PASS),  # summation order
        ({"accuracy": -0.05}, check_metrics.REGRESSION),  # a planted regression
        ({"f1_macro": -0.06}, check_metrics.REGRESSION),
    ],
)
def test_the_committed_sample_metrics_gate_a_rerun_on_any_cpu_kind(
    tmp_path: Path, capsys, deltas: dict, status: int
) -> None:
    """CI's two gate calls, on the committed reports and params.yaml's own tolerances."""
    committed = json.loads((ROOT / "reports" / "metrics.json").read_text(encoding="utf-8"))
    rerun = {**committed, **{key: committed[key] + delta for key, delta in deltas.items()}}
    (tmp_path / "metrics.json").write_text(json.dumps(rerun), encoding="utf-8")
    arguments = [
        "--baseline", str(ROOT / "reports" / "metrics.json"),
        "--metrics", str(tmp_path / "metrics.json"),
        "--params", str(ROOT / "params.yaml"),
    ]  # fmt: skip

    assert check_metrics.main(arguments) == status
    assert check_metrics.main([*arguments, "--reproduce"]) == status
    if status == check_metrics.REGRESSION:
        assert "REGRESSION" in capsys.readouterr().out
