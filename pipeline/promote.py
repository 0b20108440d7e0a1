"""The registry follows the metric gate: `champion` moves only to a version that passes it.

    python -m pipeline.promote                # the newest version of mlflow.registered_model
    python -m pipeline.promote --version 7    # a given one
    fer-predict photo.jpg --model models:/<name>@champion

A new version of the registered model is compared with the version that holds
the alias `champion`, metric by metric, as `check_metrics` compares
`reports/metrics.json` with a baseline: each metric in `gate.tolerances` may be
worse by at most its tolerance. When every one passes the version becomes the
champion; otherwise it gets the alias `challenger` and the champion stays. The
first version becomes the champion, there being none to beat. Each verdict is
also a tag of the version (`gate.verdict`, `gate.baseline_version`, `gate.reason`).
Exit status 0: the version is the champion; 1: it is the challenger; 2: no
comparison could be made (no registered model, a version without evaluation
metrics, an unreachable store), which never moves an alias.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline import CLASSES
from pipeline.check_metrics import (
    ERROR,
    PASS,
    REGRESSION,
    GateError,
    Verdict,
    compare,
    format_table,
)
from pipeline.logs import setup_logging
from pipeline.params import ParamsError, load_params
from pipeline.paths import PARAMS_FILE
from pipeline.tracking import (
    EVAL_METRICS,
    TrackingError,
    check_reachable,
    is_remote,
    project_root,
    tracking_uri,
)

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class Decision:
    version: str
    alias: str  # CHAMPION or CHALLENGER
    baseline_version: str | None  # the champion it was compared with, None for the first
    verdicts: list[Verdict]

    @property
    def reason(self) -> str:
        if self.baseline_version is None:
            return "no champion yet"
        if self.baseline_version == self.version:
            return "already the champion"
        failed = [v for v in self.verdicts if v.failed]
        if failed:
            worse = ", ".join(f"{v.metric} {v.baseline:.4f} -> {v.new:.4f}" for v in failed)
            champion = self.baseline_version
            return f"worse than champion version {champion} beyond gate.tolerances: {worse}"
        return f"passes the gate against champion version {self.baseline_version}"


def run_metrics(metrics: dict[str, float]) -> dict[str, Any]:
    """A run's `eval_*` metrics in the shape of `reports/metrics.json`, which the gate's
    metric names (`accuracy`, `per_class.disgust.f1`) address."""
    shaped: dict[str, Any] = {
        key: metrics[f"eval_{key}"] for key in EVAL_METRICS if f"eval_{key}" in metrics
    }
    per_class = {
        name: {"f1": metrics[f"eval_f1_{name}"]} for name in CLASSES if f"eval_f1_{name}" in metrics
    }
    if per_class:
        shaped["per_class"] = per_class
    if "best_epoch" in metrics:
        shaped["best_epoch"] = metrics["best_epoch"]
    return shaped


def _version(client: MlflowClient, name: str, version: str | None):
    if version is not None:
        return client.get_model_version(name, version)
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise GateError(f"the registered model {name!r} has no version yet")
    return max(versions, key=lambda v: int(v.version))


def _champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no version holds the alias yet
        return None


def _metrics_of(client: MlflowClient, version) -> dict[str, Any]:
    where = f"version {version.version} (run {version.run_id})"
    if not version.run_id:
        raise GateError(f"{where}: was not logged from a run, so it has no metrics")
    metrics = run_metrics(client.get_run(version.run_id).data.metrics)
    if not metrics:
        raise GateError(f"{where}: has no evaluation metrics; run the evaluate stage first")
    return metrics


def decide(
    client: MlflowClient, name: str, tolerances: dict[str, float], version: str | None = None
) -> Decision:
    """Compare a version with the champion, without moving any alias."""
    candidate = _version(client, name, version)
    new = _metrics_of(client, candidate)
    champion = _champion(client, name)
    if champion is None:
        return Decision(candidate.version, CHAMPION, None, [])
    if champion.version == candidate.version:
        return Decision(candidate.version, CHAMPION, champion.version, [])
    baseline = _metrics_of(client, champion)
    where = (f"champion version {champion.version}", f"version {candidate.version}")
    verdicts = compare(baseline, new, tolerances, where)
    alias = CHALLENGER if any(v.failed for v in verdicts) else CHAMPION
    return Decision(candidate.version, alias, champion.version, verdicts)


def apply(client: MlflowClient, name: str, decision: Decision) -> None:
    """Set the decided alias on the version, and its verdict as tags."""
    client.set_registered_model_alias(name, decision.alias, decision.version)
    tags = {
        "gate.verdict": decision.alias,
        "gate.baseline_version": decision.baseline_version or "",
        "gate.reason": decision.reason,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, decision.version, key, value)


def promote(name: str, tolerances: dict[str, float], version: str | None, dry_run: bool) -> int:
    uri = tracking_uri(project_root())
    if is_remote(uri):
        check_reachable(uri, project_root())
    client = MlflowClient(tracking_uri=uri)
    decision = decide(client, name, tolerances, version)
    if decision.verdicts:
        print(format_table(decision.verdicts) + "\n")
    if not dry_run:
        apply(client, name, decision)
    moved = "would get" if dry_run else "is now"
    print(f"{name} version {decision.version} {moved} @{decision.alias}: {decision.reason}")
    return PASS if decision.alias == CHAMPION else REGRESSION


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.promote",
        description="Give a registered model version the alias 'champion' when it passes the "
        "metric gate (params.yaml gate.tolerances) against the current champion, else "
        "'challenger'.",
    )
    parser.add_argument(
        "--name", help="registered model (default: params.yaml mlflow.registered_model)"
    )
    parser.add_argument("--version", help="the version to judge (default: the newest)")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file")
    parser.add_argument(
        "--dry-run", action="store_true", help="say what would happen, move nothing"
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params)
        name = args.name or params.mlflow.registered_model
        if not name:
            raise GateError(
                "no registered model: set params.yaml mlflow.registered_model (every training "
                "then registers a version) or pass --name"
            )
        return promote(name, params.gate.tolerances, args.version, args.dry_run)
    except (ParamsError, GateError, TrackingError) as exc:
        log.error("cannot promote: %s", exc)
        return ERROR
    except MlflowException as exc:
        log.error("cannot promote: %s", exc.message)
        return ERROR


if __name__ == "__main__":
    sys.exit(main())
