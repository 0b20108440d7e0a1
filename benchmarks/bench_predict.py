"""How fast `fer-predict` is: model load, one photo end to end, and throughput on crops;
with `--video`, frames per second and recall on a composed video instead.

    python benchmarks/bench_predict.py [--model models/model.h5] [--repeats 20] [--crops 1000]
    python benchmarks/bench_predict.py --video --archive "$FER_REAL_ARCHIVE" [--frames 250]
        [--redetect-every 5,10]

Inputs are made here from the scikit-image astronaut (a real face; scikit-image is
a dev dependency): a 640×480 photo (the portrait scaled to 480 pixels high and
padded at the sides), and `--crops` 48×48 grayscale crops of her face with
random shifts, zoom and brightness, as in the FER datasets. Each measurement
runs the predictor's own code path (`iter_frames` → `run` → JSON lines), after
a warm-up. Prints a Markdown table.

`--video` writes a 640×480 MP4 of FER2013 faces that move, rock between about ±45°,
come and go (`bench_detect.make_clip`) and runs `fer-predict`'s video path on every
frame of it: the model's detector upright and with the tilt search on every frame,
then with the tilt search every K-th frame and the faces followed between
(`--redetect-every`), and upright the same way. Each row gives the frames per second
(decode, detection, alignment, classification and JSON, wall clock and the process's
CPU time), the recall by tilt against the faces' known places (as in bench_detect:
centre within 0.3 face sizes, size 0.5–2 times), the false boxes, how often a face's
track id changed while it was found, how many frames the face coming in a third of
the way waited to be found, and how many full searches and look-arounds ran.
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
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from bench_detect import (  # beside this script, so on sys.path when it runs
    TILT_BANDS,
    Mover,
    Scene,
    band_of,
    make_clip,
    matched_pairs,
    write_video,
)

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


@dataclass(frozen=True)
class Box:
    box: tuple[int, int, int, int]


def score_video(lines: list[str], scenes: list[Scene], movers: list[Mover]) -> dict:
    """Recall by tilt band, false boxes, track id changes and the median wait of a face
    coming in after the first frame until it is first found (its whole stay if never),
    from a video's JSON lines against the faces' known places."""
    by_frame: dict[int, list[dict]] = {}
    for line in lines:
        record = json.loads(line)
        if record["box"] is not None:
            by_frame.setdefault(record["frame"], []).append(record)
    found = [[0, 0] for _ in TILT_BANDS[:3]]
    false_boxes, changes, first_seen = 0, 0, {}
    last_id: dict[int, int | None] = {}
    for t, scene in enumerate(scenes):
        records = by_frame.get(t, [])
        present = [n for n, mover in enumerate(movers) if mover.at(t) is not None]
        pairs = matched_pairs([Box(tuple(r["box"])) for r in records], scene.faces)
        false_boxes += len(records) - len(pairs)
        hit = {i: j for i, j in pairs}
        for i, face in enumerate(scene.faces):
            band = min(band_of(face.tilt), len(found) - 1)
            found[band][1] += 1
            if i not in hit:
                continue
            found[band][0] += 1
            mover, track = present[i], records[hit[i]]["track"]
            first_seen.setdefault(mover, t)
            if mover in last_id and last_id[mover] != track:
                changes += 1
            last_id[mover] = track
    total = [sum(f[k] for f in found) for k in (0, 1)]
    waits = [
        first_seen.get(n, mover.last) - mover.first
        for n, mover in enumerate(movers)
        if mover.first > 0
    ]
    return {
        "recall": [f[0] / max(1, f[1]) for f in found],
        "recall45": total[0] / max(1, total[1]),
        "false_per_frame": false_boxes / len(scenes),
        "id_changes": changes,
        "wait": statistics.median(waits) if waits else float("nan"),
        "never": sum(n not in first_seen for n in range(len(movers))),
    }


def measure_video(
    predictor, clip: Path, warm_up: Path, scenes, movers, tilt_search: bool, redetect_every: int
) -> dict:
    """`run` over every frame of `clip`, after a warm-up on `warm_up`; its speed and scores."""
    from pipeline.facetrack import FaceTracker
    from pipeline.predict import Report, iter_frames, run

    predictor.use_detector(None, tilt_search)
    made: list[FaceTracker] = []

    def counted_tracker(every: int) -> FaceTracker:
        made.append(FaceTracker(predictor.detector, every))
        return made[-1]

    predictor.tracker = counted_tracker  # keeps each video's tracker for its counts
    warm_report = Report(predictor.classes, out=warm_up.with_suffix(".jsonl"))  # not written
    run(predictor, iter_frames([warm_up], 1), warm_report, True, False)
    made.clear()
    report = Report(predictor.classes, out=clip.with_suffix(".jsonl"))  # kept, not written
    started, cpu_started = time.perf_counter(), time.process_time()
    run(predictor, iter_frames([clip], 1), report, True, False, redetect_every=redetect_every)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    del predictor.tracker
    return {
        **score_video(report.lines, scenes, movers),
        "fps": len(scenes) / wall,
        "cpu_ms": 1000 * cpu / len(scenes),
        "full": sum(t.full_searches for t in made),
        "around": sum(t.region_searches for t in made),
    }


def video_table(rows: list[tuple[str, dict]]) -> str:
    bands = " | ".join(f"recall {a}–{b}°" for a, b in TILT_BANDS[:3])
    lines = [
        f"| detection | frames / s (wall) | CPU ms / frame | {bands} | recall 0–45° "
        "| false boxes / frame | track id changes | frames to find a face coming in "
        "| faces never found | full searches | look-arounds |",
        "|---|" + "---:|" * 12,
    ]
    for name, r in rows:
        recalls = " | ".join(f"{v:.2f}" for v in r["recall"])
        lines.append(
            f"| {name} | {r['fps']:.1f} | {r['cpu_ms']:.0f} | {recalls} | {r['recall45']:.2f} "
            f"| {r['false_per_frame']:.3f} | {r['id_changes']} | {r['wait']:g} "
            f"| {r['never']} | {r['full']} | {r['around']} |"
        )
    return "\n".join(lines)


def bench_video(predictor, args: argparse.Namespace) -> int:
    from pipeline.detectors import describe

    if args.archive is None or not Path(args.archive).is_file():
        print("bench_predict: --video needs the FER2013 archive (--archive)", file=sys.stderr)
        return 2
    scenes, movers = make_clip(Path(args.archive), args.frames, args.seed)
    load_before = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        clip = write_video(scenes, Path(tmp, "clip.mp4"), frames_each=1)
        warm_up = write_video(scenes[:10], Path(tmp, "warm.mp4"), frames_each=1)
        modes = [("upright, every frame", False, 1), ("tilt search, every frame", True, 1)]
        for k in args.redetect_every:
            modes.append((f"tilt search every {k} frames, followed between", True, k))
            modes.append((f"upright every {k} frames, followed between", False, k))
        rows = []
        for name, tilt_search, k in modes:
            measured = measure_video(predictor, clip, warm_up, scenes, movers, tilt_search, k)
            rows.append((name, measured))
            print(f"measured {name}", file=sys.stderr, flush=True)
    load_after = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    faces = sum(len(s.faces) for s in scenes)
    print(
        f"{len(scenes)} frames of 640×480 (seed {args.seed}), {faces} faces in them, "
        f"{len(movers)} FER2013 faces of {min(m.size for m in movers):.0f}–"
        f"{max(m.size for m in movers):.0f} px, each for 60–120 frames, rocking up to "
        f"±{max(m.amplitude for m in movers):.0f}°; detector "
        f"{describe(predictor.use_detector(None, True))}; model {args.model} "
        f"({predictor.info.arch}); CPU: {cpu_description()}; load average "
        f"{load_before} before, {load_after} after\n"
    )
    print(video_table(rows))
    return 0


def _k_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if any(v < 2 for v in values):
        raise argparse.ArgumentTypeError(f"{text}: each K must be at least 2")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/model.h5", help="model file or MLflow URI")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs for the latency")
    parser.add_argument("--crops", type=int, default=1000, help="48×48 crops for throughput")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--video", action="store_true", help="measure video on a composed clip instead"
    )
    parser.add_argument(
        "--archive",
        type=Path,
        default=os.environ.get("FER_REAL_ARCHIVE"),
        help="--video: the FER2013 images .zip (default: $FER_REAL_ARCHIVE)",
    )
    parser.add_argument("--frames", type=int, default=250, help="--video: frames of the clip")
    parser.add_argument("--seed", type=int, default=0, help="--video: draws the clip")
    parser.add_argument(
        "--redetect-every",
        type=_k_list,
        default=[5, 10],
        metavar="K[,K…]",
        help="--video: the full searches' spacing in the followed rows (default: 5,10)",
    )
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
    if args.video:
        return bench_video(predictor, args)

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
