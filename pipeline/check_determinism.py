"""Does running stages again repeat their outputs byte for byte?

    python -m pipeline.check_determinism                          # train, evaluate, export
    python -m pipeline.check_determinism --stage evaluate         # one stage
    python -m pipeline.check_determinism --ignore models/run.json --ignore other.txt
    python -m pipeline.check_determinism --set train.epochs=1     # two short runs, compared

Training is bit-exact on one CPU kind, not across kinds (docs/design.md), so the
committed reports of the embedded sample are checked against the gate's
tolerances only (`python -m pipeline.check_metrics --reproduce`), and determinism
is checked where it holds: on the machine at hand, right after `dvc repro`. This
records every output that `dvc.yaml` declares for the stages, runs them again with
`dvc repro --force --single-item`, and compares. Files that name the run rather
than its result (`models/run.json`, the MLflow run id) are left out.

With `--set KEY=VALUE` (repeatable, values read as YAML the way `dvc exp run -S`
reads them) the workspace is not touched: the stages run twice, one run after the
other, in a scratch copy of the project (the files git knows, with `params.yaml`
changed as set, and the stages' inputs from the workspace) in the system's
temporary folder, each time with their commands from `dvc.yaml`, and the two runs'
outputs are compared with each other. `--set train.epochs=1` makes that much
quicker than retraining the workspace's model, which is how CI uses it. Their
MLflow runs go to the scratch copy's own store, removed with it.

Exit status: 0 when every output repeated, 1 when one differed (text files get a
diff), 2 when the check could not be made (an unknown stage, a missing output,
a failed rerun), which is never a pass.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.logs import setup_logging
from pipeline.params import (
    ParamsError,
    apply_overrides,
    parse_overrides,
    parse_params,
    read_raw_params,
)
from pipeline.paths import PARAMS_FILE, Paths

log = logging.getLogger(__name__)

SAME, DIFFERENT, ERROR = 0, 1, 2
DEFAULT_STAGES = ("train", "evaluate", "export")  # every stage downstream of training
PER_RUN = (Paths().run_info.as_posix(),)  # new MLflow run id each time, by design
DIFF_LINES = 40
TEXT_LIMIT = 1 << 20  # bytes; larger files are compared by hash only


class CheckError(Exception):
    """The check cannot be made; the message says why."""


@dataclass(frozen=True)
class Snapshot:
    digest: str
    text: str | None  # kept for small text files, to show what changed


def declared_stages(dvc_yaml: Path) -> dict[str, dict]:
    """The `stages` of `dvc.yaml`, in declaration order."""
    try:
        declared = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {})
    except FileNotFoundError:
        raise CheckError(
            f"{dvc_yaml}: not found; run this from the project's root, where dvc.yaml lives"
        ) from None
    except (OSError, yaml.YAMLError) as exc:
        raise CheckError(f"{dvc_yaml}: cannot be read ({exc})") from None
    return declared


def _known(declared: dict[str, dict], stages: list[str], dvc_yaml: Path) -> None:
    for stage in stages:
        if stage not in declared:
            raise CheckError(f"{dvc_yaml} has no stage {stage!r}; it has {', '.join(declared)}")


def _paths(entries: list | None) -> list[Path]:
    return [Path(e if isinstance(e, str) else next(iter(e))) for e in entries or []]


def stage_outputs(dvc_yaml: Path, stages: list[str]) -> list[Path]:
    """Every `outs`, `metrics` and `plots` file the stages declare, in declaration order."""
    declared = declared_stages(dvc_yaml)
    _known(declared, stages, dvc_yaml)
    return declared_outputs(declared, stages)


def declared_outputs(declared: dict[str, dict], stages: list[str]) -> list[Path]:
    files: list[Path] = []
    for stage in stages:
        for kind in ("outs", "metrics", "plots"):
            for name in _paths(declared[stage].get(kind)):
                if name not in files:
                    files.append(name)
    return files


def snapshot(path: Path) -> Snapshot:
    if not path.is_file():
        what = "a folder (compare files, not folders)" if path.is_dir() else "missing"
        raise CheckError(f"{path}: {what}; run the stages first (dvc repro)")
    data = path.read_bytes()
    text = None
    if len(data) <= TEXT_LIMIT:
        with contextlib.suppress(UnicodeDecodeError):
            text = data.decode("utf-8")
    return Snapshot(hashlib.sha256(data).hexdigest(), text)


def describe_difference(path: Path, before: Snapshot, after: Snapshot) -> str:
    if before.text is None or after.text is None:
        return f"{path}: differs (sha256 {before.digest[:12]} -> {after.digest[:12]})"
    diff = list(
        difflib.unified_diff(
            before.text.splitlines(),
            after.text.splitlines(),
            f"{path} (first run)",
            f"{path} (rerun)",
            lineterm="",
        )
    )
    shown = diff[:DIFF_LINES]
    if len(diff) > DIFF_LINES:
        shown.append(f"... {len(diff) - DIFF_LINES} more diff lines")
    return "\n".join(shown)


def stage_env() -> dict[str, str]:
    """This environment with this Python's folder first on PATH, so the stages' `python -m
    ...` commands run where this check runs (`.venv/bin/python`)."""
    return {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }


def rerun(stages: list[str]) -> None:
    """`dvc repro --force --single-item`, the stages run by this Python (`stage_env`)."""
    command = [sys.executable, "-m", "dvc", "repro", "--force", "--single-item", *stages]
    log.info("running again: %s", " ".join(["dvc", *command[3:]]))
    if subprocess.call(command, env=stage_env()) != 0:
        raise CheckError(f"the rerun failed: {' '.join(['dvc', *command[3:]])}")


def check(stages: list[str], ignore: list[str], dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """Rerun `stages` and return a description of every output that came out different."""
    files = compared_outputs(stage_outputs(dvc_yaml, stages), stages, ignore)
    before = {path: snapshot(path) for path in files}
    rerun(stages)
    return differences(before, {path: snapshot(path) for path in files})


def compared_outputs(outputs: list[Path], stages: list[str], ignore: list[str]) -> list[Path]:
    files = [f for f in outputs if f.as_posix() not in ignore]
    if not files:
        raise CheckError(f"stages {', '.join(stages)} declare no output to compare")
    return files


def differences(first: dict[Path, Snapshot], again: dict[Path, Snapshot]) -> list[str]:
    return [
        describe_difference(path, first[path], again[path])
        for path in first
        if again[path].digest != first[path].digest
    ]


# ------------------------------------------------------------- two runs in a scratch copy


def project_files(root: Path) -> list[Path]:
    """The files git knows in `root`: committed or not, less what .gitignore leaves out."""
    command = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    try:
        listed = subprocess.run(command, cwd=root, capture_output=True, text=True)
    except OSError as exc:
        raise CheckError(f"--set copies the files git knows, and git cannot run: {exc}") from None
    if listed.returncode != 0:
        raise CheckError(
            f"{root.resolve()}: --set copies the files git knows, and git cannot list them "
            f"({listed.stderr.strip()})"
        )
    return [Path(name) for name in listed.stdout.split("\0") if name]


def _copy(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, dest, symlinks=True)
    else:
        shutil.copy2(source, dest, follow_symlinks=False)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def make_scratch_project(
    root: Path, dest: Path, stages: list[str], declared: dict[str, dict], overrides: dict
) -> None:
    """`dest`: the files git knows in `root`, without the stages' outputs (a stale one must
    not pass for a new one), with the inputs the stages take from earlier stages (such as
    data/processed), and with `params.yaml` changed by `overrides`."""
    outputs = declared_outputs(declared, stages)
    for name in project_files(root):
        if (root / name).is_file() or (root / name).is_symlink():
            _copy(root / name, dest / name)
    for name in outputs:
        _remove(dest / name)
    for stage in stages:
        for name in _paths(declared[stage].get("deps")):
            if name in outputs or (dest / name).exists():
                continue
            if not (root / name).exists():
                raise CheckError(
                    f"{root / name}: missing, and stage {stage} needs it; run dvc repro first"
                )
            _copy(root / name, dest / name)
    params = apply_overrides(read_raw_params(root / PARAMS_FILE), overrides)
    parse_params(params)  # a wrong key or value fails here, before any stage runs
    (dest / PARAMS_FILE).write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def run_commands(project: Path, stages: list[str], declared: dict[str, dict]) -> None:
    """Each stage's `cmd` from dvc.yaml, in `project`, as `dvc repro` runs it: through the
    shell, with this Python first on PATH; MLflow tracks in the project's own store."""
    env = stage_env()
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
        env.pop(key, None)
    for stage in stages:
        commands = declared[stage].get("cmd")
        for command in [commands] if isinstance(commands, str) else commands or []:
            log.info("stage %s: %s", stage, command)
            if subprocess.call(command, shell=True, cwd=project, env=env) != 0:
                raise CheckError(f"stage {stage} failed in the scratch copy: {command}")


