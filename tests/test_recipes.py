"""Named recipes: each one is valid params, and runs as the dvc exp run it prints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, git, subprocess_env

from pipeline import recipes
from pipeline.params import flatten, load_params

RECIPES = recipes.available(ROOT / "recipes")


def test_the_project_ships_recipes():
    assert "cpu-60min" in RECIPES


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_is_valid_params_with_a_description(name):
    settings = recipes.load_recipe(name, ROOT / "recipes")
    params = flatten(load_params(ROOT / "params.yaml", settings))
    for key, value in settings.items():
        assert params[key] == value, key
    assert recipes.description(RECIPES[name])


def _settings_from_argv(argv: list[str]) -> dict:
    pairs = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-S"]
    return {k: yaml.safe_load(v) for k, _, v in (p.partition("=") for p in pairs)}


def _write_recipe(folder: Path, name: str, text: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(text, encoding="utf-8")


def test_command_sets_every_recipe_key_so_dvc_reads_back_the_same_values(tmp_path):
    _write_recipe(
        tmp_path,
        "r",
        "# a test recipe\n"
        "model: {arch: vgg, dropout: 0.1}\n"
        "train: {learning_rate: 0.00001, early_stopping: {enabled: false}}\n"
        "mlflow: {registered_model: 'yes'}\n",
    )
    argv = recipes.command("r", [], [], ROOT / "params.yaml", tmp_path, experiment="e1")
    assert argv[:5] == ["dvc", "exp", "run", "-n", "e1"]
    assert _settings_from_argv(argv) == {
        "model.arch": "vgg",
        "model.dropout": 0.1,
        "train.learning_rate": 0.00001,
        "train.early_stopping.enabled": False,
        "mlflow.registered_model": "yes",  # a string, not YAML's boolean
    }


def test_user_overrides_come_after_the_recipe_and_win(tmp_path):
    _write_recipe(tmp_path, "r", "train: {epochs: 28}\n")
    argv = recipes.command(
        "r", ["train.epochs=3", "data.source=directory", "data.directory=/d"], ["--temp"],
        ROOT / "params.yaml", tmp_path, experiment="e",
    )  # fmt: skip
    assert _settings_from_argv(argv)["train.epochs"] == 3
    assert argv.index("train.epochs=28") < argv.index("train.epochs=3")
    assert argv[-1] == "--temp"


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("train: {epochz: 3}\n", [], "train.epochz: unknown key"),
        ("train: {epochs: 0}\n", [], "train.epochs"),
        ("trian: {epochs: 3}\n", [], "no such params group 'trian'"),
        ("[1, 2]\n", [], "expected params groups"),
        ("train: {epochs: [\n", [], "not valid YAML"),
        ("train: {epochs: 3}\n", ["data.source=archive", "data.archive=null"], "data.archive"),
        ("train: {epochs: 3}\n", ["train.epochs"], "expected key=value"),
    ],
)
def test_a_bad_recipe_or_override_fails_before_dvc_with_the_key(tmp_path, text, overrides, message):
    _write_recipe(tmp_path, "bad", text)
    with pytest.raises(recipes.RecipeError, match=message.replace("[", r"\[")):
        recipes.command("bad", overrides, [], ROOT / "params.yaml", tmp_path)


def test_an_unknown_recipe_names_the_ones_there_are(tmp_path):
    _write_recipe(tmp_path, "alpha", "train: {epochs: 3}\n")
    with pytest.raises(recipes.RecipeError, match=r"'beta' is not a recipe.*allowed: alpha"):
        recipes.load_recipe("beta", tmp_path)


def _fake_dvc(folder: Path, status: int) -> Path:
    """A `dvc` executable that records its arguments and exits with `status`."""
    folder.mkdir()
    script = folder / "dvc"
    record = folder / "argv.json"
    script.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\nsys.exit({status})\n"
    )
    script.chmod(0o755)
    return record


@pytest.mark.parametrize("status", [0, 3])
def test_run_starts_dvc_exp_run_and_returns_its_exit_status(tmp_path, status):
    record = _fake_dvc(tmp_path / "bin", status)
    env = subprocess_env()
    env["PATH"] = os.pathsep.join([str(tmp_path / "bin"), env["PATH"]])
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.recipes", "run", "cpu-60min", "-n", "mine", "--queue",
         "-S", "data.source=archive", "-S", "data.archive=/data/fer.zip"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == status, done.stderr
    argv = json.loads(record.read_text())
    assert argv[:4] == ["exp", "run", "-n", "mine"]
    assert argv[-1] == "--queue"
    settings = _settings_from_argv(argv)
    assert settings["data.archive"] == "/data/fer.zip"
    assert (
        settings["model.arch"] == recipes.load_recipe("cpu-60min", ROOT / "recipes")["model.arch"]
    )
    assert done.stdout.startswith("dvc exp run -n mine ")


def test_show_prints_the_command_without_running_dvc(tmp_path):
    env = subprocess_env()
    env["PATH"] = str(tmp_path)  # no dvc here: show must not need it
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.recipes", "show", "cpu-60min"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("dvc exp run -n cpu-60min-")
    assert "-S model.arch=" in done.stdout


def test_a_bad_override_exits_2_with_the_reason(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.recipes", "run", "cpu-60min", "-S", "train.epochs=-1"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "train.epochs" in done.stderr
    assert "dvc exp run" not in done.stdout


def test_uncommitted_params_the_recipe_does_not_set_are_refused_not_run(tmp_path):
    # after `dvc exp run`, DVC leaves the experiment's params in params.yaml: a recipe run
    # next would silently inherit them (it sets only its own keys)
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    shutil.copytree(ROOT / "recipes", project / "recipes")
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "params"]):
        git(project, *args)
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(
        text.replace("  crop: 0\n", "  crop: 40\n").replace("  tta: false", "  tta: true")
    )
    record = _fake_dvc(tmp_path / "bin", 0)
    env = subprocess_env(PYTHONPATH=str(ROOT))
    env["PATH"] = os.pathsep.join([str(tmp_path / "bin"), env["PATH"]])

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.recipes", "run", "cpu-60min", *extra],
            cwd=project, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    refused = run()
    assert refused.returncode == 2
    assert "model.crop: 40 (HEAD: 0)" in refused.stderr  # evaluate.tta: the recipe sets it
    assert "evaluate.tta" not in refused.stderr
    assert "git checkout params.yaml" in refused.stderr and "-S model.crop=40" in refused.stderr
    assert not record.exists()  # DVC never started

    kept = run("-S", "model.crop=40")
    assert kept.returncode == 0, kept.stderr
    assert _settings_from_argv(json.loads(record.read_text()))["model.crop"] == 40


def test_list_lines_up_the_descriptions_after_the_longest_name(tmp_path, monkeypatch, capsys):
    _write_recipe(tmp_path / "recipes", "short", "# The short one.\ntrain:\n  epochs: 2\n")
    _write_recipe(
        tmp_path / "recipes", "a-much-longer-recipe-name", "# The long one.\ntrain:\n  epochs: 3\n"
    )
    monkeypatch.chdir(tmp_path)
    assert recipes.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in lines) == ["a-much-longer-recipe-name", "short"]
    columns = {line.index("The ") for line in lines}
    assert columns == {len("a-much-longer-recipe-name") + 2}
