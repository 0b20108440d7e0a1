"""`dvc.yaml` against the code, and a real `dvc repro` of the data stages.

The fast tests read `dvc.yaml` and the package's source with `ast`: every file a
stage declares is one of `pipeline.paths.Paths`, and from each stage's `main()`
the functions, classes and constants it can reach are followed through calls and
imports (those inside functions too), so that every `paths.<name>` that code uses
is declared by the stage, and every pipeline module it runs is one of its deps
(editing it reruns the stage) and no other is. The slow test runs DVC itself in
a scratch git repository.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path, PurePosixPath

import pytest
import yaml
from conftest import GIT_IDENTITY

from pipeline.paths import Paths

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
# Shared plumbing every stage uses; listing them would rerun everything on any edit.
NOT_DEPS = frozenset({"__init__", "params", "paths", "atomic", "logs", "cli"})
# Packs the predictor into the MLflow model: it records the outputs, never changes them,
# so what it runs is not followed (dvc.yaml says why).
MLFLOW_PACKAGING = frozenset({"serving"})


@cache
def dvc_stages() -> dict[str, dict]:
    with (ROOT / "dvc.yaml").open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)["stages"]


def entries(stage: dict, *kinds: str) -> list[str]:
    """The paths listed under `kinds` (deps, outs, metrics, plots) of a stage."""
    found = []
    for kind in kinds:
        for entry in stage.get(kind, []):
            found.extend(entry if isinstance(entry, dict) else [entry])
    return found


def paths_values() -> dict[str, str]:
    """Every `Paths` property, by name, as the relative POSIX path dvc.yaml spells."""
    paths = Paths()
    names = [n for n, v in vars(Paths).items() if isinstance(v, property)]
    return {name: getattr(paths, name).as_posix() for name in names}


def stage_module(name: str) -> str:
    match = re.fullmatch(r"python -m pipeline\.(\w+)", dvc_stages()[name]["cmd"])
    assert match, f"stage {name}: cmd {dvc_stages()[name]['cmd']!r} is not python -m pipeline.X"
    return match.group(1)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _walk(node: ast.AST):
    """`ast.walk`, leaving out the bodies of `if TYPE_CHECKING:`, which never run."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        if _is_type_checking(current):
            stack.extend(current.orelse)
        else:
            stack.extend(ast.iter_child_nodes(current))


def _bindings(node: ast.AST) -> dict[str, tuple[str, str | None]]:
    """Names that imports under `node` bind to pipeline code: name → (module, object or None)."""
    bound: dict[str, tuple[str, str | None]] = {}
    for child in _walk(node):
        if isinstance(child, ast.Import):
            for alias in child.names:
                parts = alias.name.split(".")
                if parts[0] == "pipeline" and len(parts) == 2 and alias.asname:
                    bound[alias.asname] = (parts[1], None)
        elif isinstance(child, ast.ImportFrom):
            parts = ("pipeline." * child.level + (child.module or "")).strip(".").split(".")
            if parts[0] != "pipeline":
                continue
            for alias in child.names:
                name = alias.asname or alias.name
                if len(parts) == 1 and (PACKAGE / f"{alias.name}.py").is_file():
                    bound[name] = (alias.name, None)  # from pipeline import sources
                else:
                    bound[name] = (parts[1] if len(parts) > 1 else "__init__", alias.name)
    return bound


@cache
def _module(module: str) -> tuple[dict[str, ast.AST], dict[str, tuple[str, str | None]]]:
    """A pipeline module's top-level units (functions, classes, assignments) by name, and
    what its module-level imports bind."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    units: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            units[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    units[target.id] = node
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.If, ast.Try))]
    return units, _bindings(ast.Module(body=imports, type_ignores=[]))


@cache
def reachable(module: str, entry: str = "main") -> frozenset[tuple[str, str]]:
    """Every top-level function, class and constant of the package that `module.entry` can
    reach, as (module, name): followed through calls and references, also across the
    imports made inside functions, as a stage's run does."""
    seen: set[tuple[str, str]] = set()
    todo = [(module, entry)]
    while todo:
        current = todo.pop()
        mod, name = current
        if mod in MLFLOW_PACKAGING:
            continue
        units, module_bindings = _module(mod)
        if current in seen or name not in units:
            continue
        seen.add(current)
        node = units[name]
        bindings = {**module_bindings, **_bindings(node)}
        for child in _walk(node):
            if isinstance(child, ast.Name) and not isinstance(child.ctx, ast.Store):
                if child.id in units:
                    todo.append((mod, child.id))
                elif child.id in bindings and bindings[child.id][1] is not None:
                    todo.append(bindings[child.id])
            elif (
                isinstance(child, ast.Attribute)
                and isinstance(child.value, ast.Name)
                and bindings.get(child.value.id, ("", ""))[1] is None
                and child.value.id in bindings
            ):
                todo.append((bindings[child.value.id][0], child.attr))  # sources.fetch_kaggle
    return frozenset(seen)


