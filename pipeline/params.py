"""`params.yaml` loaded once into typed, validated objects.

Every knob of the pipeline lives in `params.yaml` and nowhere else: the frozen
pydantic models below declare the keys, their types and their allowed ranges,
but no default values, so a key missing from the file is an error, not a silent
fallback, and so is a key they do not declare. A wrong key or value fails before
any work starts, with the key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import functools
import operator
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from pipeline.paths import PARAMS_FILE


class ParamsError(ValueError):
    """A key or value in `params.yaml` is wrong."""


class _Group(BaseModel):
    # strict: a bool is not a number, neither "5" nor 5.0 is an int (5 is a float);
    # NaN, infinity and empty strings are refused
    model_config = ConfigDict(
        frozen=True, extra="forbid", strict=True, allow_inf_nan=False, str_min_length=1
    )


class DataParams(_Group):
    source: Literal["sample", "kaggle", "archive", "directory"]
    seed: int
    sample_train_images: int = Field(ge=14)
    sample_validation_images: int = Field(ge=14)
    sample_test_images: int = Field(ge=0)
    test_fraction: float = Field(ge=0.0, lt=1.0)
    kaggle_dataset: str
    archive: str | None
    directory: str | None

    @model_validator(mode="after")
    def _check_source(self) -> DataParams:
        if 0 < self.sample_test_images < 14:
            raise ParamsError(
                f"data.sample_test_images: {self.sample_test_images} is too few; each of the "
                "7 classes needs 2 images, so ask for 0 (no test split) or at least 14"
            )
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
        return self


class PreprocessParams(_Group):
    picture_size: int = Field(ge=8, le=512)
    face_detection: bool
    face_margin: float = Field(ge=0.0, le=1.0)
    face_detector: Literal["auto", "yunet", "mtcnn", "haar"]
    face_tilt_search: bool
    equalization: Literal["none", "global", "clahe"]
    clahe_clip_limit: float = Field(ge=0.1, le=100.0)
    denoise: Literal["none", "gaussian", "median"]
    denoise_kernel: int = Field(ge=3, le=31)
    max_bad_fraction: float = Field(ge=0.0, le=1.0)
    workers: int = Field(ge=0, le=256)

    @model_validator(mode="after")
    def _check_kernel(self) -> PreprocessParams:
        if self.denoise_kernel % 2 == 0:
            raise ParamsError(
                f"preprocess.denoise_kernel: {self.denoise_kernel} is even; "
                "allowed: an odd number from 3 to 31"
            )
        return self


class ModelParams(_Group):
    arch: str
    dropout: float = Field(ge=0.0, le=0.9)
    crop: int = Field(default=0, ge=0)
    width: float = Field(default=1.0, ge=0.25, le=4.0)
    stem: Literal["conv", "whitened"] = "conv"


class AugmentationParams(_Group):
    horizontal_flip: bool
    rotation: float = Field(ge=0.0, le=0.5)
    zoom: float = Field(ge=0.0, le=0.9)
    translation: float = Field(ge=0.0, le=0.5)
    random_erasing: float = Field(ge=0.0, le=1.0)
    mixup: float = Field(ge=0.0, le=10.0)


Monitor = Literal["val_accuracy", "val_loss", "accuracy", "loss"]


class CheckpointParams(_Group):
    monitor: Monitor
    save_best_only: bool


class EarlyStoppingParams(_Group):
    enabled: bool
    monitor: Monitor
    patience: int = Field(ge=0)
    restore_best_weights: bool


class ReduceLRParams(_Group):
    monitor: Monitor
    factor: float = Field(ge=0.0, le=1.0)
    patience: int = Field(ge=0)
    min_delta: float = Field(ge=0.0)


class TrainParams(_Group):
    seed: int
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    steps_per_epoch: Literal["floor", "all"]
    optimizer: Literal["adam", "adamw", "sgd"]
    learning_rate: float = Field(ge=0.0, le=10.0)
    weight_decay: float = Field(ge=0.0, le=1.0)
    lr_schedule: Literal["plateau", "cosine", "onecycle"]
    warmup_epochs: int = Field(ge=0)
    class_weight: Literal["none", "balanced"]
    label_smoothing: float = Field(ge=0.0, le=0.5)
    ema_momentum: float = Field(ge=0.0, lt=1.0)
    ema_mode: Literal["overwrite", "swap"]
    snapshots: int = Field(ge=1)
    time_budget_minutes: float | None = Field(default=None, gt=0.0)
    temperature_scaling: bool
    bn_recalibration_batches: int = Field(ge=0)
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]
    distribution: Literal["none", "mirrored"]
    augmentation: AugmentationParams
    checkpoint: CheckpointParams
    early_stopping: EarlyStoppingParams
    reduce_lr: ReduceLRParams

    @model_validator(mode="after")
    def _check_distribution(self) -> TrainParams:
        if self.distribution == "mirrored" and self.ema_momentum and self.ema_mode == "overwrite":
            # Keras 3.15 puts the average in place inside a tf.cond, and MirroredStrategy
            # refuses the cross-replica update there ("`merge_call` called while defining
            # a new graph"), at the first step; swapping it in from a callback works
            raise ParamsError(
                f"train.ema_momentum: {self.ema_momentum} with train.ema_mode 'overwrite' "
                "does not train with train.distribution 'mirrored' (Keras 3 cannot overwrite "
                "mirrored weights with their average during a step); set train.ema_mode to "
                "swap, train.ema_momentum to 0.0, or train.distribution to none"
            )
        return self

    @property
    def cycle_epochs(self) -> int:
        """The epochs of one `snapshots` cycle: all of them without snapshots."""
        return self.epochs // self.snapshots

    @model_validator(mode="after")
    def _check_snapshots(self) -> TrainParams:
        if self.snapshots == 1:
            return self
        given = f"train.snapshots: {self.snapshots}"
        if self.epochs % self.snapshots:
            raise ParamsError(
                f"{given} does not divide train.epochs ({self.epochs}) into cycles of equal "
                "length; make train.epochs a multiple of train.snapshots"
            )
        if self.lr_schedule == "plateau":
            raise ParamsError(
                f"{given} needs a learning-rate schedule that restarts each cycle, but "
                "train.lr_schedule is 'plateau'; set it to cosine or onecycle"
            )
        if self.warmup_epochs >= self.cycle_epochs:
            raise ParamsError(
                f"{given} makes cycles of {self.cycle_epochs} epochs, which "
                f"train.warmup_epochs ({self.warmup_epochs}) fills; warm up for fewer epochs"
            )
        if self.early_stopping.enabled:
            raise ParamsError(
                f"{given} trains every cycle to its end, but train.early_stopping.enabled "
                "would stop it early; set it to false"
            )
        if self.ema_momentum:
            raise ParamsError(
                f"{given} averages the snapshots of its cycles, which "
                f"train.ema_momentum ({self.ema_momentum}) would replace by averages; "
                "set train.ema_momentum to 0.0 or train.snapshots to 1"
            )
        if self.time_budget_minutes is not None:
            raise ParamsError(
                f"{given} trains cycles of train.epochs / train.snapshots epochs, which "
                f"train.time_budget_minutes ({self.time_budget_minutes}) would cut short; "
                "set train.time_budget_minutes to null or train.snapshots to 1"
            )
        return self


class EvaluateParams(_Group):
    batch_size: int = Field(ge=1)
    tta: bool


class MlflowParams(_Group):
    experiment: str
    registered_model: str | None
    log_model: bool


class GateParams(_Group):
    """Largest drop of each metric that `check_metrics` lets through."""

    tolerances: dict[str, float]


class Params(_Group):
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
    if origin is dict:
        return "a mapping of names to numbers"
    if tp is type(None):
        return "null"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(tp, str(tp))


def _bounds(field: FieldInfo) -> str:
    """A field's range in words: `from 0.0 to 0.5`, `at least 1`, `above 0.0 or null`."""
    names = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}
    limits = {
        kind: getattr(m, kind)
        for m in field.metadata
        if (kind := type(m).__name__.lower()) in names
    }
    if "ge" in limits and "le" in limits:
        words = f"from {limits['ge']} to {limits['le']}"
    else:
        words = " and ".join(f"{names[kind]} {limit}" for kind, limit in limits.items())
    return words + (" or null" if type(None) in typing.get_args(field.annotation) else "")