def check_twice(
    stages: list[str], ignore: list[str], overrides: dict, root: Path = Path()
) -> list[str]:
    """Run `stages` twice in a scratch copy of `root` with `overrides` and return a
    description of every output that came out different the second time."""
    dvc_yaml = root / "dvc.yaml"
    declared = declared_stages(dvc_yaml)
    _known(declared, stages, dvc_yaml)
    ordered = [name for name in declared if name in stages]  # dvc.yaml lists them in order
    files = compared_outputs(declared_outputs(declared, ordered), ordered, ignore)
    setting = ", ".join(f"{key}={value}" for key, value in overrides.items())
    runs: list[dict[Path, Snapshot]] = []
    with tempfile.TemporaryDirectory(prefix="fer-determinism-") as scratch:
        project = Path(scratch) / "project"  # the same path both times
        for number in (1, 2):
            log.info(
                "run %d of 2 of %s with %s, in %s", number, ", ".join(ordered), setting, project
            )
            make_scratch_project(root.resolve(), project, ordered, declared, overrides)
            run_commands(project, ordered, declared)
            if missing := [path.as_posix() for path in files if not (project / path).is_file()]:
                raise CheckError(
                    f"stages {', '.join(ordered)} ran in the scratch copy without writing "
                    f"{', '.join(missing)}, which dvc.yaml declares"
                )
            with contextlib.chdir(project):
                runs.append({path: snapshot(path) for path in files})
            shutil.rmtree(project)
    return differences(*runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.check_determinism",
        description="Run DVC stages again and fail unless every output they declare "
        "repeats byte for byte.",
    )
    parser.add_argument(
        "--stage",
        dest="stages",
        action="append",
        metavar="NAME",
        help=f"a stage of dvc.yaml, repeatable (default: {', '.join(DEFAULT_STAGES)})",
    )
    parser.add_argument(
        "--ignore",
        action="append",
        metavar="PATH",
        help=f"an output not to compare, repeatable (default: {', '.join(PER_RUN)})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a param for two runs in a scratch copy of the project, compared with each "
        "other, instead of one rerun in the workspace; repeatable (e.g. train.epochs=1: "
        "a quicker check, as CI makes it)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    stages = args.stages or list(DEFAULT_STAGES)
    ignore = args.ignore if args.ignore is not None else list(PER_RUN)
    try:
        if args.overrides:
            changed = check_twice(stages, ignore, parse_overrides(args.overrides, "--set"))
        else:
            changed = check(stages, ignore)
    except (CheckError, ParamsError) as exc:
        log.error("cannot check determinism: %s", exc)
        return ERROR
    how = f" with {', '.join(args.overrides)}, twice in a scratch copy" if args.overrides else ""
    if changed:
        print("\n\n".join(changed))
        print(
            f"\nFAILED: {len(changed)} output(s) of {', '.join(stages)}{how} changed when run "
            "again with the same code, params and data on this machine"
        )
        return DIFFERENT
    print(f"passed: every output of {', '.join(stages)}{how} repeated byte for byte")
    return SAME


if __name__ == "__main__":
    sys.exit(main())
