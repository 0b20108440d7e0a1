"""benchmarks/bench_tta.py: its view sets against the evaluate stage's own answers."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from conftest import tiny_params
from test_evaluate import HISTORY, save_known_model

from pipeline import evaluate, inference
from pipeline.paths import Paths

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bench_tta.py"
pytestmark = pytest.mark.usefixtures("float32_policy")


def load_script():
    spec = importlib.util.spec_from_file_location("bench_tta", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scores(out: str) -> dict[str, tuple[float, float]]:
    """(accuracy, macro F1) of each row of the printed table."""
    rows = re.findall(
        r"^\| ([^|]+?) \| \d+ \| ([01]\.\d{4}) \| [-+]\d\.\d{4} \| ([01]\.\d{4}) \|$",
        out,
        re.MULTILINE,
    )
    return {name: (float(accuracy), float(f1)) for name, accuracy, f1 in rows}


def test_single_and_cross_2_are_the_evaluate_stage_without_and_with_tta(
    tiny_project: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = tiny_project
    paths.history.write_text(HISTORY)
    save_known_model(paths, tiny_params())
    plain = evaluate.run(tiny_params(), paths)
    tta = evaluate.run(tiny_params(**{"evaluate.tta": True}), paths)

    bench_tta = load_script()
    code = bench_tta.main(
        ["--model", str(paths.model), "--data", str(paths.processed / "validation")]
    )

    assert code == 0
    found = scores(capsys.readouterr().out)
    assert set(found) == set(bench_tta.VIEW_SETS)
    for name, metrics in (("single", plain), ("cross-2", tta)):
        assert found[name] == pytest.approx((metrics["accuracy"], metrics["f1_macro"]), abs=5e-5), (
            name
        )
    assert len(bench_tta.VIEW_SETS["cross-2"]) == inference.TTA_VIEWS


def test_a_missing_model_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = load_script().main(["--model", str(tmp_path / "none.h5")])

    assert code == 1
    err = capsys.readouterr().err
    assert "none.h5: no model" in err and "Traceback" not in err
