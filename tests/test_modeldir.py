"""Model directory helpers: atomic writes keep normal file permissions and leave no temp files."""

import json
import os

import pytest

from mlmtool.modeldir import atomic_write_json


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_uses_umask_permissions_not_mkstemp_0600(tmp_path, mask, mode):
    """The umask in force when the file is written (read then, not at import)."""
    from mlmtool.atomic import atomic_directory, umask

    old = os.umask(mask)
    try:
        assert umask() == mask
        atomic_write_json(tmp_path / "config.json", {"a": 1})
        with atomic_directory(tmp_path / "data"):
            pass
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "config.json").st_mode & 0o777) == mode
    assert (os.stat(tmp_path / "data").st_mode & 0o777) == 0o777 & ~mask  # mkdtemp makes 0700
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "data"]


def test_atomic_write_failure_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic_write_json(path, {"old": True})

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_json(path, {"new": True})
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_atomic_write_flushes_the_file_then_its_directory(tmp_path, monkeypatch):
    """The file's data before the rename, the directory (the rename itself) after it."""
    import stat

    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), fsync(fd))[1])
    atomic_write_json(tmp_path / "a.json", [1])
    assert synced == [False, True]
