"""benchmarks/bench_calibration.py against the evaluate stage's own calibration errors."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from conftest import tiny_params
from test_evaluate import HISTORY, save_known_model

from pipeline import evaluate
from pipeline.paths import Paths

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bench_calibration.py"
pytestmark = pytest.mark.usefixtures("float32_policy")


def test_before_is_the_evaluate_stages_ece_and_the_temperature_lowers_validations(
    tiny_project: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = tiny_project
    paths.history.write_text(HISTORY)
    save_known_model(paths, tiny_params())
    plain = evaluate.run(tiny_params(), paths)
    spec = importlib.util.spec_from_file_location("bench_calibration", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    assert module.main(["--model", str(paths.model), "--data", str(paths.processed)]) == 0

    rows = re.findall(
        r"^\| (plain|ten-view TTA) \| ([\d.]+) \| (validation|test) \(\d+\) \| ([\d.]+) "
        r"\| ([\d.]+) \| ([\d.]+) \|$",
        capsys.readouterr().out,
        re.MULTILINE,
    )
    table = {(r[0], r[2]): tuple(map(float, (r[1], r[3], r[4], r[5]))) for r in rows}
    assert len(table) == 4
    _, accuracy, before, after = table[("plain", "validation")]
    assert (accuracy, before) == pytest.approx((plain["accuracy"], plain["ece"]), abs=5e-5)
    assert table[("plain", "test")][1:3] == pytest.approx(
        (plain["test"]["accuracy"], plain["test"]["ece"]), abs=5e-5
    )
    assert after <= before  # fitted on validation, by log-loss: rarely worse there
