"""Speed of each stage on this machine, printed as one markdown table (`make bench`).

Measured with the pipeline's own code: `preprocess.run` (workers=0, one process per
core) on the real archive or on the embedded sample drawn into a temporary folder;
training from the train stage's own input (`dataset.training_input`, augmented as
`params.yaml` says) and from the same number of random in-memory images, whose ratio
shows what the input pipeline costs (it should stay within 10%); `model.predict` on the
validation set as the evaluate stage calls it; and the latency of one face through
`predict_on_batch`, as the predictor calls it. FLOPs per image come from
`models.flops_per_image`; a training step costs about three forward passes, so
3 × FLOPs × images/s is the arithmetic rate achieved, shown next to a large matrix
product's rate on the same machine, its practical ceiling.

    python -m pipeline.bench --archs seed,vgg --precision float32
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import CLASSES, preprocess, sources
from pipeline.dataset import Split, load_split, training_input
from pipeline.inference import TTA_VIEWS, predict_probabilities
from pipeline.logs import setup_logging
from pipeline.machine import cpu_description
from pipeline.models import ARCHITECTURES, build_model, flops_per_image
from pipeline.params import Params, ParamsError, load_params
from pipeline.paths import PARAMS_FILE, Paths
from pipeline.runtime import make_deterministic, resolve_precision
from pipeline.sample import generate_sample
from pipeline.train import balanced_class_weight, make_optimizer

log = logging.getLogger(__name__)

WARMUP_BATCHES = 3  # traced and timed apart: the first batches fill caches and buffers
PREDICT_REPEATS = 30
ARCHIVE_VARIABLE = "FER_REAL_ARCHIVE"


@dataclass
class Row:
    step: str
    arch: str
    images_per_second: float | None = None
    latency_ms: float | None = None
    gflops_per_second: float | None = None
    note: str = ""
    load: float = 0.0


def load_average() -> float:
    """The 1-minute load average: how busy the shared cores were during a measurement."""
    return os.getloadavg()[0]


def machine_lines(policy: str, precision: str) -> list[str]:
    return [
        f"- machine: {cpu_description()} (of {os.cpu_count()} cores)",
        f"- TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"Python {platform.python_version()}",
        f"- precision: {policy} (train.precision={precision})",
        f"- load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]


def prepare_data(params: Params, archive: Path | None, root: Path) -> Row:
    """Fill `root/data/raw` from the archive or the sample, then time the preprocess stage."""
    paths = Paths(root=root)
    if archive is not None:
        sources.extract_archive(archive, paths.raw)
        source = f"real archive {archive.name}"
    else:
        data = params.data
        generate_sample(
            paths.raw, data.sample_train_images, data.sample_validation_images, data.seed
        )
        source = "embedded sample"
    report = preprocess.run(params.preprocess.model_copy(update={"workers": 0}), paths)
    total = sum(per_class["total"] for per_class in report["images"].values())
    return Row(
        "preprocess",
        "–",
        images_per_second=report["images_per_second"],
        note=f"workers=0 ({os.cpu_count()} processes), {total:,} images of the {source}",
        load=load_average(),
    )


class BatchClock(keras.callbacks.Callback):
    """Notes when each training batch ends."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_end(self, batch, logs=None) -> None:
        self.times.append(time.perf_counter())


def train_rate(model, dataset, steps: int, batch_size: int, class_weight=None) -> float:
    """Training images/s over `steps` batches, after `WARMUP_BATCHES` untimed ones."""
    clock = BatchClock()
    model.fit(
        dataset,
        steps_per_epoch=WARMUP_BATCHES + steps,
        epochs=1,
        class_weight=class_weight,
        shuffle=False,  # the stage's input shuffles itself
        callbacks=[clock],
        verbose=0,
    )
    seconds = clock.times[-1] - clock.times[WARMUP_BATCHES - 1]
    return steps * batch_size / seconds


