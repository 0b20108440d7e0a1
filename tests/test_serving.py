"""The pyfunc model: in-process, logged into a real MLflow store, and behind the real
scoring server (`mlflow models serve`) answering JSON over HTTP."""

from __future__ import annotations

import base64
import importlib.metadata
import io
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import cv2
import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import (
    ROOT,
    free_port,
    stop_process_group,
    subprocess_env,
    third_party_imports,
    untrained_model,
    wait_for_http,
)
from mlflow.pyfunc import PythonModelContext
from mlflow.pyfunc.scoring_server import predictions_to_json
from PIL import Image
from skimage import data

from pipeline import CLASSES
from pipeline.params import load_params
from pipeline.predictor import load_predictor
from pipeline.sample import draw_image
from pipeline.serving import (
    MODEL_ARTIFACT,
    EmotionModel,
    log_pyfunc_model,
    output_columns,
    pip_requirements,
    served_modules,
)

PARAMS = load_params(ROOT / "params.yaml")
REGISTERED = "fer-test-emotion"


def encode(rgb_or_gray: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb_or_gray).save(buffer, fmt)
    return buffer.getvalue()


def strict_json(text: str):
    """JSON as a strict parser reads it: NaN or Infinity is an error."""

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_model(tmp_path_factory.mktemp("model") / "model.h5", PARAMS.preprocess)


@pytest.fixture(scope="module")
def emotion_model(model_path: Path) -> EmotionModel:
    model = EmotionModel()
    model.load_context(PythonModelContext({MODEL_ARTIFACT: str(model_path)}, None))
    return model


@pytest.fixture(scope="module")
def pictures() -> dict[str, bytes]:
    crop = draw_image("happy", np.random.default_rng(1), 48)
    return {
        "astronaut": encode(data.astronaut()),
        "astronaut_jpeg": encode(data.astronaut(), "JPEG"),
        "brick": encode(data.brick()),
        "crop": encode(crop),
    }


def test_pictures_as_bytes_base64_and_arrays(
    emotion_model: EmotionModel, pictures: dict[str, bytes]
) -> None:
    frame = pd.DataFrame(
        {
            "image": [
                pictures["astronaut"],
                base64.encodebytes(pictures["astronaut"]).decode("ascii"),  # with newlines
                data.astronaut(),  # H×W×3 RGB
                cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2GRAY),  # H×W
                pictures["brick"],
                b"GIF? no, just bytes",
            ]
        }
    )

    out = emotion_model.predict(None, frame)

    assert list(out.columns) == output_columns(CLASSES)
    assert out["input_index"].tolist() == [0, 1, 2, 3, 4, 5]
    faces = out.iloc[:4]
    assert faces["faces"].tolist() == [1, 1, 1, 1] and faces["face"].tolist() == [0, 0, 0, 0]
    assert faces["error"].isna().all()
    probabilities = faces[list(CLASSES)].astype(float)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert faces["label"].tolist() == [CLASSES[i] for i in probabilities.to_numpy().argmax(1)]
    assert out.loc[1, "box"] == out.loc[0, "box"]
    np.testing.assert_allclose(probabilities.iloc[1], probabilities.iloc[0], atol=1e-7)
    for row in (2, 3):  # the same photo from arrays: same face, within rounding of the grays
        assert np.abs(np.subtract(out.loc[row, "box"], out.loc[0, "box"])).max() <= 3
        np.testing.assert_allclose(probabilities.iloc[row], probabilities.iloc[0], atol=2e-3)

    brick = out.loc[4]
    assert brick["faces"] == 0 and brick["error"] is None
    assert brick["face"] is None and brick["label"] is None and brick["box"] is None
    assert all(brick[name] is None for name in CLASSES)

    broken = out.loc[5]
    assert broken["faces"] is None and broken["label"] is None
    assert "not an image" in broken["error"]


def test_bare_arrays_are_pictures(emotion_model: EmotionModel) -> None:
    gray = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2GRAY)

    one = emotion_model.predict(None, gray)
    batch = emotion_model.predict(None, np.stack([data.astronaut(), data.astronaut()]))

    assert one["input_index"].tolist() == [0] and one.loc[0, "faces"] == 1
    assert batch["input_index"].tolist() == [0, 1] and batch["faces"].tolist() == [1, 1]
    with pytest.raises(TypeError, match="DataFrame"):
        emotion_model.predict(None, "astronaut.png")
    with pytest.raises(ValueError, match="'image'"):
        emotion_model.predict(None, pd.DataFrame({"picture": [b""]}))


