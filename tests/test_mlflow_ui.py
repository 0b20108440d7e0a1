"""The MLflow UI as a person sees it, in headless Chromium: two sample trainings open on
the runs table, with their dataset, and side by side in the comparison view."""

from __future__ import annotations

import importlib.util
import re

import pytest
from conftest import ROOT, require_binary, tiny_params, write_params

from pipeline import evaluate, train
from pipeline.paths import Paths

spec = importlib.util.spec_from_file_location(
    "mlflow_ui_screenshots", ROOT / "scripts" / "mlflow_ui_screenshots.py"
)
screenshots = importlib.util.module_from_spec(spec)
spec.loader.exec_module(screenshots)


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


@pytest.mark.slow
def test_two_sample_trainings_in_the_ui_runs_table_and_comparison(
    tiny_project: Paths, monkeypatch: pytest.MonkeyPatch, float32_policy
) -> None:
    require_binary("chromium", "apt-get install chromium")
    paths = tiny_project
    monkeypatch.chdir(paths.root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (paths.root / ".dvc").mkdir()  # the project root, where mlflow.db goes
    names = []
    for index, rate in enumerate((0.001, 0.0005)):
        params = tiny_params(**{"train.learning_rate": rate, "mlflow.log_model": False})
        write_params(paths.root / "params.yaml", params)
        monkeypatch.setenv("DVC_EXP_NAME", f"ui-check-{index}")
        train.run_tracked(params, paths)
        evaluate.run_tracked(params, paths)
        names.append(f"ui-check-{index}")
    monkeypatch.delenv("DVC_EXP_NAME")

    out = paths.root / "shots"
    assert screenshots.main(["--out", str(out)]) == 0

    for name in ("mlflow-runs", "mlflow-compare"):
        png = out / f"{name}.png"
        assert png.stat().st_size > 20_000, f"{png} looks empty"
    runs_page = text_of((out / "mlflow-runs.html").read_text())
    for name in names:
        assert name in runs_page
    assert "embedded-sample" in runs_page  # the Dataset column
    # the model-training view, not the GenAI one (whose side bar has these sections)
    assert "Observability" not in runs_page and "Prompts & versions" not in runs_page
    compare_page = text_of((out / "mlflow-compare.html").read_text())
    for name in names:
        assert name in compare_page
    assert "train.learning_rate" in compare_page
