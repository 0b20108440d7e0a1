"""`python -m pipeline.bench`: a real, tiny measurement of every step, and its argument checks."""

from __future__ import annotations

import keras
import pytest
from conftest import tiny_params

from pipeline import bench


@pytest.mark.slow
def test_bench_measures_every_step_of_the_sample(capsys):
    table = bench.run(tiny_params(), ["xception"], steps=1, archive=None)
    assert keras.mixed_precision.global_policy().name == "float32"  # restored for what follows
    header, rows = table.split("\n\n")
    assert "cores" in header and "TensorFlow" in header and "precision:" in header
    lines = rows.splitlines()
    assert lines[0].startswith("| step | arch | images/s |")
    steps = [line.split("|")[1].strip() for line in lines[2:]]
    assert steps == [
        "preprocess",
        "train, stage input",
        "train, in-memory",
        "evaluate",
        "predict",
        "matmul 2048²",
    ]
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        measured = [float(c.replace(",", "")) for c in cells[2:5] if c]
        assert measured and all(value > 0 for value in measured), line
    assert "140 images of the embedded sample" in rows
    assert "× in-memory" in rows


def test_bench_refuses_an_unknown_arch(capsys):
    with pytest.raises(SystemExit) as exited:
        bench.main(["--archs", "seed,alexnet"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "alexnet" in error and "allowed: " in error and "vgg" in error


def test_table_keeps_the_measurement_order_grouped_by_step():
    rows = [
        bench.Row("train, stage input", "seed", images_per_second=150, load=1.0),
        bench.Row("predict", "seed", latency_ms=12.34, load=1.0),
        bench.Row("train, stage input", "vgg", images_per_second=1234.5, load=2.5),
    ]
    lines = bench.format_table(rows).splitlines()[2:]
    assert [line.split("|")[2].strip() for line in lines] == ["seed", "vgg", "seed"]
    assert "| 1,234 |" in lines[1] or "| 1,235 |" in lines[1]
    assert "| 12.3 |" in lines[2]
    assert lines[1].endswith("| 2.50 |")
