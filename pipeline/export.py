"""Stage `export`: `models/model.onnx` and `models/model.tflite` from `models/model.h5`.

Both are exported in float32 whatever precision the model was trained in (ONNX
Runtime and LiteRT have no bfloat16 kernels for most ops), through Keras 3's
`model.export(format="onnx" | "litert")`. The ONNX model is stamped with the same
model info as `model.h5` (an ONNX metadata entry), so `fer-predict --model
models/model.onnx` prepares faces as in training, without TensorFlow. The stage
scores every validation face with each export and writes how far they differ to
`reports/export.json`: from the Keras model run in float32 (the exports' own
arithmetic) and in its trained precision (what `evaluate` measured).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from pipeline import tracking
from pipeline.atomic import write_bytes_atomic, write_json_atomic
from pipeline.cli import run_stage
from pipeline.inference import OnnxModel, load_model, predict_probabilities
from pipeline.logs import native_quiet
from pipeline.modelmeta import ATTRIBUTE, encode_info, read_model_info
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.tracking import TrackingError

log = logging.getLogger(__name__)

OPSET = 17  # ONNX Runtime 1.16 and newer run it


def float32_copy(model):
    """The same layers and weights, every layer computing in float32."""

    def float32(config):
        if isinstance(config, dict):
            if config.get("class_name") == "DTypePolicy":
                return {**config, "config": {**config["config"], "name": "float32"}}
            return {key: float32(value) for key, value in config.items()}
        if isinstance(config, list):
            return [float32(value) for value in config]
        return config

    copy = model.__class__.from_config(float32(model.get_config()))
    copy.set_weights(model.get_weights())
    return copy


# the names tf2onnx makes up, `Transpose__84:0`, `const_starts__11`: numbered by a counter
# that depends on what the process converted before, and prefixed by whichever use of a
# shared constant came first
_MADE_UP_NAME = re.compile(r"^.*__\d+(?P<output>:\d+)?$")


def canonical_onnx(exported):
    """The same graph with the names tf2onnx made up renumbered in the order the nodes use
    them, initializers in that order too, so that the bytes depend on the graph alone."""
    graph = exported.graph
    renamed: dict[str, str] = {}

    def name(old: str) -> str:
        made_up = _MADE_UP_NAME.match(old)
        if made_up is None:
            return old
        if old not in renamed:
            renamed[old] = f"tf2onnx__{len(renamed)}{made_up['output'] or ''}"
        return renamed[old]

    for node in graph.node:
        node.input[:] = [name(n) for n in node.input]
        node.output[:] = [name(n) for n in node.output]
        node.name = name(node.name)
    for tensor in (*graph.initializer, *graph.value_info):
        tensor.name = name(tensor.name)
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:  # the batch size: `unk__104`
            if dim.WhichOneof("value") == "dim_param":
                dim.dim_param = name(dim.dim_param)
    order = {n: i for i, n in enumerate(n for node in graph.node for n in node.input)}
    tensors = sorted(graph.initializer, key=lambda t: (order.get(t.name, len(order)), t.name))
    graph.ClearField("initializer")
    graph.initializer.extend(tensors)
    graph.doc_string = "exported by python -m pipeline.export"
    return exported


def onnx_bytes(model, info_json: str) -> bytes:
    """`model` as ONNX, with `info_json` as its `ATTRIBUTE` metadata entry."""
    import onnx

    model.predict_on_batch(np.zeros((1, *model.input_shape[1:]), np.float32))  # built
    with tempfile.TemporaryDirectory(prefix="fer-export-") as folder:
        path = Path(folder) / "model.onnx"
        with warnings.catch_warnings():  # tf2onnx's own use of np.object
            warnings.simplefilter("ignore", FutureWarning)
            model.export(str(path), format="onnx", verbose=False, opset_version=OPSET)
        exported = canonical_onnx(onnx.load(str(path)))
    entry = exported.metadata_props.add()
    entry.key, entry.value = ATTRIBUTE, info_json
    return exported.SerializeToString()


def litert_bytes(model) -> bytes:
    with tempfile.TemporaryDirectory(prefix="fer-export-") as folder:
        path = Path(folder) / "model.tflite"
        with native_quiet():  # the converter logs every step from C++
            model.export(str(path), format="litert", verbose=False)
        return path.read_bytes()


def litert_probabilities(path: Path, images: np.ndarray) -> np.ndarray:
    """Class probabilities from the LiteRT interpreter, one face at a time (the exported
    model takes a batch of one)."""
    from ai_edge_litert.interpreter import Interpreter

    with native_quiet():  # "Created TensorFlow Lite XNNPACK delegate for CPU"
        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    rows = []
    for image in np.asarray(images, np.float32):
        interpreter.set_tensor(source["index"], image[np.newaxis])
        interpreter.invoke()
        rows.append(interpreter.get_tensor(target["index"])[0].copy())
    return np.stack(rows)


def agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    return {
        "max_abs_difference": float(np.abs(reference - other).max()),
        "label_agreement": float(np.mean(reference.argmax(1) == other.argmax(1))),
    }


def run(params: Params, paths: Paths) -> dict:
    """Export `model.h5`, check each export on the validation faces, write the report."""
    from pipeline.dataset import load_split  # TensorFlow: only once the params are good

    trained = load_model(paths.model)
    info = read_model_info(paths.model)
    model = float32_copy(trained)
    write_bytes_atomic(paths.onnx_model, onnx_bytes(model, encode_info(info)))
    write_bytes_atomic(paths.litert_model, litert_bytes(model))

    images = load_split(paths.processed / "validation", params.preprocess.picture_size).array()
    batch = params.evaluate.batch_size
    keras_float32 = predict_probabilities(model, images, batch)
    keras_trained = predict_probabilities(trained, images, batch)
    report: dict = {"faces": len(images)}
    for name, probabilities in (
        ("onnx", predict_probabilities(OnnxModel(paths.onnx_model), images, batch)),
        ("litert", litert_probabilities(paths.litert_model, images)),
    ):
        report[name] = {
            "vs_keras_float32": agreement(keras_float32, probabilities),
            "vs_keras_trained_precision": agreement(keras_trained, probabilities),
        }
        log.info(
            "%s export: on %d validation faces, max |Δp| %.2g and labels %.4f the same as "
            "the Keras model in float32 (%.2g and %.4f against its trained precision)",
            name,
            len(images),
            report[name]["vs_keras_float32"]["max_abs_difference"],
            report[name]["vs_keras_float32"]["label_agreement"],
            report[name]["vs_keras_trained_precision"]["max_abs_difference"],
            report[name]["vs_keras_trained_precision"]["label_agreement"],
        )
    write_json_atomic(paths.export_report, report)
    return report


def run_tracked(params: Params, paths: Paths) -> dict:
    """`run`, its files logged to the training's MLflow run when there is one."""
    with tracking.export_run(params, paths) as tracked:
        report = run(params, paths)
        if tracked:
            tracking.log_exports(paths)
    return report


HASH_SEED = "0"


def main(argv: list[str] | None = None) -> int:
    return run_stage(
        argv,
        stage="export",
        description="Export models/model.h5 to ONNX and LiteRT and check both (stage `export`).",
        work=run_tracked,
        errors=(FileNotFoundError, ValueError, TrackingError),
        tensorflow=True,
    )


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != HASH_SEED:
        # tf2onnx orders parts of the graph by Python's per-process string hashing, so two
        # exports of one model differed in bytes (and in DVC's hash): run with a fixed seed
        command = [sys.executable, "-m", "pipeline.export", *sys.argv[1:]]
        os.execve(sys.executable, command, {**os.environ, "PYTHONHASHSEED": HASH_SEED})
    sys.exit(main())
