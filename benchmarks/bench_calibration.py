"""How well a trained model's probabilities are calibrated, before and after a temperature
fitted on the validation split: the expected calibration error on validation and test.

    python benchmarks/bench_calibration.py --model models/model.h5 [--data data/processed]

For plain predictions and for the evaluate stage's ten-view TTA, the temperature is fitted
on validation (as `train.temperature_scaling` does, there without TTA) and the ECE of both
splits printed before and after it, beside each split's accuracy (which no temperature
changes). Prints a Markdown table and the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.h5"))
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)

    from pipeline.calibration import apply_temperature, expected_calibration_error, fit_temperature
    from pipeline.dataset import load_split
    from pipeline.inference import load_model, predict_probabilities
    from pipeline.machine import cpu_description
    from pipeline.modelmeta import read_model_info
    from pipeline.runtime import make_deterministic

    make_deterministic(42)
    size = read_model_info(args.model).preprocess.picture_size
    model = load_model(args.model)
    splits = {name: load_split(args.data / name, size) for name in ("validation", "test")}
    print(f"model {args.model}, {cpu_description()}\n")
    print(
        "| predictions | temperature (fitted on validation) | split | accuracy "
        "| ECE before | ECE after |"
    )
    print("|---|---:|---|---:|---:|---:|")
    for tta in (False, True):
        probabilities = {
            name: predict_probabilities(model, split.array(), args.batch_size, tta)
            for name, split in splits.items()
        }
        validation = splits["validation"]
        temperature = fit_temperature(validation.labels, probabilities["validation"])
        for name, split in splits.items():
            p = probabilities[name]
            before = expected_calibration_error(split.labels, p)
            after = expected_calibration_error(split.labels, apply_temperature(p, temperature))
            accuracy = float((p.argmax(1) == split.labels).mean())
            print(
                f"| {'ten-view TTA' if tta else 'plain'} | {temperature:g} | {name} "
                f"({split.count}) | {accuracy:.4f} | {before:.4f} | {after:.4f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
