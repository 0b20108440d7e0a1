"""How fast `fer-predict` is: model load, one photo end to end, and throughput on crops.

    python benchmarks/bench_predict.py [--model models/model.h5] [--repeats 20] [--crops 1000]

Inputs are made here from the scikit-image astronaut (a real face; scikit-image is
a dev dependency): a 640×480 photo (the portrait scaled to 480 pixels high and
padded at the sides), and `--crops` 48×48 grayscale crops of her face with
random shifts, zoom and brightness, as in the FER datasets. Each measurement
runs the predictor's own code path (`iter_frames` → `run` → JSON lines), after
a warm-up. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from pipeline.machine import cpu_description

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def astronaut_photo(path: Path) -> Path:
    """The astronaut scaled to 480×480 and padded to 640×480, as JPEG."""
    from skimage import data

    bgr = cv2.cvtColor(cv2.resize(data.astronaut(), (480, 480)), cv2.COLOR_RGB2BGR)
    padded = cv2.copyMakeBorder(bgr, 0, 0, 80, 80, cv2.BORDER_REFLECT)
    cv2.imwrite(str(path), padded, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path


def face_crops(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` 48×48 grayscale PNG crops of the astronaut's face, each jittered."""
    from skimage import data

    from pipeline.faces import default_detector

    gray = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2GRAY)
    x, y, w, h = default_detector().detect(gray)[0].box
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        side = w * rng.uniform(1.1, 1.5)
        cx = x + w / 2 + rng.uniform(-0.08, 0.08) * w
        cy = y + h / 2 + rng.uniform(-0.08, 0.08) * h
        matrix = cv2.getRotationMatrix2D((cx, cy), rng.uniform(-8, 8), 48 / side)
        matrix[:, 2] += (24 - cx, 24 - cy)
        crop = cv2.warpAffine(gray, matrix, (48, 48), borderMode=cv2.BORDER_REPLICATE)
        crop = np.clip(crop * rng.uniform(0.7, 1.3) + rng.uniform(-30, 30), 0, 255)
        cv2.imwrite(str(folder / f"face_{n:05d}.png"), crop.astype(np.uint8))
    return folder


def median_seconds(work: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/model.h5", help="model file or MLflow URI")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs for the latency")
    parser.add_argument("--crops", type=int, default=1000, help="48×48 crops for throughput")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    import keras  # noqa: F401  (TensorFlow's start-up, timed apart from the model's load)

    import_seconds = time.perf_counter() - started

    from pipeline.imageops import read_image
    from pipeline.predict import Report, iter_frames, run
    from pipeline.predictor import ModelError, load_predictor

    started = time.perf_counter()
    try:
        predictor = load_predictor(args.model, args.batch_size)
    except ModelError as exc:
        print(f"bench_predict: {exc}", file=sys.stderr)
        return 2
    load_seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        root = Path(tmp)
        photo = astronaut_photo(root / "photo.jpg")
        crops = face_crops(root / "crops", args.crops)

        def predict(paths: list[Path], detect: bool = True) -> Report:
            report = Report(predictor.classes, out=root / "out.jsonl")
            run(predictor, iter_frames(paths, every=1), report, detect)
            return report

        if json.loads(predict([photo]).lines[0])["faces"] != 1:
            print("bench_predict: expected one face in the photo", file=sys.stderr)
            return 1
        end_to_end = median_seconds(lambda: predict([photo]), args.repeats)
        gray = read_image(photo)
        decode = median_seconds(lambda: read_image(photo), args.repeats)
        faces = predictor.face_inputs(gray)
        detect = median_seconds(lambda: predictor.face_inputs(gray), args.repeats)
        classify = median_seconds(
            lambda: predictor.probabilities([f.crop for f in faces]), args.repeats
        )

        predict(sorted(crops.iterdir())[: args.batch_size], detect=False)  # warm-up, full batch
        started = time.perf_counter()
        predict([crops], detect=False)
        no_detect_rate = args.crops / (time.perf_counter() - started)
        started = time.perf_counter()
        report = predict([crops])
        detect_rate = args.crops / (time.perf_counter() - started)
        found = sum(json.loads(line)["faces"] > 0 for line in report.lines)

    import tensorflow as tf

    rows = [
        ("import TensorFlow + Keras", f"{import_seconds:.2f} s"),
        ("model load (`load_predictor`)", f"{load_seconds:.2f} s"),
        (
            f"one 640×480 photo, end to end (median of {args.repeats})",
            f"{end_to_end * 1000:.0f} ms",
        ),
        ("  decode JPEG to grayscale", f"{decode * 1000:.1f} ms"),
        ("  detect + align + `to_model_input`", f"{detect * 1000:.1f} ms"),
        ("  classify 1 face", f"{classify * 1000:.1f} ms"),
        (f"{args.crops:,} 48×48 crops, `--no-detect`", f"{no_detect_rate:,.0f} images/s"),
        (
            f"{args.crops:,} 48×48 crops, with detection",
            f"{detect_rate:,.0f} images/s ({found:,} with a face)",
        ),
    ]
    print(
        f"model {args.model} ({predictor.info.arch}, {predictor.info.preprocess.picture_size}²), "
        f"batch size {args.batch_size}, TensorFlow {tf.__version__}, OpenCV {cv2.__version__}, "
        f"CPU: {cpu_description()}\n"
    )
    width = max(len(name) for name, _ in rows)
    print(f"| {'measurement':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
