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


# -- the tokenizer installer (tokenizer, init --from) -------------------------------------------

def _old_tokenizer(tmp_path):
    from mlmtool.modeldir import ModelDir

    mdir = ModelDir(tmp_path / "m", create=True)
    for name, text in {"tokenizer.json": "old", "special_tokens_map.json": "old", "vocab.txt": "old",
                       "config.json": '{"old": true}'}.items():
        (mdir.path / name).write_text(text)
    return mdir


def test_install_tokenizer_replaces_the_set_and_drops_what_the_new_one_lacks(tmp_path):
    mdir = _old_tokenizer(tmp_path)
    with mdir.tokenizer_staging() as tmp:
        assert tmp.parent == mdir.path
        for name in ("tokenizer.json", "tokenizer_config.json", "merges.txt"):
            (tmp / name).write_text("new")
        installed = mdir.install_tokenizer(tmp, config={"vocab_size": 7})
    assert [p.name for p in installed] == ["merges.txt", "tokenizer_config.json", "tokenizer.json"]  # it last
    assert sorted(p.name for p in mdir.path.iterdir()) == ["config.json", "merges.txt", "tokenizer.json",
                                                          "tokenizer_config.json"]  # no stale vocab.txt, no .tmp
    assert all((mdir.path / n).read_text() == "new" for n in ("tokenizer.json", "tokenizer_config.json"))
    assert json.loads(mdir.config_path.read_text())["vocab_size"] == 7


def test_install_tokenizer_killed_before_tokenizer_json_leaves_no_tokenizer_json(tmp_path, monkeypatch):
    """tokenizer.json marks the stage done: a kill before its rename leaves none (the stage
    reruns), never the old one beside the new config.json."""
    mdir = _old_tokenizer(tmp_path)
    replace = os.replace

    def killed(src, dst):
        if os.path.basename(dst) == "tokenizer.json":
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt), mdir.tokenizer_staging() as tmp:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (tmp / name).write_text("new")
        mdir.install_tokenizer(tmp, config={"vocab_size": 7})
    assert not mdir.tokenizer_path.exists()
    assert not list(mdir.path.glob(".tokenizer.*"))


def test_install_tokenizer_without_tokenizer_json_is_refused_with_dir_untouched(tmp_path):
    from mlmtool.errors import ModelDirError

    mdir = _old_tokenizer(tmp_path)
    before = {p.name: p.read_text() for p in mdir.path.iterdir()}
    with mdir.tokenizer_staging() as tmp:
        (tmp / "vocab.txt").write_text("new")
        with pytest.raises(ModelDirError, match="no tokenizer.json among the tokenizer files"):
            mdir.install_tokenizer(tmp)
    assert {p.name: p.read_text() for p in mdir.path.iterdir()} == before


def test_checkpoint_steps_and_meta_are_what_orbax_reads(tmp_path):
    """The one step lister reads folder names (no orbax import for info, report, stages):
    the same steps as orbax's own manager, an unfinished save and other entries left out."""
    import jax.numpy as jnp

    from mlmtool.training import checkpoint
    from mlmtool.modeldir import checkpoint_meta, checkpoint_steps

    folder = tmp_path / "checkpoints"
    with checkpoint.manager(folder, async_save=False) as mngr:
        for step in (3, 10):
            checkpoint.save(mngr, step, {"w": jnp.ones(2)}, {"m": jnp.zeros(2)}, {"step": step})
        checkpoint.wait(mngr)
    (folder / "20.orbax-checkpoint-tmp-123").mkdir()  # a save in flight (or killed)
    (folder / "²").mkdir()  # isdigit() but not a number
    (folder / "notes").mkdir()
    (folder / "7").write_text("a file, not a step folder")
    with checkpoint.manager(folder, read_only=True, async_save=False) as mngr:
        assert checkpoint_steps(folder) == sorted(mngr.all_steps()) == [3, 10]
    assert checkpoint_meta(folder, 10) == checkpoint.restore_meta(folder, 10) == {"step": 10}  # read without orbax
    assert checkpoint.latest_step(folder) == 10
    assert checkpoint_steps(tmp_path / "absent") == [] and checkpoint.latest_step(tmp_path / "absent") is None
