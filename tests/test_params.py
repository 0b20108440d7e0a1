"""`params.yaml` → typed `Params`: the repo's file loads, every kind of mistake is refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.params import (
    DataParams,
    Params,
    ParamsError,
    apply_overrides,
    flatten,
    load_params,
    parse_params,
    read_raw_params,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[1]
PARAMS_YAML = ROOT / "params.yaml"


@pytest.fixture
def raw() -> dict:
    return read_raw_params(PARAMS_YAML)


def test_repo_params_yaml_loads(raw: dict) -> None:
    params = load_params(PARAMS_YAML)
    assert isinstance(params, Params)
    assert isinstance(params.data, DataParams)
    # every key of the file made it into the objects, with its value
    assert to_dict(params) == raw


def test_ints_given_for_floats_become_floats(raw: dict) -> None:
    params = parse_params(apply_overrides(raw, {"train.learning_rate": 1}))
    assert params.train.learning_rate == 1.0
    assert type(params.train.learning_rate) is float


# (overrides, key named, offending value as shown, what is allowed)
BAD = {
    "wrong type": ({"train.epochs": "ten"}, "train.epochs", "'ten'", "an integer"),
    "float for int": ({"train.batch_size": 12.5}, "train.batch_size", "12.5", "an integer"),
    "bool for int": ({"train.epochs": True}, "train.epochs", "True", "an integer"),
    "bool for float": ({"train.learning_rate": False}, "train.learning_rate", "False", "a number"),
    # what a lenient validator would quietly convert
    "digits for int": ({"train.epochs": "5"}, "train.epochs", "'5'", "an integer"),
    "whole float for int": ({"train.epochs": 5.0}, "train.epochs", "5.0", "an integer"),
    "digits for float": (
        {"train.learning_rate": "0.001"},
        "train.learning_rate",
        "'0.001'",
        "a number",
    ),
    "number for string": ({"model.arch": 5}, "model.arch", "5", "a string"),
    "nan": ({"train.learning_rate": float("nan")}, "train.learning_rate", "nan", "a number"),
    "infinity": (
        {"train.reduce_lr.min_delta": float("inf")},
        "train.reduce_lr.min_delta",
        "inf",
        "a number",
    ),
    "string for bool": (
        {"preprocess.face_detection": "yes"},
        "preprocess.face_detection",
        "'yes'",
        "true or false",
    ),
    "empty string": ({"model.arch": ""}, "model.arch", "''", "a string"),
    "below range": (
        {"preprocess.picture_size": 4},
        "preprocess.picture_size",
        "4",
        "from 8 to 512",
    ),
    "above range": (
        {"train.augmentation.rotation": 0.75},
        "train.augmentation.rotation",
        "0.75",
        "from 0.0 to 0.5",
    ),
    "width of nothing": ({"model.width": 0}, "model.width", "0.0", "from 0.25 to 4.0"),
    "unknown stem": ({"model.stem": "pca"}, "model.stem", "'pca'", "one of 'conv', 'whitened'"),
    "below open range": ({"train.epochs": 0}, "train.epochs", "0", "at least 1"),
    "int out of a float range": (
        {"train.learning_rate": 20},
        "train.learning_rate",
        "20.0",
        "from 0.0 to 10.0",
    ),
    "bad literal": (
        {"preprocess.equalization": "fancy"},
        "preprocess.equalization",
        "'fancy'",
        "one of 'none', 'global', 'clahe'",
    ),
    "bad optional": ({"data.archive": 3}, "data.archive", "3", "a string or null"),
    "even kernel": (
        {"preprocess.denoise_kernel": 4},
        "preprocess.denoise_kernel",
        "4",
        "an odd number from 3 to 31",
    ),
    "kernel too big": (
        {"preprocess.denoise_kernel": 33},
        "preprocess.denoise_kernel",
        "33",
        "from 3 to 31",
    ),
    "tolerances not numbers": (
        {"gate.tolerances": {"accuracy": "high"}},
        "gate.tolerances",
        "'high'",
        "a mapping of names to numbers",
    ),
    "tolerance names not strings": (
        {"gate.tolerances": {1: 0.1}},
        "gate.tolerances",
        "{1: 0.1}",
        "a mapping of names to numbers",
    ),
    "group not a mapping": ({"evaluate": [1, 2]}, "evaluate", "[1, 2]", "a mapping of keys"),
    "archive without path": (
        {"data.source": "archive"},
        "data.archive",
        "is empty",
        "set data.archive to the path of a .zip",
    ),
    "directory without path": (
        {"data.source": "directory"},
        "data.directory",
        "is empty",
        "set data.directory to a folder",
    ),
    "unknown distribution": (
        {"train.distribution": "multi_worker"},
        "train.distribution",
        "'multi_worker'",
        "one of 'none', 'mirrored'",
    ),
    "ema overwrite with mirrored": (
        {"train.distribution": "mirrored", "train.ema_momentum": 0.99},
        "train.ema_momentum",
        "0.99 with train.ema_mode 'overwrite'",
        "set train.ema_mode to swap, train.ema_momentum to 0.0, or train.distribution to none",
    ),
    "snapshots not dividing the epochs": (
        {"train.snapshots": 3, "train.epochs": 10, "train.lr_schedule": "cosine"},
        "train.snapshots",
        "3 does not divide train.epochs (10)",
        "make train.epochs a multiple of train.snapshots",
    ),
    "snapshots on the plateau schedule": (
        {"train.snapshots": 5},
        "train.snapshots",
        "'plateau'",
        "set it to cosine or onecycle",
    ),
    "snapshots with a warm-up as long as a cycle": (
        {"train.snapshots": 5, "train.lr_schedule": "onecycle", "train.warmup_epochs": 1},
        "train.snapshots",
        "cycles of 1 epochs",
        "warm up for fewer epochs",
    ),
    "snapshots with early stopping": (
        {"train.snapshots": 5, "train.lr_schedule": "cosine"},
        "train.snapshots",
        "train.early_stopping.enabled",
        "set it to false",
    ),
    "snapshots with ema": (
        {
            "train.snapshots": 5,
            "train.lr_schedule": "cosine",
            "train.early_stopping.enabled": False,
            "train.ema_momentum": 0.99,
        },
        "train.snapshots",
        "train.ema_momentum (0.99)",
        "set train.ema_momentum to 0.0 or train.snapshots to 1",
    ),
    "no snapshots": ({"train.snapshots": 0}, "train.snapshots", "0", "at least 1"),
    "snapshots with a time budget": (
        {
            "train.snapshots": 5,
            "train.lr_schedule": "cosine",
            "train.early_stopping.enabled": False,
            "train.time_budget_minutes": 30,
        },
        "train.snapshots",
        "train.time_budget_minutes (30.0) would cut short",
        "set train.time_budget_minutes to null or train.snapshots to 1",
    ),
    "no time at all": (
        {"train.time_budget_minutes": 0},
        "train.time_budget_minutes",
        "0.0",
        "above 0.0 or null",
    ),
    "ema of everything": (
        {"train.ema_momentum": 1.0},
        "train.ema_momentum",
        "1.0",
        "at least 0.0 and below 1.0",
    ),
    "bad kaggle slug": (
        {"data.kaggle_dataset": "fer2013"},
        "data.kaggle_dataset",
        "'fer2013'",
        "'owner/dataset' slug",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_wrong_value_names_key_value_and_what_is_allowed(raw: dict, case: str) -> None:
    overrides, key, shown, allowed = BAD[case]
    with pytest.raises(ParamsError) as caught:
        parse_params(apply_overrides(raw, overrides))
    message = str(caught.value)
    assert message.startswith(f"{key}: ")
    assert shown in message
    assert allowed in message


def test_ema_in_swap_mode_is_allowed_with_mirrored(raw: dict) -> None:
    overrides = {
        "train.distribution": "mirrored",
        "train.ema_momentum": 0.99,
        "train.ema_mode": "swap",
    }
    train = parse_params(apply_overrides(raw, overrides)).train
    assert (train.distribution, train.ema_momentum, train.ema_mode) == ("mirrored", 0.99, "swap")


def test_unknown_group_lists_the_groups(raw: dict) -> None:
    raw["trian"] = {"epochs": 3}
    with pytest.raises(ParamsError) as caught:
        parse_params(raw)
    assert str(caught.value) == (
        "trian: unknown params group; allowed groups: "
        "data, preprocess, model, train, evaluate, mlflow, gate"
    )


def test_unknown_key_lists_the_keys_of_its_group(raw: dict) -> None:
    raw["train"]["augmentation"]["shear"] = 0.1
    with pytest.raises(ParamsError) as caught:
        parse_params(raw)
    assert str(caught.value) == (
        "train.augmentation.shear: unknown key; allowed keys in train.augmentation: "
        "horizontal_flip, rotation, zoom, translation, random_erasing, mixup"
    )


def test_misspelt_key_is_reported_as_unknown_not_as_missing(raw: dict) -> None:
    raw["train"]["epoch"] = raw["train"].pop("epochs")
    with pytest.raises(ParamsError, match=r"^train\.epoch: unknown key; allowed keys in train: "):
        parse_params(raw)


def test_key_that_is_not_a_string_is_unknown(raw: dict) -> None:
    raw["evaluate"][1] = True
    with pytest.raises(ParamsError) as caught:
        parse_params(raw)
    assert str(caught.value) == "evaluate.1: unknown key; allowed keys in evaluate: batch_size, tta"


def test_params_are_immutable(raw: dict) -> None:
    params = parse_params(raw)
    with pytest.raises(ValueError, match="frozen"):
        params.train.epochs = 1
    assert params.train.epochs == raw["train"]["epochs"]


@pytest.mark.parametrize(
    ("group", "key"),
    [("preprocess", "workers"), ("train", "seed"), ("train.early_stopping", "patience")],
)
def test_missing_key_is_an_error_not_a_default(raw: dict, group: str, key: str) -> None:
    node = raw
    for part in group.split("."):
        node = node[part]
    del node[key]
    with pytest.raises(ParamsError, match=rf"^{re.escape(group)}\.{key}: missing; add it to"):
        parse_params(raw)


def test_missing_group_is_an_error(raw: dict) -> None:
    del raw["gate"]
    with pytest.raises(ParamsError, match=r"^gate: params group missing"):
        parse_params(raw)


def test_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("- data\n- train\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="expected a mapping of groups, got"):
        load_params(path)


def test_missing_and_broken_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"params\.yaml: not found; run from the project root"):
        load_params(tmp_path / "params.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n", encoding="utf-8")
    with pytest.raises(ParamsError, match=r"broken\.yaml: not valid YAML"):
        load_params(broken)


def test_apply_overrides_replaces_dotted_keys_in_a_copy(raw: dict) -> None:
    before = yaml.safe_dump(raw)
    result = apply_overrides(
        raw, {"train.epochs": 1, "train.augmentation.rotation": 0.0, "data.source": "sample"}
    )
    assert result["train"]["epochs"] == 1
    assert result["train"]["augmentation"]["rotation"] == 0.0
    assert yaml.safe_dump(raw) == before  # the input is not touched
    others = {k: v for k, v in result.items() if k != "train"}
    assert others == {k: v for k, v in raw.items() if k != "train"}


def test_load_params_applies_overrides_and_validates_them() -> None:
    params = load_params(PARAMS_YAML, overrides={"train.epochs": 1, "preprocess.workers": 1})
    assert (params.train.epochs, params.preprocess.workers) == (1, 1)
    with pytest.raises(ParamsError, match=r"^train\.epochs: -1 is out of range"):
        load_params(PARAMS_YAML, overrides={"train.epochs": -1})


@pytest.mark.parametrize(
    ("dotted", "message"),
    [
        ("trian.epochs", r"^trian\.epochs: no such params group 'trian'"),
        ("train.epochs.value", r"^train\.epochs\.value: no such params group 'epochs'"),
        ("train.epoch", r"^train\.epoch: unknown key"),
        ("train.augmentation.shear", r"^train\.augmentation\.shear: unknown key"),
    ],
)
def test_apply_overrides_refuses_unknown_keys(raw: dict, dotted: str, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        apply_overrides(raw, {dotted: 1})


def test_flatten_gives_dotted_keys_including_nested_ones(raw: dict) -> None:
    flat = flatten(load_params(PARAMS_YAML))
    assert flat["data.source"] == raw["data"]["source"]
    assert flat["preprocess.picture_size"] == raw["preprocess"]["picture_size"]
    assert flat["train.augmentation.rotation"] == raw["train"]["augmentation"]["rotation"]
    assert flat["train.early_stopping.patience"] == raw["train"]["early_stopping"]["patience"]
    assert flat["gate.tolerances.accuracy"] == raw["gate"]["tolerances"]["accuracy"]
    assert flat["data.archive"] is None
    # one flat key per leaf of the YAML, nothing else, no nested values left
    leaves = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            leaves[prefix] = node

    walk("", raw)
    assert flat == leaves
