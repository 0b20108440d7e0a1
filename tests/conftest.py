"""Shared fixtures: a real MLflow tracking server on loopback, and a tiny dataset.

The server and the dataset are made once per session; each test that trains
links the dataset into its own project folder, so its outputs stay its own.
"""

from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.params import Params, PreprocessParams, load_params, to_dict
from pipeline.paths import Paths

ROOT = Path(__file__).resolve().parents[1]

# ~10 images per class and split, one epoch: enough to exercise every stage
TINY = {
    "data.sample_train_images": 70,
    "data.sample_validation_images": 70,
    "data.sample_test_images": 35,
    "preprocess.workers": 1,
    "train.epochs": 1,
    "train.batch_size": 32,
}


def tiny_params(**overrides: object) -> Params:
    """The project's params.yaml with tiny data and one epoch; dotted keys override more."""
    return load_params(ROOT / "params.yaml", overrides={**TINY, **overrides})


def write_params(path: Path, params: Params) -> Path:
    path.write_text(yaml.safe_dump(to_dict(params), sort_keys=False), encoding="utf-8")
    return path


# CI has no git identity: every test that commits gives this one to git and DVC.
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def git(cwd: Path, *args: str) -> str:
    """Run git in `cwd` with the test identity; its output, stripped."""
    done = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env=subprocess_env(**GIT_IDENTITY),
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def untrained_model(path: Path, preprocess: PreprocessParams, **model: object) -> Path:
    """The seed CNN (or `model.*` as given), untrained (seed 0), saved as .h5 and stamped
    with `preprocess`."""
    import keras

    from pipeline import CLASSES
    from pipeline.modelmeta import info_for, write_model_info
    from pipeline.models import build_model

    keras.utils.set_random_seed(0)
    size = preprocess.picture_size
    model_params = tiny_params().model.model_copy(update={"arch": "seed", **model})
    build_model(model_params, (size, size, 1), len(CLASSES)).save(path)
    write_model_info(path, info_for(preprocess, model_params.arch))
    return path


@pytest.fixture
def float32_policy():
    """Stages set Keras' global dtype policy; a test using this starts and ends in float32."""
    import keras

    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def subprocess_env(**changes: str | None) -> dict[str, str]:
    """This environment for a child `python -m pipeline.*`: the project importable, this
    Python's tools first on PATH, no DVC or MLflow variables leaking in; `changes` on top
    (None removes a variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_TRACKING"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float, log_file: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log_file.read_text(errors="replace")[-3000:]
            pytest.fail(f"{process.args[:4]} exited with {process.returncode}:\n{output}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s")


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the group the process leads (server and its workers), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on loopback with the SQLite store and proxied artifacts in `folder`
    (kept, so a restart finds its runs), once it answers; it leads its process group."""
    log_file = folder / "server.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", str(folder / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=folder,
            env=subprocess_env(),
            start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process, 120, log_file)
    except BaseException:
        stop_process_group(process)
        raise
    return process


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """URI of an `mlflow server` on loopback with a SQLite store and proxied artifacts."""
    port = free_port()
    process = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(process)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """`data/raw`, `data/processed` and `reports/data.json` of the tiny sample, made once."""
    from pipeline import download, preprocess

    paths = Paths(tmp_path_factory.mktemp("tiny-data"))
    params = tiny_params()
    download.run(params.data, paths)
    preprocess.run(params.preprocess, paths)
    return paths


@pytest.fixture
def tiny_project(tmp_path: Path, tiny_data: Paths) -> Paths:
    """A project folder of this test's own whose `data/` is the tiny dataset (linked)."""
    (tmp_path / "data").symlink_to(tiny_data.root / "data", target_is_directory=True)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "data.json").write_bytes(tiny_data.data_report.read_bytes())
    return Paths(tmp_path)


# The longest modules (minutes of both cores each, most of the suite's time) run first:
# `make test` hands whole modules to its workers in this order (pytest-xdist's
# `--dist loadfile --no-loadscope-reorder`), so none of them starts last, alone.
LONGEST_FIRST = ("test_team.py", "test_tracking.py", "test_pipeline_e2e.py", "test_train.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts the MLflow server carries `slow`, as every test that trains or
    starts a server does, so that `pytest -m "not slow"` stays the quick loop. The
    longest modules go first (the sort keeps every module's own order)."""
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
    unmarked = [
        item.nodeid
        for item in items
        if "mlflow_server" in getattr(item, "fixturenames", ())
        and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "mark these @pytest.mark.slow (they start the mlflow_server fixture): "
            + ", ".join(unmarked)
        )


REQUIRE_VARIABLE = "FER_REQUIRE_TOOLS"  # set by .ci/run: our machines have every tool


def require_binary(name: str, install: str) -> str:
    """The path of a program a test needs; skip without it, or fail where CI says all
    are installed (`FER_REQUIRE_TOOLS=1`)."""
    import shutil

    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed ({install})"
    if os.environ.get(REQUIRE_VARIABLE):
        pytest.fail(f"{message}, and {REQUIRE_VARIABLE} is set")
    pytest.skip(message)


def third_party_imports(module: str) -> set[str]:
    """The top-level names every import statement of `module` names, at any depth."""
    tree = ast.parse((ROOT / "pipeline" / f"{module.split('.')[1]}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"pipeline", "__future__"}
