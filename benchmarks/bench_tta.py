"""Which test-time views help a trained model: accuracy of several view sets on one split.

    python benchmarks/bench_tta.py --model models/model.h5 [--data data/processed/validation]

Each view (a shift of the face by whole pixels with mirrored edges, as `inference.tta_views`
does, optionally mirrored left-right or zoomed in) is predicted once; every view set then
averages its views' probabilities. `cross-2` is the evaluate stage's ten views
(`evaluate.tta = true`), `single` its plain prediction. Prints a Markdown table.

Choose views on the validation split (the default), never on the test split, which no
choice may look at (`data.test_fraction`); even so, a set that wins by a few thousandths
has been chosen on that split: prefer the sets that win on several models.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ZOOM = 1.1


def _cross(shift: int) -> list[tuple[int, int]]:
    return [(0, 0), (-shift, 0), (shift, 0), (0, -shift), (0, shift)]


def _grid(shift: int) -> list[tuple[int, int]]:
    return [(dy, dx) for dy in (-shift, 0, shift) for dx in (-shift, 0, shift)]


def _mirrored(offsets: list[tuple[int, int]], zoom: float = 1.0):
    return [(dy, dx, flip, zoom) for dy, dx in offsets for flip in (False, True)]


# name -> views, each (rows shifted, columns shifted, mirrored, zoom)
VIEW_SETS: dict[str, list[tuple[int, int, bool, float]]] = {
    "single": [(0, 0, False, 1.0)],
    "flip": _mirrored([(0, 0)]),
    **{f"cross-{s}": _mirrored(_cross(s)) for s in (1, 2, 3)},
    **{f"grid-{s}": _mirrored(_grid(s)) for s in (1, 2, 3)},
    "cross-2 + zoom": _mirrored(_cross(2)) + _mirrored([(0, 0)], ZOOM),
}


def make_view(images, dy: int, dx: int, flip: bool, zoom: float):
    """One view of a [n, h, w, 1] float batch."""
    import tensorflow as tf

    from pipeline.inference import shifted_view

    height, width = images.shape[1], images.shape[2]
    if zoom != 1.0:
        size = (round(height * zoom), round(width * zoom))
        images = tf.image.resize_with_crop_or_pad(
            tf.image.resize(images, size, method="bilinear"), height, width
        )
    view = shifted_view(images, dy, dx)
    return tf.reverse(view, axis=[2]) if flip else view


def study(model, images, labels: np.ndarray, batch_size: int) -> dict[str, dict[str, float]]:
    """Accuracy and macro F1 of every view set, scored as the evaluate stage scores them;
    each distinct view is predicted once."""
    from pipeline.metrics import compute_metrics

    cache: dict[tuple, np.ndarray] = {}
    results = {}
    for name, views in VIEW_SETS.items():
        for view in views:
            if view not in cache:
                cache[view] = model.predict(
                    make_view(images, *view), batch_size=batch_size, verbose=0
                )
        metrics = compute_metrics(labels, np.mean([cache[view] for view in views], axis=0))[0]
        results[name] = {
            "views": len(views),
            "accuracy": metrics["accuracy"],
            "f1_macro": metrics["f1_macro"],
        }
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    base = results["single"]["accuracy"]
    lines = [
        "| view set | views | accuracy | Δ vs single | macro F1 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['views']} | {r['accuracy']:.4f} | {r['accuracy'] - base:+.4f}"
            f" | {r['f1_macro']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench_tta.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", type=Path, default=Path("models/model.h5"))
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("data/processed/validation"),
        help="a folder of <class>/*.png faces, as the preprocess stage writes",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)

    from pipeline.dataset import load_split
    from pipeline.inference import load_model
    from pipeline.machine import cpu_description

    try:
        model = load_model(args.model)
        split = load_split(args.data, model.input_shape[1])
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    images = split.array()
    print(f"- model: {args.model}; {split.count} faces from {args.data}")
    print(f"- CPU: {cpu_description()}\n")
    print(table(study(model, images, split.labels, args.batch_size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
