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


def test_outside_a_project_it_says_where_to_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    for args in ([], ["--set", "train.epochs=1"]):
        assert check_determinism.main(args) == check_determinism.ERROR
        assert "dvc.yaml: not found; run this from the project's root" in caplog.text
        caplog.clear()


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


# A project of three stages for `--set`: `prepare` writes an input that git ignores (as
# data/processed), `epochs` reads it and params.yaml, `noisy` draws from the OS. Each run
# of `epochs` leaves a line in seen.txt outside the project: where it ran, what it read.
PARAM_STAGES = {
    "prepare": "open('data/in.txt', 'w').write('faces')",
    "epochs": (
        "import json, os, yaml; p = yaml.safe_load(open('params.yaml'));"
        " e = p['train']['epochs']; d = open('data/in.txt').read();"
        " json.dump({'epochs': e, 'data': d}, open('epochs.json', 'w'));"
        " print(os.getcwd(), e, d, file=open(os.environ['SEEN'], 'a'))"
    ),
    "noisy": "import os; open('noisy.txt', 'w').write(os.urandom(8).hex())",
}


@pytest.fixture
def param_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    repo = tmp_path / "project"
    repo.mkdir()
    _run(repo, "git", "init", "-q")
    _run(repo, sys.executable, "-m", "dvc", "init", "-q")
    (repo / "data").mkdir()
    (repo / ".gitignore").write_text("/data/\n", encoding="utf-8")
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text(), encoding="utf-8")
    stages = {
        "prepare": {"outs": ["data/in.txt"]},
        "epochs": {"deps": ["data/in.txt"], "params": ["train.epochs"], "metrics": [
            {"epochs.json": {"cache": False}}]},
        "noisy": {"outs": [{"noisy.txt": {"cache": False}}]},
    }  # fmt: skip
    for name, stage in stages.items():
        stage["cmd"] = f'{sys.executable} -c "{PARAM_STAGES[name]}"'
    dvc_yaml = yaml.safe_dump({"stages": stages}, sort_keys=False)
    (repo / "dvc.yaml").write_text(dvc_yaml, encoding="utf-8")
    monkeypatch.setenv("SEEN", str(tmp_path / "seen.txt"))
    _run(repo, sys.executable, "-m", "dvc", "repro", "-q")
    (tmp_path / "seen.txt").unlink()
    monkeypatch.chdir(repo)
    return repo


@pytest.mark.slow
def test_set_runs_the_stages_twice_in_a_scratch_copy_with_the_param_and_leaves_the_workspace(
    param_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workspace = {
        name: (param_project / name).read_bytes()
        for name in ("params.yaml", "epochs.json", "dvc.lock", "data/in.txt")
    }

    status = check_determinism.main(["--stage", "epochs", "--set", "train.epochs=7"])

    assert status == check_determinism.SAME
    out = capsys.readouterr().out
    assert "passed: every output of epochs with train.epochs=7, twice in a scratch copy" in out
    seen = [line.split() for line in (param_project.parent / "seen.txt").read_text().splitlines()]
    assert len(seen) == 2 and seen[0] == seen[1]  # two runs, in the same place
    where, epochs, data = seen[0]
    assert Path(where) != param_project and not Path(where).exists()  # removed after
    assert (epochs, data) == ("7", "faces")  # the param as set, the input git ignores
    for name, content in workspace.items():
        assert (param_project / name).read_bytes() == content, name


@pytest.mark.slow
def test_set_fails_a_planted_non_deterministic_stage_with_a_diff(
    param_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = check_determinism.main(
        ["--stage", "epochs", "--stage", "noisy", "--set", "train.epochs=2"]
    )

    out = capsys.readouterr().out
    assert status == check_determinism.DIFFERENT
    assert "--- noisy.txt (first run)" in out and "+++ noisy.txt (rerun)" in out
    assert "epochs.json" not in out
    assert "FAILED: 1 output(s) of epochs, noisy with train.epochs=2, twice in a scratch" in out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.epoch=2"], "train.epoch: unknown key"),
        (["--set", "train.epochs"], "--set 'train.epochs': expected key=value"),
        (["--set", "train.epochs=-1"], "train.epochs: -1 is out of range"),
        (["--stage", "noisy", "--stage", "nosiy", "--set", "train.epochs=1"], "no stage 'nosiy'"),
    ],
)
def test_set_with_a_wrong_param_or_stage_runs_nothing_and_is_an_error(
    param_project: Path, caplog: pytest.LogCaptureFixture, args: list[str], message: str
) -> None:
    assert check_determinism.main(["--stage", "epochs", *args]) == check_determinism.ERROR
    assert message in caplog.text
    assert not (param_project.parent / "seen.txt").exists()


@pytest.mark.slow
def test_set_fails_a_stage_that_fails_or_writes_no_output_in_the_scratch_copy(
    param_project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    declared = yaml.safe_load((param_project / "dvc.yaml").read_text())
    declared["stages"]["noisy"]["cmd"] = f'{sys.executable} -c "pass"'
    (param_project / "dvc.yaml").write_text(yaml.safe_dump(declared))
    assert check_determinism.main(["--stage", "noisy", "--set", "train.epochs=1"]) == 2
    assert "ran in the scratch copy without writing noisy.txt" in caplog.text

    declared["stages"]["noisy"]["cmd"] = f'{sys.executable} -c "raise SystemExit(3)"'
    (param_project / "dvc.yaml").write_text(yaml.safe_dump(declared))
    assert check_determinism.main(["--stage", "noisy", "--set", "train.epochs=1"]) == 2
    assert "stage noisy failed in the scratch copy" in caplog.text
    assert (param_project / "noisy.txt").is_file()  # the workspace's, left as it was


def test_the_ci_script_checks_determinism_and_the_baseline_within_tolerances() -> None:
    """The committed reports come from one CPU kind; CI must not demand them exactly."""
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pipeline.check_determinism" in script
    assert "python -m pipeline.check_metrics --reproduce" in script
    assert "git diff --exit-code" not in script
    assert script.index("make repro") < script.index("check_determinism")
    assert "python -m pipeline.check_determinism --set train.epochs=1" in script