def in_memory_input(count: int, size: int, num_classes: int, batch_size: int, seed: int):
    """`count` random uint8-valued float images with one-hot labels, batched and cached."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, size, size, 1)).astype(np.float32)
    labels = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, count)]
    return (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .batch(batch_size, drop_remainder=True)
        .cache()
        .repeat()
        .prefetch(tf.data.AUTOTUNE)
    )


def evaluate_rate(model, images, batch_size: int, tta: bool) -> float:
    """Images/s of `inference.predict_probabilities` over `images`, after one warm-up pass.

    The warm-up covers all of `images`, so the smaller last batch is traced before the clock
    starts too: the time is the model's, not TensorFlow's tracing.
    """
    predict_probabilities(model, images, batch_size, tta)
    started = time.perf_counter()
    predict_probabilities(model, images, batch_size, tta)
    return len(images) / (time.perf_counter() - started)


def predict_latency_ms(model, image) -> float:
    """Median milliseconds of `predict_on_batch` on one face."""
    for _ in range(3):
        model.predict_on_batch(image)
    times = []
    for _ in range(PREDICT_REPEATS):
        started = time.perf_counter()
        model.predict_on_batch(image)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def matmul_gflops(policy: str, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a square matrix product in the policy's compute type: the practical peak."""
    dtype = tf.bfloat16 if "bfloat16" in policy else tf.float16 if "float16" in policy else None
    a = tf.random.stateless_uniform((size, size), seed=[1, 2], dtype=tf.float32)
    if dtype is not None:
        a = tf.cast(a, dtype)
    tf.linalg.matmul(a, a).numpy()
    started = time.perf_counter()
    for _ in range(repeats):
        tf.linalg.matmul(a, a).numpy()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def bench_arch(
    arch: str, params: Params, split: Split, validation: tf.Tensor, steps: int
) -> list[Row]:
    """Train (stage input and in memory), evaluate and predict rows for one architecture."""
    train = params.train
    size = params.preprocess.picture_size
    batch = train.batch_size
    model_params = params.model.model_copy(update={"arch": arch})
    model = build_model(model_params, (size, size, 1), len(CLASSES))
    model.compile(
        optimizer=make_optimizer(train, steps),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing),
        metrics=["accuracy"],
    )
    flops = flops_per_image(model)
    described = f"{flops / 1e9:.3f} GFLOPs/image, {model.count_params() / 1e6:.2f} M params"

    class_weight = (
        balanced_class_weight(split.labels, len(CLASSES))
        if train.class_weight == "balanced"
        else None
    )
    stage = train_rate(
        model,
        training_input(split, batch, train.seed, train.augmentation),
        steps,
        batch,
        class_weight,
    )
    stage_load = load_average()
    count = (WARMUP_BATCHES + steps) * batch
    memory = train_rate(
        model, in_memory_input(count, size, len(CLASSES), batch, train.seed), steps, batch
    )
    memory_load = load_average()

    tta = params.evaluate.tta
    evaluate = evaluate_rate(model, validation, params.evaluate.batch_size, tta)
    evaluate_load = load_average()
    latency = predict_latency_ms(model, validation[:1])
    return [
        Row(
            "train, stage input",
            arch,
            images_per_second=stage,
            gflops_per_second=3 * flops * stage / 1e9,
            note=f"{stage / memory:.2f} × in-memory; batch {batch}, {steps} steps, "
            f"class_weight {train.class_weight}",
            load=stage_load,
        ),
        Row(
            "train, in-memory",
            arch,
            images_per_second=memory,
            gflops_per_second=3 * flops * memory / 1e9,
            note=described,
            load=memory_load,
        ),
        Row(
            "evaluate",
            arch,
            images_per_second=evaluate,
            note=f"{len(validation):,} validation images, batch {params.evaluate.batch_size}"
            f"{f', TTA ({TTA_VIEWS} views)' if tta else ''}",
            load=evaluate_load,
        ),
        Row(
            "predict",
            arch,
            latency_ms=latency,
            note=f"one face, predict_on_batch, median of {PREDICT_REPEATS}",
            load=load_average(),
        ),
    ]


def _number(value: float | None, digits: int = 0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def format_table(rows: list[Row]) -> str:
    lines = [
        "| step | arch | images/s | latency ms | GFLOP/s | note | load (1 min) |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    step_order = list(dict.fromkeys(row.step for row in rows))
    for row in sorted(rows, key=lambda r: step_order.index(r.step)):
        lines.append(
            f"| {row.step} | {row.arch} | {_number(row.images_per_second)} "
            f"| {_number(row.latency_ms, 1)} | {_number(row.gflops_per_second)} "
            f"| {row.note} | {row.load:.2f} |"
        )
    return "\n".join(lines)


def run(params: Params, archs: list[str], steps: int, archive: Path | None) -> str:
    """Measure everything and return the machine description and the table."""
    make_deterministic(params.train.seed)
    policy = resolve_precision(params.train.precision)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        header = machine_lines(policy, params.train.precision)
        with tempfile.TemporaryDirectory(prefix="fer-bench-") as tmp:
            paths = Paths(root=Path(tmp))
            rows = [prepare_data(params, archive, paths.root)]
            size = params.preprocess.picture_size
            split = load_split(paths.processed / "train", size)
            validation = load_split(paths.processed / "validation", size)
            images = tf.constant(validation.array())
            for arch in archs:
                log.info("measuring %s", arch)
                rows += bench_arch(arch, params, split, images, steps)
        rows.append(
            Row(
                "matmul 2048²",
                "–",
                gflops_per_second=matmul_gflops(policy),
                note=f"the arithmetic ceiling in {policy}, for the GFLOP/s above",
                load=load_average(),
            )
        )
    finally:
        keras.mixed_precision.set_global_policy(previous)
    return "\n".join([*header, "", format_table(rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench",
        description="Print images/s of preprocess, train, evaluate and predict as a table.",
    )
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file")
    parser.add_argument(
        "--archs",
        default=",".join(ARCHITECTURES),
        help=f"comma-separated architectures (default: all: {','.join(ARCHITECTURES)})",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "float32", "mixed_bfloat16", "mixed_float16"],
        help="compute precision (default: train.precision from the params file)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=24,
        help="timed training batches per measurement (default 24; 8 varied by up to 20%%)",
    )
    parser.add_argument(
        "--archive",
        type=Path,
        default=os.environ.get(ARCHIVE_VARIABLE) or None,
        help=f"a .zip of the real dataset (default: ${ARCHIVE_VARIABLE}; unset: the sample)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    archs = [name.strip() for name in args.archs.split(",") if name.strip()]
    unknown = [name for name in archs if name not in ARCHITECTURES]
    if unknown or not archs:
        parser.error(
            f"--archs: {','.join(unknown) or 'empty'} not known; "
            f"allowed: {', '.join(sorted(ARCHITECTURES))}"
        )
    if args.steps < 1:
        parser.error("--steps: must be at least 1")
    try:
        overrides = {"train.precision": args.precision} if args.precision else None
        params = load_params(args.params, overrides)
        print(run(params, archs, args.steps, args.archive))
    except ParamsError as exc:
        log.error("invalid params: %s", exc)
        return 2
    except (FileNotFoundError, ValueError, preprocess.PreprocessError, sources.SourceError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
