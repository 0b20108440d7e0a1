"""The metric gate: is `reports/metrics.json` no worse than a baseline?

    python -m pipeline.check_metrics                       # vs the version committed at HEAD
    python -m pipeline.check_metrics --baseline main       # vs a git revision
    python -m pipeline.check_metrics --baseline old.json   # vs a file

Only the metrics listed in `params.yaml` `gate.tolerances` are gated, each
allowed to get worse by at most its tolerance: lower for most, higher for a
loss. Prints one line per metric; exits 0 when all pass, 1 on a regression,
and 2 when the comparison cannot be made (a missing or unreadable file, an
unknown revision, a metric absent from either side), which is never a pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.logs import setup_logging
from pipeline.params import ParamsError, load_params
from pipeline.paths import PARAMS_FILE, Paths

log = logging.getLogger(__name__)

PASS, REGRESSION, ERROR = 0, 1, 2


class GateError(Exception):
    """The comparison cannot be made; the message says why."""


@dataclass(frozen=True)
class Verdict:
    metric: str
    baseline: float
    new: float
    tolerance: float
    both_ways: bool = False  # also fail when it got better by more than the tolerance

    @property
    def lower_is_better(self) -> bool:
        return "loss" in self.metric

    @property
    def delta(self) -> float:
        return self.new - self.baseline

    @property
    def worsening(self) -> float:
        """How much worse `new` is than `baseline` (negative when better)."""
        return self.delta if self.lower_is_better else -self.delta

    @property
    def regressed(self) -> bool:
        return not math.isfinite(self.new) or self.worsening > self.tolerance

    @property
    def failed(self) -> bool:
        return self.regressed or (self.both_ways and -self.worsening > self.tolerance)

    @property
    def label(self) -> str:
        if self.regressed:
            return "REGRESSION"
        if self.failed:
            return "NOT REPRODUCED"
        return "better" if self.worsening < 0 else "ok"


def parse_metrics(text: str, where: str) -> dict[str, Any]:
    try:
        metrics = json.loads(text)
    except ValueError as exc:
        raise GateError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(metrics, dict):
        raise GateError(f"{where}: expected a JSON object of metrics")
    return metrics


def read_metrics_file(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GateError(
            f"{path}: not found; run the pipeline first (dvc repro) to write it"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GateError(f"{path}: cannot be read ({exc})") from None
    return parse_metrics(text, str(path))


def _git(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise GateError(f"cannot run git ({exc})") from None


def read_baseline(spec: str, metrics_path: Path) -> tuple[dict[str, Any], str]:
    """The baseline metrics and where they came from: a file, or `metrics_path` at a revision."""
    if Path(spec).is_file():
        return read_metrics_file(Path(spec)), spec
    if not _git("rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}").stdout.strip():
        raise GateError(f"--baseline {spec}: neither a file nor a git revision of this repository")
    relative = Path(os.path.relpath(metrics_path)).as_posix()
    where = f"{spec}:{relative}"
    shown = _git("show", f"{spec}:./{relative}")
    if shown.returncode != 0:
        raise GateError(
            f"{where}: not in git ({shown.stderr.strip()}); commit a baseline "
            "reports/metrics.json or pass --baseline FILE"
        )
    return parse_metrics(shown.stdout, where), where


def _lookup(metrics: dict[str, Any], name: str, where: str) -> float:
    """A metric by name; dotted names reach nested values (`per_class.disgust.f1`)."""
    value: Any = metrics
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise GateError(f"{where}: has no metric {name!r}")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GateError(f"{where}: metric {name!r} is {value!r}, not a number")
    return float(value)


def compare(
    baseline: dict[str, Any],
    new: dict[str, Any],
    tolerances: dict[str, float],
    where: tuple[str, str] = ("baseline", "new metrics"),
) -> list[Verdict]:
    """One verdict per gated metric, in the order of `tolerances`."""
    if not tolerances:
        raise GateError(f"{PARAMS_FILE} gate.tolerances is empty: there is nothing to check")
    verdicts = []
    for metric, tolerance in tolerances.items():
        if tolerance < 0:
            raise GateError(f"gate.tolerances.{metric}: {tolerance} is negative")
        old = _lookup(baseline, metric, where[0])
        if not math.isfinite(old):
            raise GateError(f"{where[0]}: metric {metric!r} is {old}, not a usable baseline")
        verdicts.append(Verdict(metric, old, _lookup(new, metric, where[1]), tolerance))
    return verdicts


def format_table(verdicts: list[Verdict]) -> str:
    header = ("metric", "baseline", "new", "delta", "tolerance", "verdict")
    rows = [
        (
            v.metric,
            f"{v.baseline:.4f}",
            f"{v.new:.4f}",
            f"{v.delta:+.4f}",
            f"{'+' if v.lower_is_better else '-'}{v.tolerance:.4f}",
            v.label,
        )
        for v in verdicts
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if i in (0, 5) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in (header, *rows)
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.check_metrics",
        description="Fail when reports/metrics.json is worse than a baseline "
        "by more than params.yaml gate.tolerances allows.",
    )
    parser.add_argument(
        "--baseline",
        default="HEAD",
        metavar="REV_OR_FILE",
        help="a metrics JSON file, or a git revision whose reports/metrics.json to use "
        "(default: HEAD)",
    )
    parser.add_argument(
        "--metrics", type=Path, default=Paths().metrics, help="new metrics (default: %(default)s)"
    )
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file")
    parser.add_argument(
        "--reproduce",
        action="store_true",
        help="check a rerun of the baseline: a metric also fails when it got better by "
        "more than its tolerance",
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        tolerances = load_params(args.params).gate.tolerances
        new = read_metrics_file(args.metrics)
        baseline, where = read_baseline(args.baseline, args.metrics)
        verdicts = compare(baseline, new, tolerances, (where, str(args.metrics)))
        if args.reproduce:
            verdicts = [dataclasses.replace(v, both_ways=True) for v in verdicts]
    except (ParamsError, GateError) as exc:
        log.error("cannot check the metrics: %s", exc)
        return ERROR
    print(f"baseline: {where}\nnew:      {args.metrics}\n")
    print(format_table(verdicts))
    failed = [v for v in verdicts if v.failed]
    if failed:
        how = "moved further from the baseline" if args.reproduce else "got worse"
        print(f"\nFAILED: {', '.join(v.metric for v in failed)} {how} than allowed")
        return REGRESSION
    if args.reproduce:
        print("\npassed: every gated metric is within its tolerance of the baseline")
    else:
        print("\npassed: no gated metric got worse than allowed")
    return PASS


if __name__ == "__main__":
    sys.exit(main())
