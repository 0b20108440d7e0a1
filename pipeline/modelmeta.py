"""What a saved model needs to be used correctly, stored inside its `.h5` file.

The class order and the preprocessing params travel with the model as an HDF5
attribute, so the predictor prepares faces exactly as the pipeline that
trained the model did, whatever `params.yaml` says today.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline import CLASSES, __version__
from pipeline.params import PreprocessParams

ATTRIBUTE = "fer_pipeline"


@dataclass(frozen=True)
class ModelInfo:
    classes: tuple[str, ...]
    preprocess: PreprocessParams
    arch: str
    pipeline_version: str


def info_for(preprocess: PreprocessParams, arch: str) -> ModelInfo:
    return ModelInfo(CLASSES, preprocess, arch, __version__)


def write_model_info(path: Path, info: ModelInfo) -> None:
    """Stamp a saved `.h5` model with `info`."""
    import h5py

    payload = {
        "classes": list(info.classes),
        "preprocess": info.preprocess.model_dump(),
        "arch": info.arch,
        "pipeline_version": info.pipeline_version,
    }
    with h5py.File(path, "a") as h5:
        h5.attrs[ATTRIBUTE] = json.dumps(payload)


def read_model_info(path: Path) -> ModelInfo:
    """Read the stamp; a model without one is refused with what to do."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            raw = h5.attrs.get(ATTRIBUTE)
    except OSError as exc:
        raise ValueError(f"{path}: not an HDF5 model file ({exc})") from None
    if raw is None:
        raise ValueError(
            f"{path}: has no {ATTRIBUTE!r} attribute, so its class order and preprocessing "
            "are unknown; use a model.h5 written by this pipeline's train stage"
        )
    payload = json.loads(raw)
    return ModelInfo(
        classes=tuple(payload["classes"]),
        preprocess=PreprocessParams(**payload["preprocess"]),
        arch=payload["arch"],
        pipeline_version=payload["pipeline_version"],
    )
