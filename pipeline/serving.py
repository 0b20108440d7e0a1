"""The model as an MLflow pyfunc, for `mlflow models serve` and `mlflow.pyfunc.load_model`.

The model file inside is `model.h5` (Keras, on TensorFlow) or its export `model.onnx`
(ONNX Runtime): the same code serves both, and the ONNX model's requirements name no
TensorFlow, so the environment `mlflow models serve` builds for it is small.

Input: a DataFrame with a column `image` holding encoded image bytes (JPEG,
PNG, BMP, WebP). The scoring server's JSON carries them base64-encoded, and the
logged signature types the column `binary`, so the server decodes them before
`predict` sees them:

    POST /invocations
    {"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}

Called in-process, `EmotionModel.predict` also takes base64 strings in that
column, numpy arrays (H×W grayscale or H×W×3 RGB uint8) in it, or a bare
array (one picture; a 4-D array or a list is several). `mlflow.pyfunc.load_model`
enforces the signature, so pass arrays through its `unwrap_python_model()`. Faces are found and
prepared as `fer-predict` does (`predictor.Predictor`); an optional boolean column
`detect`, or the param `detect`, set to false takes each picture as an already
cropped face. The param `tta` averages over flips and shifted crops.

Output: one row per face, in input order, with the columns `input_index`,
`faces` (how many in that picture), `face` (index, largest first), `box`
([x, y, w, h]), `angle`, `label`, one probability column per class (in the
model's class order) and `error`. A picture without a face gives one row with
`faces` 0 and null `face`, `box`, `angle`, `label` and probabilities; one that
cannot be decoded gives one row with the reason in `error`, and the other
pictures are still answered. Nullable columns hold None rather than NaN so the
served JSON says `null`; cast with `frame[list(classes)].astype(float)`.
"""

from __future__ import annotations

import ast
import base64
import binascii
import importlib.metadata
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np
import pandas as pd

import pipeline
from pipeline import CLASSES
from pipeline.imageops import ImageError, decode_image, encode_png
from pipeline.inference import ONNX_SUFFIX
from pipeline.predictor import Predictor, Result, load_predictor, read_info
from pipeline.sample import draw_image

MODEL_ARTIFACT = "model"  # key of the model file (model.h5 or model.onnx) in the artifacts
IMAGE_COLUMN = "image"
DETECT_COLUMN = "detect"

# The distributions the served code imports, as `served_modules()` import them (a test
# reads every import statement of those modules against these lists). At module level,
# whatever the model, and cloudpickle, which wrote the logged `EmotionModel`:
_REQUIREMENTS = (
    "numpy",
    "pandas",
    "opencv-python-headless",
    "pillow",
    "pydantic",
    "pyyaml",
    "cloudpickle",
)
# To load the model (`inference.load_model`, `modelmeta.read_model_info`) and run its face
# detector (`detectors`): a Keras model takes every detector, and TensorFlow under the name
# it was installed as (tensorflow, tensorflow-cpu, …); an ONNX one only what its own
# detector needs. `mlflow-skinny` is the MLflow that the pyfunc loader and the scoring
# server need, without the tracking server's dependencies.
_KERAS_REQUIREMENTS = ("mlflow", "keras", "h5py", "onnxruntime", "mtcnn")
_ONNX_REQUIREMENTS = ("mlflow-skinny", "onnxruntime")
_MTCNN_REQUIREMENTS = ("tensorflow", "mtcnn")  # MTCNN runs on TensorFlow
# Required where installed: YuNet's wheel exists for Python <= 3.11 only, and without it
# the served model's `auto` detector takes the Haar cascades.
_OPTIONAL_REQUIREMENTS = ("yuface",)


def output_columns(classes: Sequence[str] = CLASSES) -> list[str]:
    return ["input_index", "faces", "face", "box", "angle", "label", *classes, "error"]


