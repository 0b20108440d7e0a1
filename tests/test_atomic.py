"""atomic_dir: a folder replaced whole or not at all, whatever happens."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.atomic import atomic_dir, clear_leftovers, replacing, write_text_atomic

DEAD_PID = 2**22 + 1  # above Linux's largest pid_max: never a running process


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_success_replaces_the_folder_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    (dest / "old").mkdir(parents=True)
    (dest / "old" / "a.txt").write_text("old")
    with atomic_dir(dest) as work:
        assert list(work.iterdir()) == []
        (work / "b.txt").write_text("new")
    assert _tree(dest) == {"b.txt": b"new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failure_inside_keeps_the_old_folder(tmp_path: Path, error) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "a.txt").write_text("old")
    with pytest.raises(type(error)), atomic_dir(dest) as work:
        (work / "b.txt").write_text("half")
        raise error
    assert _tree(dest) == {"a.txt": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failing_final_rename_puts_the_old_folder_back(tmp_path: Path, monkeypatch) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "a.txt").write_text("old")
    real_replace = Path.replace

    def replace(self, target):
        if self.name == "out" and Path(target) == dest:  # the new folder moving in
            raise OSError("disk trouble")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(OSError, match="disk trouble"), atomic_dir(dest) as work:
        (work / "b.txt").write_text("new")
    assert _tree(dest) == {"a.txt": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_only_scratch_folders_of_dead_processes_are_cleared(tmp_path: Path) -> None:
    dead = tmp_path / f".out.tmp-{DEAD_PID}-abc"
    live = tmp_path / f".out.tmp-{os.getpid()}-def"
    other = tmp_path / f".other.tmp-{DEAD_PID}-ghi"
    for folder in (dead, live, other):
        (folder / "out").mkdir(parents=True)
    clear_leftovers(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_an_atomic_file_gets_the_mode_a_plain_open_gives(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = tmp_path / "atomic.txt"
    write_text_atomic(written, "x")
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_replacing_renames_the_written_file_over_the_old_with_a_plain_mode(
    tmp_path: Path,
) -> None:
    plain = tmp_path / "plain.h5"
    plain.write_text("x")
    model = tmp_path / "model.h5"
    model.write_text("old")
    with replacing(model) as scratch:
        assert scratch.parent == tmp_path
        assert scratch.suffix == ".h5"
        scratch.write_text("new")
        assert model.read_text() == "old"  # not before the block ends
    assert model.read_text() == "new"
    assert stat.S_IMODE(model.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.h5", "plain.h5"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_replacing_keeps_the_old_file_when_the_writer_fails(tmp_path: Path, error) -> None:
    model = tmp_path / "model.h5"
    model.write_text("old")
    with pytest.raises(error), replacing(model) as scratch:
        scratch.write_text("half")
        raise error("the writer broke")
    assert model.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.h5"]
