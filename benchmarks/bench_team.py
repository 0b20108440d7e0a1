"""What working as a team costs: the tracking server, the DVC remote, two queue workers.

    python benchmarks/bench_team.py              # the embedded sample at params.yaml's sizes
    python benchmarks/bench_team.py --small      # tiny data: checks that it all works
    FER_REAL_ARCHIVE=fer2013.zip python benchmarks/bench_team.py   # + push/pull of the real data

Starts a team stack of its own (`python -m pipeline.stack up`: PostgreSQL, SeaweedFS and
`mlflow server` with basic auth, on free loopback ports, in a temporary folder) and stops
it at the end. It measures, and prints as Markdown tables with the CPU:

1. **Epoch logging**: what `tracking.epoch_logger` does at the end of every epoch (the
   five curves in one `log_metrics`), inside a run, against a new local SQLite store
   and against the server, timed per epoch.
2. **`dvc push` / `dvc pull`** of `data/processed` to and from the stack's bucket, in
   files per second: the sample, and the real archive when `FER_REAL_ARCHIVE` names it.
3. **Four sample experiments** (`-S train.epochs=…`, one learning rate each) queued and
   run by `dvc queue start -j 1`, then four others by `-j 2`, every run on the server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pipeline.machine import cpu_description
from pipeline.params import load_params, to_dict

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# data small enough to check the script in minutes (as the tests' tiny data)
SMALL = {
    "data.sample_train_images": 70,
    "data.sample_validation_images": 70,
    "data.sample_test_images": 35,
    "train.batch_size": 32,
}
RATES = (("0.0005", "0.001", "0.002", "0.004"), ("0.0003", "0.0007", "0.0015", "0.003"))
QUEUE_TIMEOUT_SECONDS = 6 * 3600
IDENTITY = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
}


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 3600) -> str:
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise SystemExit(
            f"bench_team: {' '.join(map(str, command))} failed in {cwd}:\n"
            f"{(done.stdout + done.stderr)[-3000:]}"
        )
    return done.stdout


def base_env(**extra: str) -> dict[str, str]:
    """This environment without DVC's or MLflow's variables, this venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_TRACKING"))}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env.pop("PYTHONPATH", None)
    return {**env, **IDENTITY, **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_s3_port() -> int:
    from pipeline import stack

    for _ in range(100):
        port = free_port()
        ports = stack.Settings(s3_port=port).weed_ports().values()
        if port < 50000 and all(stack.port_is_free("127.0.0.1", p) for p in ports):
            return port
    raise SystemExit("bench_team: no free block of ports for SeaweedFS")


class Stack:
    """The team stack in `folder`, started by its own command line."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder / "stack"
        self.options = [
            f"--mlflow-port={free_port()}",
            f"--postgres-port={free_port()}",
            f"--s3-port={free_s3_port()}",
        ]
        self.env: dict[str, str] = {}

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pipeline.stack", "--dir", str(self.dir), *args]

    def up(self) -> None:
        out = run(self.command(*self.options, "up"), ROOT, base_env(), timeout=900)
        lines = [line.removeprefix("export ") for line in out.splitlines() if "=" in line]
        self.env = dict(line.split("=", 1) for line in lines if not line.startswith("#"))

    def down(self) -> None:
        subprocess.run(self.command("down"), cwd=ROOT, capture_output=True, timeout=300)

    def use_remote(self, repo: Path) -> None:
        run(self.command("dvc-remote"), repo, base_env(PYTHONPATH=str(ROOT)))


# ---------------------------------------------------------------- 1. epoch logging


def epoch_seconds(uri: str, epochs: int) -> list[float]:
    """Seconds `epoch_logger` spends at the end of each epoch, in a run in the store `uri`."""
    import mlflow

    from pipeline import tracking

    mlflow.set_tracking_uri(uri)
    experiment = f"bench-team-{time.time_ns()}"
    experiment_id = mlflow.create_experiment(experiment)
    logger = tracking.epoch_logger()
    logs = {"loss": 1.5, "accuracy": 0.4, "val_loss": 1.6, "val_accuracy": 0.38}
    times = []
    with mlflow.start_run(experiment_id=experiment_id):
        for epoch in range(epochs):
            started = time.perf_counter()
            logger.on_epoch_end(epoch, {**logs, "learning_rate": 0.001})
            times.append(time.perf_counter() - started)
    return times


def bench_logging(stack: Stack, folder: Path, epochs: int) -> list[tuple[str, list[float]]]:
    local = epoch_seconds(f"sqlite:///{folder / 'mlflow.db'}", epochs)
    os.environ.update(stack.env)  # the login, for this process's client
    try:
        server = epoch_seconds(stack.env["MLFLOW_TRACKING_URI"], epochs)
    finally:
        for key in stack.env:
            os.environ.pop(key, None)
    return [("local SQLite (`mlflow.db`)", local), ("the team server", server)]


# ---------------------------------------------------------------- 2. dvc push / pull


def processed_data(folder: Path, overrides: dict[str, object]) -> Path:
    """`data/processed` made by the pipeline's own download and preprocess, in `folder`."""
    from pipeline import download, preprocess
    from pipeline.paths import Paths

    params = load_params(ROOT / "params.yaml", overrides=overrides)
    paths = Paths(folder)
    download.run(params.data, paths)
    preprocess.run(params.preprocess, paths)
    shutil.rmtree(paths.raw)
    return paths.processed


def bench_push_pull(stack: Stack, folder: Path, name: str, overrides: dict) -> list[tuple]:
    """Push `data/processed` from one repository and pull it into a clone of it."""
    repo = folder / name / "repo"
    repo.mkdir(parents=True)
    env = base_env()
    run(["git", "init", "-q"], repo, env)
    run([str(BIN / "dvc"), "init", "-q"], repo, env)
    processed = processed_data(folder / name / "made", overrides)
    (repo / "data").mkdir()
    processed.rename(repo / "data" / "processed")
    files = sum(1 for p in (repo / "data" / "processed").rglob("*") if p.is_file())
    megabytes = sum(p.stat().st_size for p in (repo / "data").rglob("*") if p.is_file()) / 1e6
    run([str(BIN / "dvc"), "add", "-q", "data/processed"], repo, env)
    stack.use_remote(repo)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "data"], repo, env)
    started = time.perf_counter()
    run([str(BIN / "dvc"), "push"], repo, env)
    push = time.perf_counter() - started
    other = folder / name / "clone"
    run(["git", "clone", "-q", str(repo), str(other)], folder, env)
    stack.use_remote(other)
    started = time.perf_counter()
    run([str(BIN / "dvc"), "pull"], other, env)
    pull = time.perf_counter() - started
    pulled = sum(1 for p in (other / "data" / "processed").rglob("*") if p.is_file())
    if pulled != files:
        raise SystemExit(f"bench_team: pushed {files} files of {name}, pulled {pulled}")
    return [(name, "push", files, megabytes, push), (name, "pull", files, megabytes, pull)]