def _gray_from_array(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ImageError(f"{name}: expected a uint8 array, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] in (3, 4):
        code = cv2.COLOR_RGB2GRAY if array.shape[2] == 3 else cv2.COLOR_RGBA2GRAY
        array = cv2.cvtColor(np.ascontiguousarray(array), code)
    if array.ndim != 2 or array.size == 0:
        raise ImageError(
            f"{name}: expected an H×W grayscale or H×W×3 RGB array, got shape {array.shape}"
        )
    return np.ascontiguousarray(array)


def to_gray(value: Any, name: str) -> np.ndarray:
    """A picture from encoded bytes, a base64 string of them, or a uint8 array."""
    if isinstance(value, np.ndarray):
        return _gray_from_array(value, name)
    if isinstance(value, str):
        try:  # base64.encodebytes, as MLflow's own client uses, breaks lines every 76
            value = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ImageError(f"{name}: a string that is not base64-encoded image bytes") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode_image(bytes(value), name)
    raise ImageError(
        f"{name}: expected image bytes, a base64 string or a uint8 array, "
        f"got {type(value).__name__}"
    )


def _as_pictures(model_input: Any, detect: bool) -> tuple[list[Any], list[bool]]:
    """The pictures of any accepted input, and whether to detect faces in each."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise ValueError(
                f"the input needs a column {IMAGE_COLUMN!r} of encoded images; "
                f"got columns {list(model_input.columns)}"
            )
        pictures = list(model_input[IMAGE_COLUMN])
        flags = [detect] * len(pictures)
        if DETECT_COLUMN in model_input.columns:
            flags = [detect if pd.isna(v) else bool(v) for v in model_input[DETECT_COLUMN]]
        return pictures, flags
    if isinstance(model_input, np.ndarray):
        pictures = list(model_input) if model_input.ndim == 4 else [model_input]
        return pictures, [detect] * len(pictures)
    if isinstance(model_input, (list, tuple)):
        return list(model_input), [detect] * len(model_input)
    raise TypeError(
        f"expected a DataFrame with an {IMAGE_COLUMN!r} column, a numpy array or a list of "
        f"pictures, got {type(model_input).__name__}"
    )


def predict_frame(
    predictor: Predictor, model_input: Any, detect: bool = True, tta: bool = False
) -> pd.DataFrame:
    """One row per face of every picture in `model_input` (see the module docstring)."""
    pictures, flags = _as_pictures(model_input, detect)
    results = []
    for index, (picture, flag) in enumerate(zip(pictures, flags, strict=True)):
        name = f"{IMAGE_COLUMN} {index}"
        result = Result(name)
        try:
            result.faces = predictor.face_inputs(to_gray(picture, name), flag)
        except (ImageError, ValueError, cv2.error) as exc:
            result.error = str(exc).removeprefix(f"{name}: ")
        results.append(result)
    predictor.classify(results, tta)

    classes = predictor.classes
    rows = []
    for index, result in enumerate(results):
        for record in result.records(classes):
            probabilities = record["probabilities"] or {}
            rows.append(
                {
                    "input_index": index,
                    "faces": record["faces"],
                    "face": record["face"],
                    "box": record["box"],
                    "angle": record["angle"],
                    "label": record["label"],
                    **{name: probabilities.get(name) for name in classes},
                    "error": record["error"],
                }
            )
    frame = pd.DataFrame(rows, columns=output_columns(classes), dtype=object)
    return frame.astype({"input_index": "int64"})


class EmotionModel(mlflow.pyfunc.PythonModel):
    """Faces and their emotions in pictures; see the module docstring for input and output."""

    def load_context(self, context) -> None:
        self._predictor = load_predictor(Path(context.artifacts[MODEL_ARTIFACT]))

    # MLflow reads the hint: a DataFrame is what the signature describes (and, being a
    # DataFrame, it adds no validation of its own); arrays are accepted in-process too.
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        params = params or {}
        return predict_frame(
            self._predictor,
            model_input,
            detect=bool(params.get("detect", True)),
            tta=bool(params.get("tta", False)),
        )


def _signature(classes: Sequence[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema(
        [ColSpec("binary", IMAGE_COLUMN), ColSpec("boolean", DETECT_COLUMN, required=False)]
    )
    outputs = Schema(
        [
            ColSpec("long", "input_index"),
            ColSpec("long", "faces", required=False),
            ColSpec("long", "face", required=False),
            ColSpec(Array("long"), "box", required=False),
            ColSpec("double", "angle", required=False),
            ColSpec("string", "label", required=False),
            *(ColSpec("double", name, required=False) for name in classes),
            ColSpec("string", "error", required=False),
        ]
    )
    params = ParamSchema([ParamSpec("detect", "boolean", True), ParamSpec("tta", "boolean", False)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _input_example(picture_size: int) -> pd.DataFrame:
    """One drawn face from the embedded sample, as PNG bytes."""
    face = draw_image("happy", np.random.default_rng(0), max(picture_size, 48))
    return pd.DataFrame({IMAGE_COLUMN: [encode_png(face)]})


def pip_requirements(model_format: str = ".h5", face_detector: str = "auto") -> list[str]:
    """The served model's requirements, pinned to the installed versions: for a Keras model
    (`model_format` ".h5") all of them, TensorFlow included; for its ONNX export (".onnx")
    only what that model and its `face_detector` (`detectors.CHOICES`) import, which is
    no TensorFlow unless the detector is MTCNN."""
    distributions = importlib.metadata.packages_distributions()
    installed = {d for names in distributions.values() for d in names}
    optional = [name for name in _OPTIONAL_REQUIREMENTS if name in installed]
    if model_format == ".h5":
        names = ["tensorflow", *_KERAS_REQUIREMENTS, *_REQUIREMENTS, *optional]
    elif model_format == ONNX_SUFFIX:
        detector = {"mtcnn": list(_MTCNN_REQUIREMENTS), "haar": []}.get(face_detector, optional)
        names = [*_ONNX_REQUIREMENTS, *_REQUIREMENTS, *detector]
    else:
        raise ValueError(f"model format {model_format!r}: expected .h5 or {ONNX_SUFFIX}")
    tensorflow = distributions.get("tensorflow", ["tensorflow"])[0]
    names = [tensorflow if name == "tensorflow" else name for name in names]
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


def served_modules(start: str = __name__) -> list[str]:
    """`start` and every `pipeline` module it imports, directly or not, read from their
    import statements (function-level ones too): the code the served model needs, and
    nothing of the stages or the research tools."""
    package = Path(pipeline.__file__).parent
    found: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        tree = ast.parse((package / f"{name.rsplit('.', 1)[-1]}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            todo += [
                n
                for n in names
                if n.count(".") == 1 and (package / f"{n[9:]}.py").is_file()
                if n.startswith("pipeline.")
            ]
    return sorted(found)


def _packed_code(folder: Path) -> Path:
    """A `pipeline` package in `folder` holding only `served_modules()`."""
    package = Path(pipeline.__file__).parent
    packed = folder / "pipeline"
    packed.mkdir()
    shutil.copy2(package / "__init__.py", packed / "__init__.py")
    for name in served_modules():
        module = name.removeprefix("pipeline.")
        shutil.copy2(package / f"{module}.py", packed / f"{module}.py")
    return packed


def log_pyfunc_model(
    model_path: Path,
    artifact_path: str = "emotion_model",
    registered_model_name: str | None = None,
):
    """Log `model_path`, a `model.h5` or its `model.onnx` export, as an `EmotionModel`
    pyfunc into the active MLflow run.

    The model file goes in as an artifact, the modules of `pipeline` it needs as code
    (`served_modules`), with a signature, an input example and pinned pip requirements
    (`pip_requirements`; for an ONNX model, without TensorFlow). Returns MLflow's `ModelInfo`;
    serve it with `mlflow models serve -m runs:/<run id>/<artifact_path>`, which builds a
    virtualenv from those requirements (`--env-manager local` uses this environment).
    """
    if mlflow.active_run() is None:
        raise RuntimeError("log_pyfunc_model logs into the active run; start one first")
    info = read_info(model_path)  # refuses a model without its preprocessing stamp
    name_argument = "name" if int(mlflow.__version__.split(".")[0]) >= 3 else "artifact_path"
    requirements = pip_requirements(model_path.suffix, info.preprocess.face_detector)
    with tempfile.TemporaryDirectory(prefix="fer-served-code-") as folder:
        return mlflow.pyfunc.log_model(
            **{name_argument: artifact_path},
            python_model=EmotionModel(),
            artifacts={MODEL_ARTIFACT: str(model_path)},
            code_paths=[str(_packed_code(Path(folder)))],
            signature=_signature(info.classes),
            input_example=_input_example(info.preprocess.picture_size),
            pip_requirements=requirements,
            registered_model_name=registered_model_name,
        )
