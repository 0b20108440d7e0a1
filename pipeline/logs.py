"""Logging set-up shared by the stages' command lines."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: int = logging.INFO) -> None:
    """Plain `stage: message` lines on stderr; quiet TensorFlow's C++ start-up chatter."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(module)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def is_terminal() -> bool:
    """True when progress bars make sense (an interactive terminal, not CI or a log)."""
    return sys.stderr.isatty() and not os.environ.get("CI")
