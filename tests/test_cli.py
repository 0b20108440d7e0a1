"""The command line the stages share (`pipeline.cli.run_stage`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_params, write_params

from pipeline import tracking
from pipeline.cli import run_stage


@pytest.mark.parametrize(
    ("stop", "status", "says"),
    [
        (KeyboardInterrupt(), 130, "stopped: Ctrl-C"),
        (tracking.Terminated("SIGTERM"), 143, "stopped: SIGTERM"),
    ],
)
def test_a_stopped_stage_says_how_and_exits_as_a_shell_reports_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, stop: BaseException, status: int, says: str
) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params())

    def work(params, paths) -> None:
        raise stop

    code = run_stage(["--params", str(params)], stage="train", description="", work=work, errors=())

    assert code == status
    assert says in caplog.text
