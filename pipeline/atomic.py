"""Writing outputs so that an interrupted stage never leaves half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clear_leftovers(dest: Path) -> None:
    """Remove the scratch folders that killed runs left beside `dest` (never a live one)."""
    for scratch in Path(dest).parent.glob(f".{Path(dest).name}.tmp-*"):
        pid = scratch.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if scratch.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty folder to fill; when the block succeeds it replaces `dest`.

    The folder sits in a scratch folder beside `dest` (`.<name>.tmp-<pid>-…`, the same
    file system, so the final step is a rename). On any exception, Ctrl-C included,
    the scratch folder goes and `dest` is left as it was, also when the final rename
    itself fails. Scratch folders of earlier runs that were killed are cleared first.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(dest)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    try:
        out = scratch / "out"
        out.mkdir()
        yield out
        if dest.exists() or dest.is_symlink():
            old = dest.replace(scratch / "old")  # removed with the scratch folder
            try:
                out.replace(dest)
            except BaseException:
                old.replace(dest)
                raise
        else:
            out.replace(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a scratch path beside `path`, with its suffix (libraries that pick a format
    by it pick the same), for a writer that wants a file name; when the block succeeds
    it is renamed over `path` with the mode `open` would give. On any exception it goes
    and `path` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    scratch = Path(tmp)
    try:
        yield scratch
        scratch.chmod(0o666 & ~_umask())
        scratch.replace(path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file through a temporary sibling and a rename (`replacing`); its mode is what
    `open` would give (mkstemp's is 0600, which would make a shared model unreadable to
    others)."""
    with replacing(path) as scratch:
        scratch.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