def modules_run_by(module: str) -> set[str]:
    """The pipeline modules whose code `python -m pipeline.<module>` runs."""
    return {mod for mod, _ in reachable(module)}


def paths_used_by(module: str) -> set[str]:
    """The `Paths` properties the code reachable from `module.main` reads as `paths.<name>`."""
    names = set(paths_values())
    used = set()
    for mod, unit in reachable(module):
        for node in _walk(_module(mod)[0][unit]):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in names
                and isinstance(node.value, ast.Name)
                and node.value.id == "paths"
            ):
                used.add(node.attr)
    return used


STAGES = list(dvc_stages())


def test_the_data_stages_are_declared() -> None:
    assert STAGES[:2] == ["download", "preprocess"]
    assert [stage_module(s) for s in STAGES] == STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_every_declared_output_is_a_paths_value(stage: str) -> None:
    known = set(paths_values().values())
    outputs = entries(dvc_stages()[stage], "outs", "metrics", "plots")
    assert outputs
    assert [o for o in outputs if o not in known] == []


@pytest.mark.parametrize("stage", STAGES)
def test_every_declared_data_dep_is_a_paths_value_or_its_module(stage: str) -> None:
    known = set(paths_values().values())
    deps = entries(dvc_stages()[stage], "deps")
    assert f"pipeline/{stage_module(stage)}.py" in deps  # the stage's own script
    assert [d for d in deps if not d.endswith(".py") and d not in known] == []
    assert [d for d in deps if d.endswith(".py") and not (ROOT / d).is_file()] == []


@pytest.mark.parametrize("stage", STAGES)
def test_every_path_a_stage_uses_is_declared(stage: str) -> None:
    values = paths_values()
    declared = [
        PurePosixPath(p) for p in entries(dvc_stages()[stage], "deps", "outs", "metrics", "plots")
    ]
    undeclared = []
    for name in sorted(paths_used_by(stage_module(stage))):
        path = PurePosixPath(values[name])
        # a folder the stage only makes or walks, such as models/, is fine
        if not any(path == d or path in d.parents for d in declared):
            undeclared.append(f"paths.{name} ({path})")
    assert not undeclared, f"stage {stage} uses, but dvc.yaml does not declare: {undeclared}"


def test_every_file_in_paths_is_an_output_of_some_stage() -> None:
    outputs = {o for s in STAGES for o in entries(dvc_stages()[s], "outs", "metrics", "plots")}
    values = paths_values()
    folders = {n for n, v in values.items() if any(o.startswith(v + "/") for o in outputs)}
    missing = [f"{n} ({v})" for n, v in values.items() if v not in outputs and n not in folders]
    assert not missing, f"Paths files no stage declares as an output: {missing}"


@pytest.mark.parametrize("stage", STAGES)
def test_every_pipeline_module_a_stage_runs_is_a_dep(stage: str) -> None:
    deps = set(entries(dvc_stages()[stage], "deps"))
    run = {f"pipeline/{m}.py" for m in modules_run_by(stage_module(stage)) - NOT_DEPS}
    missing = sorted(run - deps)  # edited, they would not rerun the stage
    assert not missing, f"stage {stage} runs code of {missing}, not in its deps"
    listed = {d for d in deps if d.startswith("pipeline/")}
    unused = sorted(listed - run)  # edited, they would rerun it for nothing
    assert not unused, f"stage {stage} lists {unused} as deps but never runs them"