_UNKNOWN = ("extra_forbidden", "invalid_key")  # a key not declared; one that is not a string


def _message(error: Mapping[str, Any], raw: Mapping[str, Any]) -> str:
    """One pydantic error in this module's words: the dotted key, the value, what is allowed."""
    if error["type"] == "value_error":  # a ParamsError from a validator above, already worded
        return str(error["ctx"]["error"])
    # follow the location down the groups to a key of one of them (not into a dict's entries)
    parts: list[str] = []
    group, tp = Params, Params
    for part in error["loc"]:
        # get_origin first: on Python 3.10 isinstance(dict[str, float], type) is true
        if typing.get_origin(tp) or not (isinstance(tp, type) and issubclass(tp, _Group)):
            break
        group = tp
        parts.append(str(part))
        tp = getattr(group.model_fields.get(part), "annotation", None)
    key, name = ".".join(parts), parts[-1]
    if error["type"] in _UNKNOWN:
        if group is Params:
            return f"{key}: unknown params group; allowed groups: " + ", ".join(Params.model_fields)
        where = key.rpartition(".")[0]
        return f"{key}: unknown key; allowed keys in {where}: " + ", ".join(group.model_fields)
    if error["type"] == "missing":
        what = "params group missing" if group is Params else "missing"
        return f"{key}: {what}; add it to {PARAMS_FILE}"
    value = functools.reduce(operator.getitem, parts, raw)
    if error["type"] == "model_type":
        return f"{key}: expected a mapping of keys, got {value!r}"
    if error["type"] in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        shown = float(value) if float in (tp, *typing.get_args(tp)) else value
        return f"{key}: {shown!r} is out of range; allowed: {_bounds(group.model_fields[name])}"
    return f"{key}: {value!r} is not allowed; allowed: {_describe(tp)}"


def parse_params(raw: Mapping[str, Any]) -> Params:
    """Validate a params mapping (as read from YAML) into `Params`."""
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{PARAMS_FILE}: expected a mapping of groups, got {raw!r}")
    try:
        return Params.model_validate(dict(raw))
    except ValidationError as exc:
        # one error, the first, but an unknown key before all: a misspelt key is also missing
        error = min(exc.errors(), key=lambda e: e["type"] not in _UNKNOWN)
        raise ParamsError(_message(error, raw)) from None


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


def parse_overrides(pairs: list[str], flag: str = "-S") -> dict[str, Any]:
    """`key=value` strings (given with `flag`), each value read as YAML the way
    `dvc exp run -S` reads it: `train.epochs=1` sets the number 1."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ParamsError(f"{flag} {pair!r}: expected key=value, e.g. {flag} train.epochs=30")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ParamsError(f"{flag} {pair!r}: the value is not valid YAML: {exc}") from None
    return overrides


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
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value

    walk("", to_dict(params))
    return flat


def to_dict(params: Params) -> dict[str, Any]:
    """Params as nested plain data (the shape of `params.yaml`)."""
    return params.model_dump()
