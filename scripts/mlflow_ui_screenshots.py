"""Screenshots of the MLflow UI on this project's runs, taken by headless Chromium.

    python scripts/mlflow_ui_screenshots.py                      # the project's store
    python scripts/mlflow_ui_screenshots.py --out docs/images --runs 2

Starts `mlflow ui` on the project's store (or uses the server `MLFLOW_TRACKING_URI`
names), opens the experiment's runs table and the comparison of its newest runs in
Chromium (Debian's `chromium`: `apt-get install chromium`), and saves
`mlflow-runs.png` and `mlflow-compare.png`, plus the rendered pages as HTML beside
them, so that what a person sees can be checked. Exit status 0, or 1 with one
`error:` line (no Chromium, no such experiment, fewer runs than asked).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient

from pipeline.params import ParamsError, load_params
from pipeline.paths import PARAMS_FILE
from pipeline.tracking import (
    experiment_url,
    is_remote,
    project_root,
    tracking_uri,
    ui_command,
)

CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--hide-scrollbars",
)  # fmt: skip
RENDER_BUDGET_MS = 20000  # virtual time for the UI to fetch its runs and draw them
WINDOW = "1600,1400"


class ScreenshotError(Exception):
    """What stopped the screenshots; the message says what to do."""


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise ScreenshotError("no Chromium on PATH; install it (apt-get install chromium)")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ScreenshotError(f"mlflow ui exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise ScreenshotError(f"mlflow ui did not answer at {url} within {timeout:.0f} s")


@contextmanager
def mlflow_ui(uri: str):
    """The UI's base URL: the tracking server itself, or `mlflow ui` on a local store."""
    if is_remote(uri):
        yield uri.rstrip("/")
        return
    port = _free_port()
    process = subprocess.Popen(
        ui_command(uri, project_root(), "127.0.0.1", port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for(f"{base}/health", process)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def newest_runs(uri: str, experiment: str, count: int) -> tuple[str, list[str]]:
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ScreenshotError(f"no experiment {experiment!r} in {uri}; train first (dvc repro)")
    runs = client.search_runs(
        [found.experiment_id], "attributes.status = 'FINISHED'", max_results=count,
        order_by=["attributes.start_time DESC"],
    )  # fmt: skip
    if len(runs) < count:
        raise ScreenshotError(
            f"experiment {experiment!r} has {len(runs)} finished runs, {count} asked for"
        )
    return found.experiment_id, [run.info.run_id for run in runs]


def pages(base: str, experiment_id: str, run_ids: list[str]) -> dict[str, str]:
    compare = urllib.parse.urlencode(
        {
            "runs": json.dumps(run_ids),
            "experiments": json.dumps([experiment_id]),
            "workflowType": "machine_learning",
        }
    )
    return {
        "mlflow-runs": experiment_url(base, experiment_id),  # what `make ui` prints
        "mlflow-compare": f"{base}/#/compare-runs?{compare}",
    }


def capture(chromium: str, url: str, png: Path) -> str:
    """Save a screenshot of `url` to `png`; return the page as rendered (its DOM)."""
    with tempfile.TemporaryDirectory(prefix="fer-chromium-") as profile:
        common = [
            chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
            f"--window-size={WINDOW}", f"--virtual-time-budget={RENDER_BUDGET_MS}",
        ]  # fmt: skip
        shot = subprocess.run(
            [*common, f"--screenshot={png}", url], capture_output=True, text=True, timeout=180
        )
        if shot.returncode != 0 or not png.is_file():
            raise ScreenshotError(f"Chromium could not take {png.name}: {shot.stderr[-500:]}")
        dom = subprocess.run(
            [*common, "--dump-dom", url], capture_output=True, text=True, timeout=180
        )
    return dom.stdout


def take(out: Path, experiment: str, count: int) -> list[Path]:
    chromium = find_chromium()
    uri = tracking_uri(project_root())
    experiment_id, run_ids = newest_runs(uri, experiment, count)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with mlflow_ui(uri) as base:
        for name, url in pages(base, experiment_id, run_ids).items():
            png = out / f"{name}.png"
            (out / f"{name}.html").write_text(capture(chromium, url, png), encoding="utf-8")
            written += [png, out / f"{name}.html"]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/mlflow_ui_screenshots.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=Path("docs/images"), help="folder to write")
    parser.add_argument("--runs", type=int, default=2, help="how many newest runs to compare")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file")
    args = parser.parse_args(argv)
    try:
        experiment = load_params(args.params).mlflow.experiment
        for path in take(args.out, experiment, args.runs):
            print(path)
    except (ParamsError, ScreenshotError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