def test_reachability_follows_calls_and_function_level_imports() -> None:
    # preprocess imports faces and figures inside functions, and hands _run_job to a pool
    preprocess = reachable("preprocess")
    assert {("faces", "align_face"), ("faces", "FaceDetector"), ("figures", "plot_samples")} <= (
        preprocess
    )
    assert {("preprocess", "_run_job"), ("imageops", "to_model_input")} <= preprocess
    assert ("figures", "plot_confusion") not in preprocess  # evaluate's, never called here
    # download calls sources.fetch_kaggle as a module attribute
    assert {("sources", "fetch_kaggle"), ("sample", "generate_sample")} <= reachable("download")
    assert paths_used_by("preprocess") == {
        "raw",
        "processed",
        "preprocess_report",
        "samples_figure",
    }


# --- a real `dvc repro` -----------------------------------------------------------------------


def _env(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env.update(
        PATH=venv_bin + os.pathsep + env.get("PATH", ""),
        PYTHONPATH=str(repo),
        **GIT_IDENTITY,
        DVC_NO_ANALYTICS="1",
        CI="1",
    )
    return env


def _run(repo: Path, *command: str) -> str:
    done = subprocess.run(
        command, cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=600
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{output}"
    return output


def _set_param(repo: Path, key: str, value: object) -> None:
    """Change one dotted key in params.yaml, leaving every other line as it was."""
    group, name = key.split(".")
    lines = (repo / "params.yaml").read_text(encoding="utf-8").splitlines(keepends=True)
    current = None
    for i, line in enumerate(lines):
        if re.match(r"^\w", line):
            current = line.split(":")[0]
        elif current == group and re.match(rf"^  {name}:", line):
            lines[i] = f"  {name}: {value}\n"
            break
    else:
        raise AssertionError(f"{key} not in params.yaml")
    (repo / "params.yaml").write_text("".join(lines), encoding="utf-8")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(
        PACKAGE, repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    (repo / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    (repo / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    _set_param(repo, "data.sample_train_images", 70)
    _set_param(repo, "data.sample_validation_images", 70)
    _set_param(repo, "data.sample_test_images", 35)
    _set_param(repo, "preprocess.workers", 1)
    _run(repo, "git", "init", "-q")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "pipeline")
    return repo


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


@pytest.mark.slow
def test_dvc_repro_runs_the_data_stages_and_only_what_changed(repo: Path) -> None:
    paths = Paths(repo)
    first = _run(repo, "dvc", "repro", "preprocess")

    assert _ran(first) == {"download", "preprocess"}
    assert "Found 70 images belonging to 7 classes." in first
    assert len(list(paths.raw.rglob("*.jpg"))) == 175  # 70 train, 70 validation, 35 test
    assert len(list(paths.processed.rglob("*.png"))) == 175
    for report in (paths.data_report, paths.preprocess_report, paths.samples_figure):
        assert report.stat().st_size > 0
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"download", "preprocess"}
    assert lock["preprocess"]["params"]["params.yaml"]["preprocess"]["equalization"] == "none"
    _run(repo, "git", "commit", "-q", "-am", "data")

    again = _run(repo, "dvc", "repro", "preprocess")
    assert _ran(again) == set()
    assert "Stage 'download' didn't change, skipping" in again
    assert "Stage 'preprocess' didn't change, skipping" in again
    assert "Data and pipelines are up to date." in again

    before = paths.processed.joinpath("train", "happy").glob("*.png")
    before = {p.name: p.read_bytes() for p in before}
    raw_before = {p: p.read_bytes() for p in paths.raw.rglob("*.jpg")}
    _set_param(repo, "preprocess.equalization", "clahe")

    diff = _run(repo, "dvc", "params", "diff", "--md")
    rows = [line for line in diff.splitlines() if line.startswith("| params.yaml")]
    assert len(rows) == 1, diff
    assert re.fullmatch(
        r"\| params\.yaml +\| preprocess\.equalization +\| none +\| clahe +\|", rows[0]
    )
    status = _run(repo, "dvc", "status", "preprocess")
    assert "preprocess:" in status
    assert "download:" not in status

    changed = _run(repo, "dvc", "repro", "preprocess")
    assert _ran(changed) == {"preprocess"}
    assert "Stage 'download' didn't change, skipping" in changed
    assert {p: p.read_bytes() for p in paths.raw.rglob("*.jpg")} == raw_before
    after = paths.processed.joinpath("train", "happy").glob("*.png")
    after = {p.name: p.read_bytes() for p in after}
    assert after.keys() == before.keys()
    assert after != before
    assert "Data and pipelines are up to date." in _run(repo, "dvc", "status", "preprocess")