def test_detect_false_by_column_or_param(
    emotion_model: EmotionModel, pictures: dict[str, bytes]
) -> None:
    astronaut = pictures["astronaut"]
    by_column = emotion_model.predict(
        None, pd.DataFrame({"image": [astronaut, pictures["crop"]], "detect": [True, False]})
    )
    by_param = emotion_model.predict(
        None, pd.DataFrame({"image": [pictures["crop"]]}), params={"detect": False}
    )

    assert by_column.loc[0, "box"] != [0, 0, 512, 512] and by_column.loc[0, "angle"] is not None
    assert by_column.loc[1, "box"] == [0, 0, 48, 48] and by_column.loc[1, "angle"] is None
    assert by_param.loc[0, "box"] == [0, 0, 48, 48]
    np.testing.assert_allclose(
        by_param.loc[0, list(CLASSES)].astype(float), by_column.loc[1, list(CLASSES)].astype(float)
    )


def test_answers_serialise_to_strict_json(
    emotion_model: EmotionModel, pictures: dict[str, bytes]
) -> None:
    out = emotion_model.predict(
        None, pd.DataFrame({"image": [pictures["astronaut"], pictures["brick"], b"junk"]})
    )
    buffer = io.StringIO()

    predictions_to_json(out, buffer)  # what the scoring server sends

    rows = strict_json(buffer.getvalue())["predictions"]
    assert [r["faces"] for r in rows] == [1, 0, None]
    assert rows[1]["label"] is None and rows[1]["happy"] is None
    assert isinstance(rows[0]["box"], list) and isinstance(rows[0]["happy"], float)


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, model_path: Path):
    """The model logged (and registered) in a fresh MLflow store; its run id and store URI."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("serving", artifact_location=str(root / "artifacts"))
    with mlflow.start_run(experiment_id=experiment) as active:
        info = log_pyfunc_model(model_path, registered_model_name=REGISTERED)
    yield active.info.run_id, uri, root, info
    mlflow.set_tracking_uri(None)


def test_logged_model_holds_weights_code_signature_and_example(logged) -> None:
    run_id, _, root, info = logged
    local = Path(
        mlflow.artifacts.download_artifacts(f"runs:/{run_id}/emotion_model", dst_path=root / "dl")
    )

    assert (local / "artifacts" / "model.h5").is_file()
    packed = {path.stem for path in (local / "code" / "pipeline").glob("*.py")}
    assert packed == {"__init__", *(name.split(".")[1] for name in served_modules())}
    assert {"serving", "predictor", "inference", "imageops", "faces"} <= packed
    # neither the stages nor the research tools ship with the served model
    assert not packed & {"train", "evaluate", "predict", "tracking", "bench", "runs", "recipes"}
    signature = info.signature
    assert signature.inputs.input_names() == ["image", "detect"]
    assert signature.inputs.input_types()[0].name == "binary"
    assert [p.name for p in signature.params.params] == ["detect", "tta"]
    assert signature.outputs.input_names() == output_columns(CLASSES)
    assert (local / "serving_input_example.json").is_file()
    requirements = (local / "requirements.txt").read_text().splitlines()
    for name in ("keras", "mlflow", "opencv-python-headless", "h5py", "pydantic"):
        assert any(line.startswith(f"{name}==") for line in requirements), requirements
    assert any(
        line.startswith(("tensorflow==", "tensorflow-cpu==", "tensorflow_cpu=="))
        for line in requirements
    )


def test_loaded_pyfunc_predicts_like_the_class(
    logged, emotion_model: EmotionModel, pictures: dict[str, bytes]
) -> None:
    run_id = logged[0]
    frame = pd.DataFrame({"image": [pictures["astronaut"], pictures["brick"]]})

    loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/emotion_model")

    pd.testing.assert_frame_equal(loaded.predict(frame), emotion_model.predict(None, frame))
    assert isinstance(loaded.unwrap_python_model(), EmotionModel)
    arrays = loaded.unwrap_python_model().predict(None, data.astronaut())
    assert arrays.loc[0, "faces"] == 1


def test_registered_model_loads_by_version_and_alias(logged) -> None:
    client = mlflow.MlflowClient()
    [version] = client.search_model_versions(f"name='{REGISTERED}'")
    client.set_registered_model_alias(REGISTERED, "champion", version.version)

    for uri in (f"models:/{REGISTERED}/{version.version}", f"models:/{REGISTERED}@champion"):
        predictor = load_predictor(uri)
        assert predictor.classes == CLASSES
        assert predictor.info.preprocess == PARAMS.preprocess


def test_unstamped_model_or_no_run_is_refused(logged, tmp_path: Path, model_path: Path) -> None:
    path = tmp_path / "plain.h5"
    keras.Sequential([keras.Input((48, 48, 1))]).save(path)
    experiment = mlflow.get_experiment_by_name("serving").experiment_id
    with (
        mlflow.start_run(experiment_id=experiment),
        pytest.raises(ValueError, match="fer_pipeline"),
    ):
        log_pyfunc_model(path)
    with pytest.raises(RuntimeError, match="active run"):
        log_pyfunc_model(model_path)


@pytest.mark.slow
def test_scoring_server_answers_json(logged, pictures: dict[str, bytes]) -> None:
    run_id, uri, root, _ = logged
    port = free_port()
    log_path = root / "server.log"
    command = [
        str(Path(sys.executable).with_name("mlflow")), "models", "serve",
        "-m", f"runs:/{run_id}/emotion_model", "--env-manager", "local",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            command,
            cwd=root,
            env=subprocess_env(MLFLOW_TRACKING_URI=uri, TF_CPP_MIN_LOG_LEVEL="2"),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, 240, log_path)
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [
                    [base64.b64encode(pictures["astronaut_jpeg"]).decode("ascii")],
                    [base64.b64encode(pictures["brick"]).decode("ascii")],
                ],
            }
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = strict_json(response.read().decode())
    finally:
        stop_process_group(server)

    face, landscape = answer["predictions"]
    assert face["input_index"] == 0 and face["faces"] == 1 and face["error"] is None
    x, y, w, h = face["box"]
    assert 190 <= x + w / 2 <= 260 and 80 <= y + h / 2 <= 150, face["box"]
    assert sum(face[name] for name in CLASSES) == pytest.approx(1.0, abs=1e-4)
    assert face["label"] == max(CLASSES, key=lambda name: face[name])
    assert landscape["input_index"] == 1 and landscape["faces"] == 0
    assert landscape["label"] is None and landscape["error"] is None


def test_the_requirements_name_every_distribution_the_served_code_imports() -> None:
    """What `mlflow models serve` installs in a fresh environment is the logged requirements
    alone: each import of the packed modules must come from one of them."""
    provided = importlib.metadata.packages_distributions()
    required = {line.split("==")[0].lower().replace("_", "-") for line in pip_requirements()}
    imported = set().union(*(third_party_imports(m) for m in served_modules()))
    assert {"cv2", "mlflow", "numpy", "keras"} <= imported
    for name in sorted(imported):
        distributions = {d.lower().replace("_", "-") for d in provided.get(name, [])}
        assert distributions & required, f"{name} ({distributions}) is not in {required}"


def test_served_modules_follow_function_level_imports_too() -> None:
    modules = served_modules()
    assert modules[0] == "pipeline.atomic" and "pipeline.serving" in modules
    assert "pipeline.predictor" in modules  # imported at the top of serving
    assert "pipeline.inference" in modules  # imported by predictor
    assert "pipeline.train" not in modules


_LOAD_IN_A_FRESH_PROCESS = """
import json, sys
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.unwrap_python_model().predict(None, [bytes.fromhex(sys.argv[2])], {"detect": False})
loaded = sorted(m for m in sys.modules if m.startswith("pipeline"))
files = {m: getattr(sys.modules[m], "__file__", None) for m in loaded}
print(json.dumps({"label": out.loc[0, "label"], "files": files}))
"""


@pytest.mark.slow
def test_the_served_model_loads_in_a_fresh_process_from_its_packed_code_alone(
    logged, tmp_path: Path, pictures: dict[str, bytes]
) -> None:
    run_id, uri, _, _ = logged
    local = Path(
        mlflow.artifacts.download_artifacts(
            f"runs:/{run_id}/emotion_model", dst_path=tmp_path / "model", tracking_uri=uri
        )
    )
    # not the checkout's package: an empty PYTHONPATH, run from elsewhere
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_A_FRESH_PROCESS, str(local), pictures["crop"].hex()],
        cwd=tmp_path,
        env=subprocess_env(PYTHONPATH=None),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["label"] in CLASSES
    files = {m: f for m, f in result["files"].items() if f}
    assert files, "the model imported no pipeline module"
    for module, file in files.items():
        assert Path(file).is_relative_to(local / "code"), f"{module} came from {file}"
