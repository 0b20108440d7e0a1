"""`params.yaml` loaded once into typed, validated objects.

Every knob of the pipeline lives in `params.yaml` and nowhere else: the
dataclasses below declare the keys, their types and their allowed ranges, but
no default values, so a key missing from the file is an error, not a silent
fallback. A wrong key or value fails before any work starts, with the key, the
value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.paths import PARAMS_FILE


class ParamsError(ValueError):
    """A key or value in `params.yaml` is wrong."""


def _range(lo: float | None = None, hi: float | None = None) -> Any:
    return field(metadata={"min": lo, "max": hi})


@dataclass(frozen=True)
class DataParams:
    source: Literal["sample", "kaggle", "archive", "directory"]
    seed: int
    sample_train_images: int = _range(14, None)
    sample_validation_images: int = _range(14, None)
    kaggle_dataset: str
    archive: str | None
    directory: str | None

    def __post_init__(self) -> None:
        if self.source == "archive" and not self.archive:
            raise ParamsError(
                "data.archive: is empty but data.source is 'archive'; "
                "set data.archive to the path of a .zip of the dataset"
            )
        if self.source == "directory" and not self.directory:
            raise ParamsError(
                "data.directory: is empty but data.source is 'directory'; "
                "set data.directory to a folder with train/ and validation/ class folders"
            )
        if "/" not in self.kaggle_dataset:
            raise ParamsError(
                f"data.kaggle_dataset: {self.kaggle_dataset!r} is not an 'owner/dataset' slug"
            )


@dataclass(frozen=True)
class PreprocessParams:
    picture_size: int = _range(8, 512)
    face_detection: bool
    face_margin: float = _range(0.0, 1.0)
    equalization: Literal["none", "global", "clahe"]
    clahe_clip_limit: float = _range(0.1, 100.0)
    denoise: Literal["none", "gaussian", "median"]
    denoise_kernel: int = _range(3, 31)
    max_bad_fraction: float = _range(0.0, 1.0)
    workers: int = _range(0, 256)

    def __post_init__(self) -> None:
        if self.denoise_kernel % 2 == 0:
            raise ParamsError(
                f"preprocess.denoise_kernel: {self.denoise_kernel} is even; "
                "allowed: an odd number from 3 to 31"
            )


@dataclass(frozen=True)
class ModelParams:
    arch: str
    dropout: float = _range(0.0, 0.9)


@dataclass(frozen=True)
class AugmentationParams:
    horizontal_flip: bool
    rotation: float = _range(0.0, 0.5)
    zoom: float = _range(0.0, 0.9)
    translation: float = _range(0.0, 0.5)
    random_erasing: float = _range(0.0, 1.0)


Monitor = Literal["val_accuracy", "val_loss", "accuracy", "loss"]


@dataclass(frozen=True)
class CheckpointParams:
    monitor: Monitor
    save_best_only: bool


@dataclass(frozen=True)
class EarlyStoppingParams:
    enabled: bool
    monitor: Monitor
    patience: int = _range(0, None)
    restore_best_weights: bool


@dataclass(frozen=True)
class ReduceLRParams:
    monitor: Monitor
    factor: float = _range(0.0, 1.0)
    patience: int = _range(0, None)
    min_delta: float = _range(0.0, None)


@dataclass(frozen=True)
class TrainParams:
    seed: int
    epochs: int = _range(1, None)
    batch_size: int = _range(1, None)
    steps_per_epoch: Literal["floor", "all"]
    optimizer: Literal["adam", "adamw"]
    learning_rate: float = _range(0.0, 10.0)
    weight_decay: float = _range(0.0, 1.0)
    lr_schedule: Literal["plateau", "cosine", "onecycle"]
    warmup_epochs: int = _range(0, None)
    class_weight: Literal["none", "balanced"]
    label_smoothing: float = _range(0.0, 0.5)
    bn_recalibration_batches: int = _range(0, None)
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]
    augmentation: AugmentationParams
    checkpoint: CheckpointParams
    early_stopping: EarlyStoppingParams
    reduce_lr: ReduceLRParams


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = _range(1, None)
    tta: bool


@dataclass(frozen=True)
class MlflowParams:
    experiment: str
    registered_model: str | None
    log_model: bool


@dataclass(frozen=True)
class GateParams:
    """Largest drop of each metric that `check_metrics` lets through."""

    tolerances: dict[str, float]


@dataclass(frozen=True)
class Params:
    data: DataParams
    preprocess: PreprocessParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    mlflow: MlflowParams
    gate: GateParams


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is dict:
        return "a mapping of names to numbers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp)
    )


_SCALARS: dict[Any, Callable[[Any], bool]] = {
    type(None): lambda v: v is None,
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    # NaN would slip through every range check below (all comparisons are false)
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    str: lambda v: isinstance(v, str) and bool(v),
}


def _is_number_mapping(value: Any) -> bool:
    return isinstance(value, Mapping) and all(_SCALARS[float](v) for v in value.values())


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, key)
            except ParamsError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is dict:
        if _is_number_mapping(value):
            return {str(k): float(v) for k, v in value.items()}
    elif _SCALARS[tp](value):
        return float(value) if tp is float else value
    raise ParamsError(f"{key}: {value!r} is not allowed; allowed: {_describe(tp)}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{prefix}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(
            f"{prefix}.{unknown[0]}: unknown key; allowed keys in {prefix}: " + ", ".join(fields)
        )
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name not in raw:
            raise ParamsError(f"{key}: missing; add it to {PARAMS_FILE}")
        value = _convert(hints[name], raw[name], key)
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"at least {lo}" if hi is None else f"from {lo} to {hi}"
            raise ParamsError(f"{key}: {value!r} is out of range; allowed: {bounds}")
        values[name] = value
    return cls(**values)


def parse_params(raw: Mapping[str, Any]) -> Params:
    """Validate a params mapping (as read from YAML) into `Params`."""
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{PARAMS_FILE}: expected a mapping of groups, got {raw!r}")
    hints = typing.get_type_hints(Params)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ParamsError(
            f"{unknown[0]}: unknown params group; allowed groups: " + ", ".join(hints)
        )
    missing = [name for name in hints if name not in raw]
    if missing:
        raise ParamsError(f"{missing[0]}: params group missing; add it to {PARAMS_FILE}")
    return Params(**{name: _build(hints[name], raw[name], name) for name in hints})


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of `raw` with dotted keys (`train.epochs`) replaced."""
    result = copy.deepcopy(dict(raw))
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"{dotted}: no such params group {part!r}")
            node = node[part]
        if leaf not in node:
            raise ParamsError(f"{dotted}: unknown key")
        node[leaf] = value
    return result


def read_raw_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """Read `params.yaml` as plain data, with a clear error when it is missing or broken."""
    try:
        with Path(path).open(encoding="utf-8") as fh:
            return yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ParamsError(
            f"{path}: not found; run from the project root, where params.yaml lives"
        ) from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None


def load_params(path: Path = PARAMS_FILE, overrides: Mapping[str, Any] | None = None) -> Params:
    """Load and validate `params.yaml`, optionally with dotted-key overrides."""
    raw = read_raw_params(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return parse_params(raw)


def flatten(params: Params) -> dict[str, Any]:
    """Params as flat dotted keys, the way MLflow and `dvc params diff` show them."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}.{f.name}" if prefix else f.name, getattr(value, f.name))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            flat[prefix] = value

    walk("", params)
    return flat


def to_dict(params: Params) -> dict[str, Any]:
    """Params as nested plain data (the shape of `params.yaml`)."""
    return dataclasses.asdict(params)
