"""The export stage: model.h5 to model.onnx, checked face by face; fer-predict runs the ONNX
model without TensorFlow; files that are not such a model are refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import ROOT, subprocess_env, tiny_params, untrained_model

from pipeline import export
from pipeline.inference import OnnxModel, load_model
from pipeline.paths import Paths
from pipeline.predictor import ModelError, Predictor, load_predictor

pytestmark = pytest.mark.usefixtures("float32_policy")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_data: Paths) -> Paths:
    """The seed CNN saved in bfloat16 compute (as CPU training saves it), exported."""
    root = tmp_path_factory.mktemp("export")
    (root / "data").symlink_to(tiny_data.root / "data", target_is_directory=True)
    paths = Paths(root)
    paths.models.mkdir()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        untrained_model(paths.model, tiny_params().preprocess)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    export.run(tiny_params(), paths)
    return paths


@pytest.mark.slow
def test_the_export_repeats_the_keras_model_in_float32_on_every_validation_face(
    exported: Paths,
) -> None:
    report = json.loads(exported.export_report.read_text())
    assert report["faces"] == 70
    for name in ("onnx", "litert"):
        assert report[name]["vs_keras_float32"]["max_abs_difference"] < 1e-4, name
        assert report[name]["vs_keras_float32"]["label_agreement"] == 1.0, name
        # against its own bfloat16 inference it differs more; the report says by how much
        trained = report[name]["vs_keras_trained_precision"]["max_abs_difference"]
        assert trained > report[name]["vs_keras_float32"]["max_abs_difference"], name

    model = OnnxModel(exported.onnx_model)
    assert model.input_shape == (None, 48, 48, 1) and model.output_shape == (None, 7)
    assert oct(exported.onnx_model.stat().st_mode)[-3:] != "600"  # readable by others
    assert exported.litert_model.read_bytes()[4:8] == b"TFL3"  # a LiteRT flatbuffer


@pytest.mark.slow
def test_a_model_that_crops_its_input_exports_exactly_too(tmp_path: Path, tiny_data: Paths):
    # keras.layers.CenterCrop exported to ONNX off by 0.15; the crop is a Cropping2D
    (tmp_path / "data").symlink_to(tiny_data.root / "data", target_is_directory=True)
    paths = Paths(tmp_path)
    paths.models.mkdir()
    untrained_model(paths.model, tiny_params().preprocess, arch="resnet", crop=40)

    report = export.run(tiny_params(), paths)

    for name in ("onnx", "litert"):
        assert report[name]["vs_keras_float32"]["max_abs_difference"] < 1e-4, name
    assert OnnxModel(paths.onnx_model).input_shape == (None, 48, 48, 1)


@pytest.mark.slow
def test_the_onnx_model_carries_the_model_info_and_predicts_like_keras_in_float32(
    exported: Paths,
) -> None:
    from_onnx = load_predictor(exported.onnx_model)
    from_h5 = load_predictor(exported.model)
    assert from_onnx.info == from_h5.info
    keras_float32 = Predictor(export.float32_copy(from_h5.model), from_h5.info)
    faces = list(np.random.default_rng(0).integers(0, 256, (5, 48, 48)).astype(np.uint8))
    for tta in (False, True):
        np.testing.assert_allclose(
            from_onnx.probabilities(faces, tta), keras_float32.probabilities(faces, tta), atol=1e-4
        )


_PREDICT_WITHOUT_TENSORFLOW = """
import sys
from pipeline.predict import main
status = main(sys.argv[1:])
print("imported:", sorted({m.split(".")[0] for m in sys.modules} & {"tensorflow", "keras"}))
sys.exit(status)
"""


@pytest.mark.slow
def test_fer_predict_runs_the_onnx_model_without_tensorflow(exported: Paths) -> None:
    crops = exported.processed / "validation"
    face = sorted(crops.glob("*/*.png"))[0]
    command = [sys.executable, "-c", _PREDICT_WITHOUT_TENSORFLOW, str(face), "--no-detect"]
    onnx = subprocess.run(
        [*command, "--model", str(exported.onnx_model)],
        env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    keras_run = subprocess.run(
        [*command, "--model", str(exported.model)],
        env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert onnx.returncode == 0, onnx.stderr[-2000:]
    assert "imported: []" in onnx.stdout
    assert "imported: ['keras', 'tensorflow']" in keras_run.stdout
    (from_onnx,) = [json.loads(line) for line in onnx.stdout.splitlines() if line.startswith("{")]
    (from_keras,) = [
        json.loads(line) for line in keras_run.stdout.splitlines() if line.startswith("{")
    ]
    assert from_onnx.keys() == from_keras.keys()  # the same JSON
    assert from_onnx["box"] == from_keras["box"]
    for name, p in from_onnx["probabilities"].items():
        assert p == pytest.approx(from_keras["probabilities"][name], abs=0.05)  # bf16 vs f32


def _onnx_with_input(path: Path, shape: list) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "not-a-face-model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_files_that_are_not_an_exported_face_model_are_refused_by_name(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match=r"junk\.onnx: not a loadable ONNX model"):
        load_predictor(junk)

    flat = _onnx_with_input(tmp_path / "flat.onnx", ["batch", 10])
    with pytest.raises(ModelError, match=r"flat\.onnx: expected one input of shape \[batch, "):
        load_predictor(flat)

    unstamped = _onnx_with_input(tmp_path / "unstamped.onnx", ["batch", 48, 48, 1])
    with pytest.raises(ModelError, match=r"unstamped\.onnx: has no 'fer_pipeline' stamp"):
        load_predictor(unstamped)


def test_a_missing_model_h5_fails_the_stage_with_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model\.h5: no model; run the train stage"):
        export.run(tiny_params(), Paths(tmp_path))
    assert not Paths(tmp_path).onnx_model.exists()
    assert not Paths(tmp_path).litert_model.exists()


@pytest.mark.slow
def test_the_exports_join_the_training_run_and_the_onnx_one_is_an_mlflow_model(
    tiny_project: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow import MlflowClient

    from pipeline import train

    paths = tiny_project
    monkeypatch.chdir(paths.root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (paths.root / ".dvc").mkdir()
    params = tiny_params(**{"mlflow.log_model": False})
    train.run_tracked(params, paths)
    run_id = json.loads(paths.run_info.read_text())["run_id"]

    export.run_tracked(params, paths)

    client = MlflowClient(f"sqlite:///{paths.root / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(run_id, "models")}
    assert {"models/model.onnx", "models/model.tflite"} <= logged
    assert {a.path for a in client.list_artifacts(run_id, "reports")} >= {"reports/export.json"}
    models = {
        m.name: m
        for m in client.search_logged_models([run.info.experiment_id])
        if m.source_run_id == run_id
    }
    assert models.keys() == {"onnx_model", "emotion_model_onnx"}  # the pyfunc: test_serving_onnx
    model = models["onnx_model"]
    faces = np.full((2, 48, 48, 1), 128.0, np.float32)
    served = mlflow.pyfunc.load_model(model.model_uri).predict(faces)
    served = next(iter(served.values())) if isinstance(served, dict) else served
    expected = OnnxModel(paths.onnx_model).predict_on_batch(faces)
    np.testing.assert_allclose(np.asarray(served), expected, atol=1e-6)


@pytest.mark.slow
def test_without_a_training_run_the_export_still_happens_and_says_why_it_is_not_logged(
    exported: Paths, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(exported.root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (exported.root / ".dvc").mkdir(exist_ok=True)
    exported.onnx_model.unlink()

    export.run_tracked(tiny_params(), exported)

    assert exported.onnx_model.is_file()
    assert "models/run.json names no MLflow run: the exported models are not logged" in (
        caplog.text
    )


@pytest.mark.slow
def test_two_exports_of_one_model_are_the_same_bytes(exported: Paths) -> None:
    """tf2onnx numbers the names it makes up with a counter that runs on in a process;
    `canonical_onnx` renumbers them, so DVC's hash of the output depends on the model."""
    model = export.float32_copy(load_model(exported.model))
    assert export.onnx_bytes(model, "{}") == export.onnx_bytes(model, "{}")
