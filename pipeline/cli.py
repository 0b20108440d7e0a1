"""The command line every stage shares: `python -m pipeline.<stage> [--params FILE]`."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

from pipeline.logs import VERBOSE_VARIABLE, import_tensorflow, setup_logging
from pipeline.params import Params, ParamsError, load_params
from pipeline.paths import PARAMS_FILE, Paths

log = logging.getLogger(__name__)


def run_stage(
    argv: list[str] | None,
    *,
    stage: str,
    description: str,
    work: Callable[[Params, Paths], object],
    errors: tuple[type[Exception], ...],
    tensorflow: bool = False,
) -> int:
    """Parse the arguments, load params.yaml and run `work`; return the exit status.

    A stage that computes with TensorFlow (`tensorflow=True`) imports it quietly once
    its params are known to be valid, so bad params fail at once.

    0: done; 1: one of `errors` (its message is the whole story, no traceback);
    2: invalid params; 130 or 143: stopped by Ctrl-C or SIGTERM. Log lines name the
    stage's module (stacklevel=2), not this one.
    """
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{stage}", description=description)
    parser.add_argument(
        "--params", type=Path, default=PARAMS_FILE, help="params file (default: %(default)s)"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help=f"debug messages and TensorFlow's start-up lines (or set {VERBOSE_VARIABLE}=1)",
    )
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        params = load_params(args.params)
        if tensorflow:
            import_tensorflow(args.verbose)
        work(params, Paths())
    except ParamsError as exc:
        log.error("invalid params: %s", exc, stacklevel=2)
        return 2
    except errors as exc:
        log.error("%s", exc, stacklevel=2)
        return 1
    except KeyboardInterrupt as exc:
        log.error("stopped: %s", str(exc) or "Ctrl-C", stacklevel=2)
        return getattr(exc, "exit_status", 130)
    return 0
