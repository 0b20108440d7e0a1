"""The pyfunc model on the ONNX export, as the export stage logs it: requirements without
TensorFlow, a process that never imports it, and `mlflow models serve` with its default
environment manager, which builds a fresh virtualenv from those requirements alone."""

from __future__ import annotations

import base64
import importlib.metadata
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import (
    REQUIRE_VARIABLE,
    free_port,
    require_binary,
    stop_process_group,
    subprocess_env,
    third_party_imports,
    tiny_params,
    wait_for_http,
)
from mlflow.pyfunc import PythonModelContext
from mlflow.pyfunc.scoring_server import predictions_to_json
from PIL import Image
from skimage import data

from pipeline import CLASSES
from pipeline.inference import OnnxModel
from pipeline.paths import Paths
from pipeline.predictor import load_predictor
from pipeline.serving import MODEL_ARTIFACT, EmotionModel, pip_requirements, served_modules

MODEL_NAME = "emotion_model_onnx"  # tracking.ONNX_PYFUNC_MODEL_NAME
TENSORFLOW = {"tensorflow", "keras", "h5py", "mtcnn"}  # imports of the Keras path alone


def encode(picture, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pictures() -> list[bytes]:
    """A photo with one face, one without any, and bytes that are no image."""
    return [encode(data.astronaut(), "JPEG"), encode(data.brick(), "PNG"), b"no image"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_data: Paths):
    """A tiny model trained and exported through the stages' own tracking, into the
    project's local store: its paths, the training run's id and the store's URI."""
    from pipeline import export, train

    root = tmp_path_factory.mktemp("onnx-serving")
    (root / "data").symlink_to(tiny_data.root / "data", target_is_directory=True)
    (root / "reports").mkdir()
    (root / "reports" / "data.json").write_bytes(tiny_data.data_report.read_bytes())
    (root / ".dvc").mkdir()
    paths = Paths(root)
    params = tiny_params(**{"mlflow.log_model": False})
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        train.run_tracked(params, paths)
        export.run_tracked(params, paths)
    run_id = json.loads(paths.run_info.read_text())["run_id"]
    return paths, run_id, f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture(scope="module")
def downloaded(exported, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run_id, uri = exported
    return Path(
        mlflow.artifacts.download_artifacts(
            f"runs:/{run_id}/{MODEL_NAME}",
            dst_path=tmp_path_factory.mktemp("onnx-model"),
            tracking_uri=uri,
        )
    )


def in_process(onnx_model: Path, pictures: list[bytes]) -> list[dict]:
    """What `EmotionModel` answers in this process, as the scoring server writes it."""
    model = EmotionModel()
    model.load_context(PythonModelContext({MODEL_ARTIFACT: str(onnx_model)}, None))
    buffer = io.StringIO()
    predictions_to_json(model.predict(None, pd.DataFrame({"image": pictures})), buffer)
    return json.loads(buffer.getvalue())["predictions"]


def assert_same_answers(answer: list[dict], expected: list[dict]) -> None:
    assert [row["faces"] for row in answer] == [1, 0, None]
    assert len(answer) == len(expected)
    for row, want in zip(answer, expected, strict=True):
        assert {k: v for k, v in row.items() if k not in CLASSES} == {
            k: v for k, v in want.items() if k not in CLASSES
        }
        for name in CLASSES:
            assert row[name] == pytest.approx(want[name], abs=1e-6), name


def requirement_names(folder: Path) -> set[str]:
    lines = (folder / "requirements.txt").read_text().splitlines()
    return {line.split("==")[0].lower().replace("_", "-") for line in lines if line}


def test_an_onnx_models_requirements_name_no_tensorflow_unless_its_detector_runs_on_it():
    def names(detector: str) -> set[str]:
        lines = pip_requirements(".onnx", detector)
        return {line.split("==")[0].lower().replace("_", "-") for line in lines}

    keras = {line.split("==")[0] for line in pip_requirements(".h5")}
    for detector in ("auto", "yunet", "haar"):
        assert not names(detector) & {*TENSORFLOW, "tensorflow-cpu", "mlflow"}, detector
        assert {"mlflow-skinny", "onnxruntime", "opencv-python-headless"} <= names(detector)
    assert "yuface" not in names("haar")
    assert {"mtcnn", "tensorflow-cpu"} & names("mtcnn") and "keras" not in names("mtcnn")
    assert {"keras", "h5py", "mtcnn", "mlflow"} <= keras  # the Keras model's stay
    with pytest.raises(ValueError, match="model format"):
        pip_requirements(".tflite")


@pytest.mark.slow
def test_the_export_logs_the_onnx_file_as_a_pyfunc_model(
    exported, downloaded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, run_id, uri = exported
    held = {p.name for p in (downloaded / "artifacts").iterdir()}
    assert held == {"model.onnx"}
    assert (downloaded / "artifacts" / "model.onnx").read_bytes() == paths.onnx_model.read_bytes()
    packed = {p.stem for p in (downloaded / "code" / "pipeline").glob("*.py")}
    assert packed == {"__init__", *(name.split(".")[1] for name in served_modules())}
    required = requirement_names(downloaded)
    assert {"mlflow-skinny", "onnxruntime", "cloudpickle"} <= required
    assert not required & {*TENSORFLOW, "tensorflow-cpu", "mlflow"}, required

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # fer-predict --model runs:/…, too
    predictor = load_predictor(f"runs:/{run_id}/{MODEL_NAME}")
    assert isinstance(predictor.model, OnnxModel) and predictor.classes == CLASSES


# The logged model loaded as `mlflow models serve` loads it, TensorFlow, Keras, h5py and
# MTCNN made unimportable; it answers, and says what it imported.
_SERVE_WITH_TENSORFLOW_BLOCKED = """
import importlib.abc, json, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"tensorflow", "keras", "h5py", "mtcnn"}:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Blocked())
import mlflow, pandas
from mlflow.pyfunc.scoring_server import predictions_to_json

model = mlflow.pyfunc.load_model(sys.argv[1])
pictures = [open(path, "rb").read() for path in sys.argv[2:]]
predictions_to_json(model.predict(pandas.DataFrame({"image": pictures})), sys.stdout)
print()
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


@pytest.mark.slow
def test_the_onnx_pyfunc_answers_with_tensorflow_blocked_and_imports_only_its_requirements(
    exported, downloaded: Path, tmp_path: Path, pictures: list[bytes]
) -> None:
    paths, _, _ = exported
    files = []
    for index, picture in enumerate(pictures):
        files.append(tmp_path / f"picture-{index}")
        files[-1].write_bytes(picture)
    done = subprocess.run(
        [sys.executable, "-c", _SERVE_WITH_TENSORFLOW_BLOCKED, str(downloaded), *map(str, files)],
        cwd=tmp_path,  # not the checkout: the packed code alone
        env=subprocess_env(PYTHONPATH=None),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer, modules = done.stdout.strip().splitlines()[-2:]
    assert_same_answers(json.loads(answer)["predictions"], in_process(paths.onnx_model, pictures))

    # every distribution whose modules the served code imported is a logged requirement
    imported = set(json.loads(modules))
    assert not imported & TENSORFLOW
    named = set().union(*(third_party_imports(m) for m in served_modules())) & imported
    assert {"cv2", "onnxruntime", "mlflow", "numpy", "pandas", "PIL", "yaml"} <= named
    provided = importlib.metadata.packages_distributions()
    required = requirement_names(downloaded)
    for name in sorted(named):
        distributions = {d.lower().replace("_", "-") for d in provided.get(name, [])}
        assert distributions & required, f"{name} ({distributions}) is not in {required}"


def _require_pyenv_with_this_python() -> None:
    """MLflow's default environment manager, virtualenv, takes the model's Python (the
    version it was logged with) from pyenv, which builds a missing one from python.org's
    sources: on our machines pyenv holds it; elsewhere the test skips."""
    pyenv = require_binary("pyenv", "https://github.com/pyenv/pyenv#installation")
    listed = subprocess.run(
        [pyenv, "versions", "--bare"], capture_output=True, text=True, check=True
    ).stdout.split()
    if platform.python_version() not in listed:
        message = f"pyenv has no Python {platform.python_version()} (it has {listed})"
        if os.environ.get(REQUIRE_VARIABLE):
            pytest.fail(f"{message}, and {REQUIRE_VARIABLE} is set")
        pytest.skip(message)


@pytest.mark.slow
def test_mlflow_models_serve_builds_its_own_environment_and_answers_as_in_process(
    exported, tmp_path: Path, pictures: list[bytes]
) -> None:
    paths, run_id, uri = exported
    _require_pyenv_with_this_python()
    # the environment, pip's cache and MLflow's downloads under tmp_path, removed after
    envs, cache, scratch = tmp_path / "envs", tmp_path / "pip-cache", tmp_path / "tmp"
    scratch.mkdir()
    port = free_port()
    log_path = tmp_path / "server.log"
    command = [
        str(Path(sys.executable).with_name("mlflow")), "models", "serve",
        "-m", f"runs:/{run_id}/{MODEL_NAME}", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    env = subprocess_env(
        MLFLOW_TRACKING_URI=uri,
        MLFLOW_ENV_ROOT=str(envs),
        PIP_CACHE_DIR=str(cache),
        TMPDIR=str(scratch),
        PYTHONPATH=None,
    )
    started = time.monotonic()
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, 900, log_path)
        ready = time.monotonic() - started
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(picture).decode("ascii")] for picture in pictures],
            }
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read().decode())["predictions"]
    finally:
        stop_process_group(server)
        for folder in (envs, cache, scratch):
            shutil.rmtree(folder, ignore_errors=True)

    print(f"mlflow models serve: environment built and serving after {ready:.0f} s")
    log_text = log_path.read_text(errors="replace")
    assert "Creating a new environment" in log_text  # not this Python's site-packages
    assert "tensorflow" not in log_text.lower()  # nothing of it installed
    assert_same_answers(answer, in_process(paths.onnx_model, pictures))
