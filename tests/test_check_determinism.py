"""`python -m pipeline.check_determinism` on a real DVC project: stages that repeat
their outputs pass, a planted non-deterministic one fails and shows what changed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import GIT_IDENTITY, subprocess_env

from pipeline import check_determinism
from pipeline.check_determinism import CheckError, stage_outputs

ROOT = Path(__file__).resolve().parents[1]

# `rows` is fixed; `noise` draws from the OS, so a rerun differs, as a training
# whose ops summed in scheduling order would.
STAGES = {
    "rows": "import json; json.dump({'accuracy': 0.5}, open('rows.json', 'w'))",
    "noise": "import json, os; json.dump({'loss': os.urandom(8).hex()}, open('noise.json', 'w'))",
    "runid": "import os; open('run.txt', 'w').write(os.urandom(8).hex())",
}


def _dvc_yaml() -> str:
    outputs = {"rows": ("metrics", "rows.json"), "noise": ("metrics", "noise.json")}
    outputs["runid"] = ("outs", "run.txt")
    stages = {
        name: {"cmd": f'{sys.executable} -c "{STAGES[name]}"', kind: [{out: {"cache": False}}]}
        for name, (kind, out) in outputs.items()
    }
    return yaml.safe_dump({"stages": stages}, sort_keys=False)


def _run(cwd: Path, *command: str) -> str:
    done = subprocess.run(
        command, cwd=cwd, env=subprocess_env(**GIT_IDENTITY), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _run(tmp_path, "git", "init", "-q")
    _run(tmp_path, sys.executable, "-m", "dvc", "init", "-q")
    (tmp_path / "dvc.yaml").write_text(_dvc_yaml(), encoding="utf-8")
    _run(tmp_path, sys.executable, "-m", "dvc", "repro", "-q")
    monkeypatch.chdir(tmp_path)
    for key, value in subprocess_env(**GIT_IDENTITY).items():
        monkeypatch.setenv(key, value)
    return tmp_path


def test_stage_outputs_are_the_declared_outs_metrics_and_plots() -> None:
    outputs = stage_outputs(ROOT / "dvc.yaml", ["train", "evaluate"])
    assert Path("models/model.h5") in outputs
    assert Path("reports/history.csv") in outputs
    assert Path("reports/metrics.json") in outputs
    assert Path("reports/figures/confusion_matrix.png") in outputs
    assert len(outputs) == len(set(outputs))


def test_an_unknown_stage_is_named_with_the_ones_there_are() -> None:
    with pytest.raises(CheckError, match=r"no stage 'trian'; it has download, preprocess"):
        stage_outputs(ROOT / "dvc.yaml", ["trian"])


@pytest.mark.slow
def test_a_stage_that_repeats_its_outputs_passes(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check_determinism.main(["--stage", "rows"]) == check_determinism.SAME
    assert "passed: every output of rows repeated byte for byte" in capsys.readouterr().out


@pytest.mark.slow
def test_a_planted_non_deterministic_stage_fails_with_a_diff(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (project / "noise.json").read_text()

    status = check_determinism.main(["--stage", "rows", "--stage", "noise"])

    out = capsys.readouterr().out
    assert status == check_determinism.DIFFERENT
    assert "--- noise.json (first run)" in out
    assert f"-{before}" in out
    assert "rows.json" not in out  # the stage that did repeat is not blamed
    assert "FAILED: 1 output(s) of rows, noise changed" in out


@pytest.mark.slow
def test_outputs_that_name_the_run_can_be_left_out(project: Path) -> None:
    assert check_determinism.main(["--stage", "runid"]) == check_determinism.DIFFERENT
    assert check_determinism.main(["--stage", "runid", "--ignore", "run.txt"]) == (
        check_determinism.ERROR  # nothing left to compare is not a pass
    )
    assert check_determinism.main(
        ["--stage", "rows", "--stage", "runid", "--ignore", "run.txt"]
    ) == (check_determinism.SAME)


@pytest.mark.slow
def test_a_missing_output_or_a_failing_rerun_is_an_error(project: Path) -> None:
    (project / "rows.json").unlink()
    assert check_determinism.main(["--stage", "rows"]) == check_determinism.ERROR

    _run(project, sys.executable, "-m", "dvc", "repro", "-q", "rows")
    dvc_yaml = project / "dvc.yaml"
    declared = yaml.safe_load(dvc_yaml.read_text())
    declared["stages"]["rows"]["cmd"] = f'{sys.executable} -c "raise SystemExit(3)"'
    dvc_yaml.write_text(yaml.safe_dump(declared))
    assert check_determinism.main(["--stage", "rows"]) == check_determinism.ERROR


def test_the_ci_script_checks_determinism_and_the_baseline_within_tolerances() -> None:
    """The committed reports come from one CPU kind; CI must not demand them exactly."""
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pipeline.check_determinism" in script
    assert "python -m pipeline.check_metrics --reproduce" in script
    assert "git diff --exit-code" not in script
    assert script.index("make repro") < script.index("check_determinism")