# ---------------------------------------------------------------- 3. queued experiments


def project(stack: Stack, folder: Path, overrides: dict[str, object]) -> tuple[Path, dict]:
    """The pipeline in a git repository, reproduced once with its runs on the server."""
    repo = folder / "project"
    shutil.copytree(
        ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    params = load_params(ROOT / "params.yaml", overrides=overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    env = base_env(**stack.env)
    run(["git", "init", "-q"], repo, env)
    run([str(BIN / "dvc"), "init", "-q"], repo, env)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "project"], repo, env)
    run([str(BIN / "dvc"), "repro"], repo, env, timeout=QUEUE_TIMEOUT_SECONDS)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "reproduced"], repo, env)
    return repo, env


def queue_seconds(repo: Path, env: dict[str, str], rates: tuple[str, ...], jobs: int) -> float:
    """Wall time of `dvc queue start -j jobs` running one queued experiment per rate."""
    dvc = str(BIN / "dvc")
    run([dvc, "exp", "run", "--queue", "-S", f"train.learning_rate={','.join(rates)}"], repo, env)
    # the stop after the previous round leaves a shutdown message that the next workers of
    # the same names would take, stopping after one experiment each (README: dvc#10427)
    run([dvc, "exp", "clean"], repo, env)
    started = time.perf_counter()
    try:
        # its output to a file: the workers it leaves running hold it open, a pipe would
        # not close before they end
        with (repo.parent / "queue-start.log").open("ab") as out:
            subprocess.run(
                [dvc, "queue", "start", "-j", str(jobs)], cwd=repo, env=env, stdout=out,
                stderr=subprocess.STDOUT, check=True, timeout=300,
            )  # fmt: skip
        deadline = time.monotonic() + QUEUE_TIMEOUT_SECONDS
        while True:
            status = run([dvc, "queue", "status"], repo, env)
            if "Queued" not in status and "Running" not in status:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"bench_team: the queue did not end:\n{status}")
            time.sleep(2)
    finally:
        subprocess.run([dvc, "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True)
    seconds = time.perf_counter() - started
    if status.count("Success") < len(rates) + (0 if jobs == 1 else len(rates)):
        raise SystemExit(f"bench_team: not every experiment succeeded:\n{status}")
    return seconds


# ---------------------------------------------------------------- the tables


def print_tables(logging_rows, transfer_rows, queue_rows, epochs: int, experiment_epochs: int):
    load = os.getloadavg()
    print(f"CPU: {cpu_description()}; load average {load[0]:.1f} at the end")
    if logging_rows:
        print(
            f"\nEpoch logging (`tracking.epoch_logger`, five curves an epoch, {epochs} epochs):\n"
        )
        print("| store | median per epoch | slowest | all epochs |")
        print("|---|---:|---:|---:|")
        for store, times in logging_rows:
            print(
                f"| {store} | {statistics.median(times) * 1000:.1f} ms "
                f"| {max(times) * 1000:.1f} ms | {sum(times):.2f} s |"
            )
    if transfer_rows:
        print("\n`dvc push` / `dvc pull` of `data/processed` (the stack's SeaweedFS):\n")
        print("| data | command | files | MB | seconds | files/s |")
        print("|---|---|---:|---:|---:|---:|")
        for name, command, files, megabytes, seconds in transfer_rows:
            print(
                f"| {name} | `dvc {command}` | {files} | {megabytes:.1f} | {seconds:.1f} "
                f"| {files / seconds:.0f} |"
            )
    if queue_rows:
        print(
            f"\nFour queued experiments (`-S train.learning_rate=…`, {experiment_epochs} "
            "epoch(s) each; train, evaluate and export run, their runs on the server):\n"
        )
        print("| workers | wall time | per experiment |")
        print("|---|---:|---:|")
        for jobs, seconds in queue_rows:
            print(f"| `dvc queue start -j {jobs}` | {seconds:.0f} s | {seconds / 4:.0f} s |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny data: a quick check")
    parser.add_argument("--log-epochs", type=int, default=50, help="epochs logged per store")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of each experiment")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=("logging", "transfer", "queue"), help="leave out"
    )
    args = parser.parse_args(argv)
    sizes = SMALL if args.small else {}
    archive = os.environ.get("FER_REAL_ARCHIVE")
    folder = Path(tempfile.mkdtemp(prefix="bench-team-"))
    folder.chmod(0o755)  # PostgreSQL's user must reach the stack's folder
    stack = Stack(folder)
    logging_rows, transfer_rows, queue_rows = [], [], []
    try:
        stack.up()
        if "logging" not in args.skip:
            logging_rows = bench_logging(stack, folder, args.log_epochs)
        if "transfer" not in args.skip:
            transfer_rows += bench_push_pull(stack, folder, "sample", sizes)
            if archive:
                real = {"data.source": "archive", "data.archive": str(Path(archive).resolve())}
                transfer_rows += bench_push_pull(stack, folder, "real archive", real)
        if "queue" not in args.skip:
            repo, env = project(stack, folder, {**sizes, "train.epochs": args.epochs})
            queue_rows = [
                (jobs, queue_seconds(repo, env, RATES[i], jobs)) for i, jobs in enumerate((1, 2))
            ]
    finally:
        stack.down()
        shutil.rmtree(folder, ignore_errors=True)
    print_tables(logging_rows, transfer_rows, queue_rows, args.log_epochs, args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
