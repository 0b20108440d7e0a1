"""Named recipes: tested sets of params that `dvc exp run` applies on top of params.yaml.

A recipe is `recipes/<name>.yaml`, in params.yaml's layout, holding only the keys it
changes; its leading comment says what it is for and what it measured. Run one with

    python -m pipeline.recipes run <name> -S data.source=archive -S data.archive=/abs/path.zip

which checks the recipe and your `-S` overrides against the params schema and then runs
`dvc exp run -n <name>-<date>-<time> -S key=value ...` (your `-S` after the recipe's, so
they win). `--queue` and `--temp` are passed on to DVC. `list` names the recipes and
`show <name>` prints the `dvc exp run` command without running it. Both refuse a
params.yaml whose uncommitted changes the recipe does not override (such as the params
of the last experiment, which DVC applies to the workspace): they would join the run.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline import params
from pipeline.params import ParamsError, load_params, read_raw_params
from pipeline.paths import PARAMS_FILE

RECIPES_DIR = Path("recipes")


class RecipeError(ValueError):
    """A recipe is missing, malformed, or sets a key params.yaml does not have."""


def available(folder: Path = RECIPES_DIR) -> dict[str, Path]:
    """Recipe names and their files."""
    return {path.stem: path for path in sorted(Path(folder).glob("*.yaml"))}


def description(path: Path) -> str:
    """The first line of a recipe's leading comment."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: node}


def load_recipe(name: str, folder: Path = RECIPES_DIR) -> dict[str, Any]:
    """A recipe's settings as dotted keys, e.g. {"train.epochs": 28}."""
    recipes = available(folder)
    if name not in recipes:
        allowed = ", ".join(recipes) or f"none: {folder}/ has no .yaml files"
        raise RecipeError(f"{name!r} is not a recipe in {folder}/; allowed: {allowed}")
    path = recipes[name]
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise RecipeError(f"{path}: expected params groups such as 'train:', found {raw!r}")
    return _flatten(raw)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings, with values read as YAML the way `dvc exp run -S` reads them."""
    try:
        return params.parse_overrides(pairs)
    except ParamsError as exc:
        raise RecipeError(str(exc)) from None


def yaml_value(value: Any) -> str:
    """A value as `-S` text that DVC reads back as the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def command(
    name: str,
    overrides: list[str],
    dvc_args: list[str],
    params_file: Path = PARAMS_FILE,
    folder: Path = RECIPES_DIR,
    experiment: str | None = None,
) -> list[str]:
    """The `dvc exp run` command of a recipe, after checking the merged params."""
    settings = load_recipe(name, folder)
    extra = parse_overrides(overrides)
    try:
        load_params(params_file, {**settings, **extra})
    except ParamsError as exc:
        raise RecipeError(f"recipe {name!r}: {exc}") from None
    experiment = experiment or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    argv = ["dvc", "exp", "run", "-n", experiment]
    for key, value in settings.items():
        argv += ["-S", f"{key}={yaml_value(value)}"]
    for pair in overrides:
        argv += ["-S", pair]
    return argv + dvc_args


def committed_params(params_file: Path) -> dict[str, Any] | None:
    """`params_file` as git's HEAD has it, as dotted keys; None outside a git checkout."""
    folder = params_file.resolve().parent
    try:
        done = subprocess.run(
            ["git", "show", f"HEAD:./{params_file.name}"],
            cwd=folder, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return _flatten(yaml.safe_load(done.stdout) or {})


def leaking_changes(params_file: Path, covered: set[str]) -> dict[str, tuple[Any, Any]]:
    """Keys whose workspace value differs from HEAD's and that neither the recipe nor a
    `-S` sets: {key: (workspace value, HEAD value)}. `dvc exp run` applies a recipe on
    top of the workspace's params.yaml, so these would silently join the experiment, as
    the params of the last experiment do after DVC applies its results to the workspace."""
    head = committed_params(params_file)
    if head is None:
        return {}
    workspace = _flatten(read_raw_params(params_file))
    return {
        key: (workspace.get(key), head.get(key))
        for key in sorted(set(workspace) | set(head))
        if key not in covered and workspace.get(key) != head.get(key)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.recipes",
        description="Run a named recipe from recipes/ as a DVC experiment.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="name the recipes")
    for action, text in (
        ("show", "print the dvc exp run command of a recipe"),
        ("run", "run a recipe with dvc exp run"),
    ):
        cmd = sub.add_parser(action, help=text)
        cmd.add_argument("name", help="a recipe, as named by `list`")
        cmd.add_argument(
            "-S",
            "--set-param",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a param on top of the recipe, e.g. -S data.archive=/data/fer2013.zip",
        )
        cmd.add_argument("-n", "--name", dest="experiment", help="experiment name")
        cmd.add_argument("--queue", action="store_true", help="queue it (dvc exp run --queue)")
        cmd.add_argument("--temp", action="store_true", help="run it in a temporary folder")
    args = parser.parse_args(argv)

    if args.action == "list":
        recipes = available()
        if not recipes:
            print(f"no recipes in {RECIPES_DIR}/", file=sys.stderr)
            return 1
        width = max(len(name) for name in recipes)
        for name, path in recipes.items():
            print(f"{name:<{width}}  {description(path)}")
        return 0

    dvc_args = [flag for flag, on in (("--queue", args.queue), ("--temp", args.temp)) if on]
    try:
        dvc = command(args.name, args.overrides, dvc_args, experiment=args.experiment)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    covered = {pair.partition("=")[0] for flag, pair in itertools.pairwise(dvc) if flag == "-S"}
    leaks = leaking_changes(PARAMS_FILE, covered)
    if leaks:
        listed = "; ".join(f"{k}: {w!r} (HEAD: {h!r})" for k, (w, h) in leaks.items())
        keep = " ".join(f"-S {k}={yaml_value(w)}" for k, (w, _) in leaks.items())
        print(
            f"error: {PARAMS_FILE} differs from HEAD in keys the recipe does not set, which "
            f"would silently join the experiment: {listed}. Run `git checkout {PARAMS_FILE}` "
            f"(after `dvc exp run`, DVC leaves the last experiment's params there) to drop "
            f"them, or keep them with {keep}",
            file=sys.stderr,
        )
        return 2
    print(shlex.join(dvc), flush=True)
    if args.action == "show":
        return 0
    return subprocess.call(dvc)


if __name__ == "__main__":
    sys.exit(main())
