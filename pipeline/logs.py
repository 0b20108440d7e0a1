"""Logging set-up shared by the stages' command lines.

Stages start quietly: TensorFlow's C++ start-up lines (oneDNN notices, absl's
"before InitializeLog" warning, CUDA `cuInit` errors on a machine without a GPU)
are hidden. `--verbose`, or `FER_VERBOSE=1` in the environment (for `dvc repro`,
which passes no flags), shows them, with debug messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

VERBOSE_VARIABLE = "FER_VERBOSE"


def verbose_from_environment() -> bool:
    return os.environ.get(VERBOSE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def setup_logging(verbose: bool = False) -> None:
    """Plain `time module LEVEL: message` lines on stderr; debug ones too when verbose."""
    verbose = verbose or verbose_from_environment()
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(module)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if not verbose:  # the Python side of the same chatter (absl, tf.autograph, tf2onnx)
        for name in ("absl", "tensorflow", "tf2onnx"):
            logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def native_stderr_hidden() -> Iterator[None]:
    """Send what native code writes to file descriptor 2 to /dev/null meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def native_quiet() -> contextlib.AbstractContextManager:
    """`native_stderr_hidden()`, unless logging is verbose (`--verbose`, `FER_VERBOSE=1`):
    for TensorFlow calls that log from C++ (the LiteRT converter, the interpreter)."""
    if logging.getLogger().isEnabledFor(logging.DEBUG) or verbose_from_environment():
        return contextlib.nullcontext()
    return native_stderr_hidden()


def import_tensorflow(verbose: bool = False):
    """`import tensorflow`, and its devices found, without its C++ start-up lines.

    Since TensorFlow 2.19 its native logging ignores `TF_CPP_MIN_LOG_LEVEL` until
    absl is initialised, so the lines are hidden at the file descriptor. Once
    imported, later `import tensorflow` statements are silent anyway.
    """
    if "tensorflow" in sys.modules or verbose or verbose_from_environment():
        import tensorflow as tf

        return tf
    with native_stderr_hidden():
        import tensorflow as tf

        tf.config.list_physical_devices()  # where a GPU-enabled build calls cuInit
    return tf


def is_terminal() -> bool:
    """True when progress bars make sense (an interactive terminal, not CI or a log)."""
    return sys.stderr.isatty() and not os.environ.get("CI")
