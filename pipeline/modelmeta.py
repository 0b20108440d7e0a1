"""What a saved model needs to be used correctly, stored inside its file.

The class order and the preprocessing params travel with the model, as an HDF5
attribute of `model.h5` and as a metadata entry of its ONNX export under the same
key, so the predictor prepares faces exactly as the pipeline that trained the
model did, whatever `params.yaml` says today.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline import CLASSES, __version__
from pipeline.params import PreprocessParams

ATTRIBUTE = "fer_pipeline"
# What a model stamped before `preprocess.face_detector` existed was prepared with
_BEFORE_DETECTOR_CHOICE = {"face_detector": "haar", "face_tilt_search": False}


@dataclass(frozen=True)
class ModelInfo:
    classes: tuple[str, ...]
    preprocess: PreprocessParams
    arch: str
    pipeline_version: str
    temperature: float = 1.0  # divides the logits (pipeline.calibration); 1: as trained


def info_for(preprocess: PreprocessParams, arch: str, temperature: float = 1.0) -> ModelInfo:
    return ModelInfo(CLASSES, preprocess, arch, __version__, temperature)


def encode_info(info: ModelInfo) -> str:
    payload = {
        "classes": list(info.classes),
        "preprocess": info.preprocess.model_dump(),
        "arch": info.arch,
        "pipeline_version": info.pipeline_version,
        "temperature": info.temperature,
    }
    return json.dumps(payload)


def decode_info(raw: str | None, path: Path) -> ModelInfo:
    """The stamp read back; a model without one is refused with what to do."""
    if raw is None:
        raise ValueError(
            f"{path}: has no {ATTRIBUTE!r} stamp, so its class order and preprocessing "
            "are unknown; use a model.h5 written by this pipeline's train stage, or its "
            "export by python -m pipeline.export"
        )
    payload = json.loads(raw)
    return ModelInfo(
        classes=tuple(payload["classes"]),
        preprocess=PreprocessParams(**{**_BEFORE_DETECTOR_CHOICE, **payload["preprocess"]}),
        arch=payload["arch"],
        pipeline_version=payload["pipeline_version"],
        temperature=float(payload.get("temperature", 1.0)),  # older stamps have none
    )


def write_model_info(path: Path, info: ModelInfo) -> None:
    """Stamp a saved `.h5` model with `info`."""
    import h5py

    with h5py.File(path, "a") as h5:
        h5.attrs[ATTRIBUTE] = encode_info(info)


def read_model_info(path: Path) -> ModelInfo:
    """Read the stamp of a `.h5` model; a model without one is refused with what to do."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            raw = h5.attrs.get(ATTRIBUTE)
    except OSError as exc:
        raise ValueError(f"{path}: not an HDF5 model file ({exc})") from None
    return decode_info(raw, path)
