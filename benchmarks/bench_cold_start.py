"""How long `fer-predict` takes for one photo from a cold process, per model format.

    python benchmarks/bench_cold_start.py [--models models/model.h5 models/model.onnx] [--runs 5]

Each run is a new `python -m pipeline.predict photo.jpg --model M` process, timed from
start to exit: Python's start-up, the imports (TensorFlow for a Keras model, ONNX
Runtime alone for an ONNX one), the model's load, face detection, classification and
the JSON line. The photo is the scikit-image astronaut scaled into 640×480 (as in
`bench_predict.py`). Prints a Markdown table with the median and range, and the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_predict import astronaut_photo

from pipeline.machine import cpu_description


def cold_seconds(model: Path, photo: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", str(photo), "--model", str(model)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0 or '"faces": 1' not in done.stdout:
        raise SystemExit(f"bench_cold_start: {model} failed:\n{done.stderr[-1500:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        type=Path,
        default=[Path("models/model.h5"), Path("models/model.onnx")],
        help="model files to compare (default: %(default)s)",
    )
    parser.add_argument("--runs", type=int, default=5, help="cold processes per model")
    args = parser.parse_args(argv)
    for model in args.models:
        if not model.is_file():
            parser.error(f"{model}: no such model (dvc repro writes both defaults)")
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        photo = astronaut_photo(Path(tmp) / "photo.jpg")
        cold_seconds(args.models[0], photo)  # the page cache holds the libraries after this
        rows = []
        for model in args.models:
            times = [cold_seconds(model, photo) for _ in range(args.runs)]
            rows.append((model, statistics.median(times), min(times), max(times)))
    print(f"One 640×480 photo from a cold process; CPU: {cpu_description()}\n")
    print("| model | median | range |")
    print("|---|---:|---:|")
    for model, median, low, high in rows:
        print(f"| `{model}` | {median:.2f} s | {low:.2f}–{high:.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
