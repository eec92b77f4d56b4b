"""`hf_lsce._io`: the one writer of whole files (the trainer's class_weights.json, the examples, the benchmarks)."""

import os
import stat
import tempfile

import pytest

import hf_lsce._io
from hf_lsce._io import atomic_open, write_atomic


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_file_gets_the_permissions_open_gives(tmp_path, umask):
    write_atomic(tmp_path / "new.json", "{}")
    with open(tmp_path / "plain.json", "w") as file:
        file.write("{}")
    assert _mode(tmp_path / "new.json") == _mode(tmp_path / "plain.json") == 0o666 & ~umask
    # Control: the temporary file alone would have had mkstemp's 0o600.
    descriptor, temporary = tempfile.mkstemp(dir=tmp_path)
    os.close(descriptor)
    assert _mode(temporary) == 0o600 != 0o666 & ~umask


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("old")
    os.chmod(path, 0o640)
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and _mode(path) == 0o640


@pytest.mark.parametrize("where", ["in the block", "after the sync"])
def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path, monkeypatch, where):
    path = tmp_path / "record.json"
    write_atomic(path, '{"old": 1}')
    if where == "after the sync":

        def killed(path):
            raise KeyboardInterrupt

        monkeypatch.setattr(hf_lsce._io, "_permissions_for", killed)
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(path) as file:
            file.write('{"new": ')
            if where == "in the block":
                raise KeyboardInterrupt
            file.write("2}")
    assert path.read_text() == '{"old": 1}'
    assert os.listdir(tmp_path) == ["record.json"]  # the temporary file is gone too


def test_the_data_is_synced_before_the_rename(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hf_lsce._io.os, "fsync", lambda fd: calls.append("fsync"))
    monkeypatch.setattr(
        hf_lsce._io.os, "replace", lambda *a, _replace=os.replace: (calls.append("replace"), _replace(*a))
    )
    write_atomic(tmp_path / "record.json", "text é")
    assert calls == ["fsync", "replace"]
    assert (tmp_path / "record.json").read_text(encoding="utf-8") == "text é"


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"mode must be 'w' or 'wb', got 'a'"):
        with atomic_open(tmp_path / "x", "a"):
            pass
    assert os.listdir(tmp_path) == []
