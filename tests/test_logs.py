"""Stages start quietly: TensorFlow's C++ start-up lines only with --verbose / FER_VERBOSE."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import subprocess_env

from pipeline.logs import VERBOSE_VARIABLE, verbose_from_environment

# What TensorFlow 2.19+ writes to file descriptor 2 while it starts, whatever
# TF_CPP_MIN_LOG_LEVEL says (oneDNN's notice on x86, absl's warning, cuInit errors)
NOISE = ("absl::InitializeLog", "oneDNN custom operations", "cuInit", "cuda_")
START = "from pipeline.logs import import_tensorflow; import_tensorflow(); print('started')"


def start_tensorflow(code: str, **env: str | None) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "started" in done.stdout
    return done.stderr


def noise_in(stderr: str) -> list[str]:
    """Which kinds of start-up line `stderr` holds."""
    return [word for word in NOISE if word in stderr]


@pytest.mark.slow
def test_tensorflow_starts_without_its_native_noise_unless_verbose() -> None:
    plain = start_tensorflow("import tensorflow; print('started')", **{VERBOSE_VARIABLE: None})
    quiet = start_tensorflow(START, **{VERBOSE_VARIABLE: None})
    verbose = start_tensorflow(START, **{VERBOSE_VARIABLE: "1"})

    assert noise_in(quiet) == []
    if not noise_in(plain):
        pytest.skip("this TensorFlow build prints nothing at start-up: nothing to hide")
    assert noise_in(verbose) == noise_in(plain)


@pytest.mark.parametrize(
    ("value", "verbose"), [(None, False), ("", False), ("0", False), ("no", False), ("1", True)]
)
def test_fer_verbose_is_read_as_a_flag(
    monkeypatch: pytest.MonkeyPatch, value: str | None, verbose: bool
) -> None:
    if value is None:
        monkeypatch.delenv(VERBOSE_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(VERBOSE_VARIABLE, value)
    assert verbose_from_environment() is verbose
