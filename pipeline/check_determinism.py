"""Does running stages again repeat their outputs byte for byte?

    python -m pipeline.check_determinism                          # train, evaluate, export
    python -m pipeline.check_determinism --stage evaluate         # one stage
    python -m pipeline.check_determinism --ignore models/run.json --ignore other.txt

Training is bit-exact on one CPU kind, not across kinds (docs/design.md), so the
committed reports of the embedded sample are checked against the gate's
tolerances only (`python -m pipeline.check_metrics --reproduce`), and determinism
is checked where it holds: on the machine at hand, right after `dvc repro`. This
records every output that `dvc.yaml` declares for the stages, runs them again with
`dvc repro --force --single-item`, and compares. Files that name the run rather
than its result (`models/run.json`, the MLflow run id) are left out.

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
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.logs import setup_logging
from pipeline.paths import Paths

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


def stage_outputs(dvc_yaml: Path, stages: list[str]) -> list[Path]:
    """Every `outs`, `metrics` and `plots` file the stages declare, in declaration order."""
    try:
        declared = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {})
    except (OSError, yaml.YAMLError) as exc:
        raise CheckError(f"{dvc_yaml}: cannot be read ({exc})") from None
    files: list[Path] = []
    for stage in stages:
        if stage not in declared:
            raise CheckError(f"{dvc_yaml} has no stage {stage!r}; it has {', '.join(declared)}")
        for kind in ("outs", "metrics", "plots"):
            for entry in declared[stage].get(kind) or []:
                name = entry if isinstance(entry, str) else next(iter(entry))
                if Path(name) not in files:
                    files.append(Path(name))
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


def rerun(stages: list[str]) -> None:
    """`dvc repro --force --single-item` with this Python's environment first on PATH, so
    the stages' `python -m ...` commands run where this check runs (`.venv/bin/python`)."""
    command = [sys.executable, "-m", "dvc", "repro", "--force", "--single-item", *stages]
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    log.info("running again: %s", " ".join(["dvc", *command[3:]]))
    if subprocess.call(command, env=env) != 0:
        raise CheckError(f"the rerun failed: {' '.join(['dvc', *command[3:]])}")


def check(stages: list[str], ignore: list[str], dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """Rerun `stages` and return a description of every output that came out different."""
    files = [f for f in stage_outputs(dvc_yaml, stages) if f.as_posix() not in ignore]
    if not files:
        raise CheckError(f"stages {', '.join(stages)} declare no output to compare")
    before = {path: snapshot(path) for path in files}
    rerun(stages)
    differences = []
    for path, first in before.items():
        again = snapshot(path)
        if again.digest != first.digest:
            differences.append(describe_difference(path, first, again))
    return differences


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
    args = parser.parse_args(argv)
    setup_logging()
    stages = args.stages or list(DEFAULT_STAGES)
    try:
        differences = check(stages, args.ignore if args.ignore is not None else list(PER_RUN))
    except CheckError as exc:
        log.error("cannot check determinism: %s", exc)
        return ERROR
    if differences:
        print("\n\n".join(differences))
        print(
            f"\nFAILED: {len(differences)} output(s) of {', '.join(stages)} changed when run "
            "again with the same code, params and data on this machine"
        )
        return DIFFERENT
    print(f"passed: every output of {', '.join(stages)} repeated byte for byte")
    return SAME


if __name__ == "__main__":
    sys.exit(main())
