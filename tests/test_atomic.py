"""Atomic writes leave nothing nnU-Net or a glob takes for data, even when the writer is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnunet_ape.atomic import STAGING, atomic_path, remove_leftovers
from nnunet_ape.io import Volume, read_volume, write_volume

KILLED_WRITER = """
import sys, time
from pathlib import Path
from nnunet_ape.atomic import atomic_path
with atomic_path(Path(sys.argv[1])) as tmp:
    Path(tmp).write_bytes(b"half a case")
    print(tmp, flush=True)
    time.sleep(60)
"""


def _cases(folder: Path) -> list[str]:
    """What nnU-Net lists as images: files directly in the folder with the dataset's suffix."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(".nii.gz"))


def test_a_killed_writer_leaves_no_case_and_the_next_write_clears_its_file(tmp_path):
    images = tmp_path / "imagesTr"
    target = images / "case_001_0000.nii.gz"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    tmp = Path(writer.stdout.readline().strip())
    assert tmp.exists() and tmp.parent == images / STAGING
    assert _cases(images) == []  # while it writes, nnU-Net sees no case
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert tmp.exists() and not target.exists() and _cases(images) == []  # killed: nothing under a case's name
    volume = Volume(np.zeros((4, 4, 4), np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    write_volume(volume, images / "case_002_0000.nii.gz")  # any later write into the folder
    assert not tmp.exists() and not (images / STAGING).exists()
    assert _cases(images) == ["case_002_0000.nii.gz"]
    assert read_volume(images / "case_002_0000.nii.gz").shape == (4, 4, 4)


def test_leftovers_of_earlier_versions_are_removed_and_live_writers_kept(tmp_path):
    old = tmp_path / ".tmp_bu0vfue0.nii.gz"  # what atomic_path wrote beside its targets until 2026-12-05
    old.write_bytes(b"")
    staging = tmp_path / STAGING
    staging.mkdir()
    mine = staging / f"{os.getpid()}_abc.nii.gz"  # a writer that still runs (this process)
    mine.write_bytes(b"busy")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = staging / f"{dead.stdout.strip()}_xyz.nii.gz"
    gone.write_bytes(b"torn")
    removed = remove_leftovers(tmp_path)
    assert set(removed) == {old, gone} and mine.exists()
    with atomic_path(tmp_path / "out.json") as path:
        Path(path).write_text("{}")
    assert (tmp_path / "out.json").read_text() == "{}" and mine.exists()


def test_an_error_while_writing_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "boxes.json"
    target.write_text("old")
    try:
        with atomic_path(target) as path:
            Path(path).write_text("new, half")
            raise RuntimeError("killed halfway")
    except RuntimeError:
        pass
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["boxes.json"]


HOLDER = """
import sys, time
from nnunet_ape.locks import locked
with locked(sys.argv[1], int(sys.argv[2])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_lock_refuses_in_one_line_while_held_and_frees_when_its_holder_is_killed(tmp_path):
    from nnunet_ape.errors import InputError
    from nnunet_ape.locks import locked

    lock = tmp_path / ".nnunet_ape" / "Dataset953.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), "1"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(InputError, match="^busy: wait$"):
        with locked(lock, 1, busy="busy: wait"):
            pass
    with locked(lock, 2, busy="busy"):  # another byte: another part
        pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with locked(lock, 1, busy="busy"):  # the kernel dropped the killed holder's lock
        pass


def test_staged_files_move_in_order_and_an_error_leaves_nothing(tmp_path):
    from nnunet_ape.atomic import staged_files

    with staged_files(tmp_path, "case", ("_seg.b2nd", ".pkl", ".b2nd")) as prefix:
        for suffix in ("_seg.b2nd", ".pkl", ".b2nd"):
            Path(prefix + suffix).write_text(suffix)
        assert sorted(p.name for p in tmp_path.iterdir()) == [STAGING]  # nothing visible while it writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.b2nd", "case.pkl", "case_seg.b2nd"]
    assert (tmp_path / "case.b2nd").read_text() == ".b2nd"
    try:
        with staged_files(tmp_path, "other", (".b2nd",)) as prefix:
            Path(prefix + ".b2nd").write_text("half")
            raise RuntimeError("killed halfway")
    except RuntimeError:
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.b2nd", "case.pkl", "case_seg.b2nd"]
