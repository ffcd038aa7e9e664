"""Bad input: every kind gets exit code 1, one line that names the problem and the fix, no
traceback, and leaves the model directory exactly as it was (files and hashes compared).

Each case sets up a directory (copies of a small prepared / trained one), runs one command
in-process, and checks the ``error:`` line for a phrase of the problem and one of the fix.
Read-only directories and full disks are simulated (tests run as root, where chmod does not
stop writes): ``os.open`` raising EROFS, and the write paths raising ENOSPC.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.pipeline import invoke, prepared_dir


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepared_dir(tmp_path_factory.mktemp("bad-input"))


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    """``prepared`` + 4 training steps: checkpoints 2 and 4, model.safetensors."""
    d = Path(shutil.copytree(prepared, tmp_path_factory.mktemp("bad-input-trained") / "model"))
    r = invoke("train", d, "--max-steps", 4, "--per-device-train-batch-size", 8, "--save-steps", 2,
               "--logging-steps", 2)
    assert r.exit_code == 0, r.output
    return d


def snapshot(d: Path) -> dict[str, str]:
    """Every file (hidden ones too) and folder under ``d``: path → sha256 / "dir"."""
    if not d.exists():
        return {}
    if not d.is_dir():
        return {".": hashlib.sha256(d.read_bytes()).hexdigest()}
    return {str(p.relative_to(d)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*"))}


@dataclass
class Case:
    """``setup(tmp, env)`` makes the input and returns the command line; ``env`` holds the
    fixtures (prepared, trained, corpus, monkeypatch)."""

    id: str
    setup: Callable[[Path, dict], tuple]
    problem: str                  # a phrase of the error that names the problem
    fix: str                      # and one that names the fix
    may_change: tuple[str, ...] = ()  # files a failed command may legitimately touch
    watch: str = "model"          # what to snapshot, relative to tmp
    needs: str = "prepared"       # prepared | trained | none
    extra: dict = field(default_factory=dict)


def _copy(env: dict, tmp: Path, what: str = "prepared") -> Path:
    return Path(shutil.copytree(env[what], tmp / "model"))


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _truncate(path: Path, size: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size is None else size])


def _largest(d: Path) -> Path:
    return max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _edit_config(d: Path, **fields) -> None:
    config = json.loads((d / "config.json").read_text())
    config.update(fields)
    (d / "config.json").write_text(json.dumps(config, indent=2))


def _read_only(env: dict, d: Path) -> None:
    """Writes under ``d`` fail with EROFS, as on a read-only mount."""
    real_open, real_mkdir = os.open, os.mkdir
    root = str(d.resolve())
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def inside(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(root)

    def ro_open(path, flags, *args, **kwargs):
        if flags & writing and inside(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def ro_mkdir(path, *args, **kwargs):
        if inside(path) and os.path.exists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
        if inside(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    env["monkeypatch"].setattr(os, "open", ro_open)
    env["monkeypatch"].setattr(os, "mkdir", ro_mkdir)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# -- the cases ---------------------------------------------------------------------------------

def _missing_dir(tmp, env):
    return ("train", tmp / "model")


def _dir_is_file(tmp, env):
    return ("prepare", _write(tmp / "model", "not a directory\n"), env["corpus"])


def _init_on_file(tmp, env):
    return ("init", _write(tmp / "model", "not a directory\n"))


def _tokenizer_before_init(tmp, env):
    (tmp / "model").mkdir()
    return ("tokenizer", tmp / "model", env["corpus"])


def _prepare_before_tokenizer(tmp, env):
    d = _copy(env, tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / name).unlink()
    shutil.rmtree(d / "data")
    return ("prepare", d, env["corpus"], "--max-seq-length", 32)


def _train_before_prepare(tmp, env):
    d = _copy(env, tmp)
    shutil.rmtree(d / "data")
    return ("train", d)


def _eval_before_train(tmp, env):
    return ("eval", _copy(env, tmp))


def _corpus_missing(tmp, env):
    return ("prepare", _copy(env, tmp), tmp / "no-such-corpus.txt")


def _glob_matches_nothing(tmp, env):
    return ("prepare", _copy(env, tmp), str(tmp / "corpus-*.txt"))


def _empty_corpus(tmp, env):
    return ("tokenizer", _copy(env, tmp), _write(tmp / "empty.txt", ""))


def _whitespace_corpus(tmp, env):
    return ("tokenizer", _copy(env, tmp), _write(tmp / "blank.txt", "   \n\t\n \r\n\n"))


def _not_utf8(tmp, env):
    return ("tokenizer", _copy(env, tmp), _write(tmp / "latin1.txt", "café crème\nnaïve\n".encode("latin-1")))


def _binary(tmp, env):
    return ("prepare", _copy(env, tmp), _write(tmp / "weights.txt", bytes(range(256)) * 8), "--max-seq-length", 32)


def _text_column_jsonl(tmp, env):
    rows = "".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(10))
    return ("tokenizer", _copy(env, tmp), _write(tmp / "docs.jsonl", rows))


def _text_column_csv(tmp, env):
    return ("prepare", _copy(env, tmp), _write(tmp / "docs.csv", "id,text\n1,hello world\n"),
            "--text-column", "content", "--max-seq-length", 32)


def _vocab_below_bytes(tmp, env):
    return ("tokenizer", _copy(env, tmp), env["corpus"], "--vocab-size", 100)


def _vocab_below_alphabet(tmp, env):
    r = invoke("init", tmp / "model", "--preset", "bert-tiny")
    assert r.exit_code == 0, r.output
    return ("tokenizer", tmp / "model", env["corpus"], "--vocab-size", 12)


def _seq_len_beyond_positions(tmp, env):
    return ("prepare", _copy(env, tmp), env["corpus"], "--max-seq-length", 1000)


def _batch_larger_than_data(tmp, env):
    return ("train", _copy(env, tmp), "--per-device-train-batch-size", 100_000)


def _mesh_not_dividing(tmp, env):
    import jax

    return ("train", _copy(env, tmp), "--mesh", f"data=-1,fsdp={jax.device_count() + 1}")


def _unknown_remat_policy(tmp, env):
    return ("train", _copy(env, tmp), "--gradient-checkpointing", "some")


def _unknown_prng_impl(tmp, env):
    return ("train", _copy(env, tmp), "--prng-impl", "philox")


def _config_truncated(tmp, env):
    d = _copy(env, tmp)
    _truncate(d / "config.json")
    return ("train", d)


def _config_not_an_object(tmp, env):
    d = _copy(env, tmp)
    _write(d / "config.json", "[1, 2, 3]\n")
    return ("tokenizer", d, env["corpus"])


def _tokenizer_truncated_prepare(tmp, env):
    d = _copy(env, tmp)
    _truncate(d / "tokenizer.json")
    return ("prepare", d, env["corpus"], "--max-seq-length", 32, "--force")


def _tokenizer_truncated_train(tmp, env):
    d = _copy(env, tmp)
    _truncate(d / "tokenizer.json")
    return ("train", d, "--max-steps", 2)


def _train_bin_truncated(tmp, env):
    d = _copy(env, tmp)
    _truncate(d / "data" / "train.bin", 1000)
    return ("train", d, "--max-steps", 2)


def _meta_truncated(tmp, env):
    d = _copy(env, tmp)
    _truncate(d / "data" / "meta.json")
    return ("train", d, "--max-steps", 2)


def _checkpoint_truncated(tmp, env):
    d = _copy(env, tmp, "trained")
    _truncate(_largest(d / "checkpoints" / "4" / "params"))
    return ("train", d, "--max-steps", 6, "--per-device-train-batch-size", 8, "--save-steps", 2)


def _checkpoint_file_deleted(tmp, env):
    d = _copy(env, tmp, "trained")
    for p in (d / "checkpoints" / "4" / "opt_state").rglob("manifest.ocdbt"):
        p.unlink()
    return ("train", d, "--max-steps", 6, "--per-device-train-batch-size", 8, "--save-steps", 2)


def _checkpoint_meta_truncated(tmp, env):
    d = _copy(env, tmp, "trained")
    _truncate(d / "checkpoints" / "4" / "meta" / "metadata")
    return ("train", d, "--max-steps", 6, "--per-device-train-batch-size", 8, "--save-steps", 2)


def _checkpoint_damaged_eval(tmp, env):
    d = _copy(env, tmp, "trained")
    for p in (d / "checkpoints" / "4" / "params").rglob("manifest.ocdbt"):
        p.unlink()
    return ("eval", d)


def _config_vocab_smaller_than_tokenizer(tmp, env):
    d = _copy(env, tmp)
    _edit_config(d, vocab_size=290)
    return ("prepare", d, env["corpus"], "--max-seq-length", 32, "--force")


def _config_vocab_differs_from_data(tmp, env):
    d = _copy(env, tmp)
    _edit_config(d, vocab_size=320)
    return ("train", d, "--max-steps", 2)


def _unknown_preset(tmp, env):
    return ("init", tmp / "model", "--preset", "robert")


def _unknown_model_type(tmp, env):
    return ("init", tmp / "model", "--from-config",
            _write(tmp / "gpt2.json", json.dumps({"model_type": "gpt2", "vocab_size": 50257})))


def _set_unknown_key(tmp, env):
    return ("init", tmp / "model", "--preset", "tiny", "--set", "hiden_size=64")


def _set_wrong_type(tmp, env):
    return ("init", tmp / "model", "--preset", "tiny", "--set", "num_hidden_layers=two")


def _set_inconsistent(tmp, env):
    return ("init", tmp / "model", "--preset", "tiny", "--set", "num_attention_heads=5")


def _read_only_init(tmp, env):
    d = _copy(env, tmp)
    _read_only(env, d)
    return ("init", d, "--preset", "tiny", "--set", "num_hidden_layers=1", "--force")


def _read_only_tokenizer(tmp, env):
    d = _copy(env, tmp)
    _read_only(env, d)
    return ("tokenizer", d, env["corpus"])


def _read_only_prepare(tmp, env):
    d = _copy(env, tmp)
    _read_only(env, d)
    return ("prepare", d, env["corpus"], "--max-seq-length", 32, "--force")


def _read_only_train(tmp, env):
    d = _copy(env, tmp)
    _read_only(env, d)
    return ("train", d, "--max-steps", 2)


def _disk_full_init(tmp, env):
    d = _copy(env, tmp)
    env["monkeypatch"].setattr(os, "fsync", _disk_full)
    return ("init", d, "--preset", "tiny", "--set", "num_hidden_layers=1", "--force")


def _disk_full_prepare(tmp, env):
    from mlmtool.data import blocks

    env["monkeypatch"].setattr(blocks.SplitWriter, "add_stream", _disk_full)
    return ("prepare", _copy(env, tmp), env["corpus"], "--max-seq-length", 32, "--force")


def _disk_full_tokenizer(tmp, env):
    import tempfile

    real = tempfile.mkdtemp
    env["monkeypatch"].setattr(tempfile, "mkdtemp",
                               lambda *a, **k: _disk_full() if "tokenizer" in str(k) else real(*a, **k))
    return ("tokenizer", _copy(env, tmp), env["corpus"])


def _disk_full_checkpoint(tmp, env):
    import orbax.checkpoint as ocp

    env["monkeypatch"].setattr(ocp.CheckpointManager, "save", _disk_full)
    return ("train", _copy(env, tmp), "--max-steps", 4, "--per-device-train-batch-size", 8, "--save-steps", 2)


CASES = [
    Case("missing-dir", _missing_dir, "model directory", "run 'mlmtool init", needs="none"),
    Case("dir-is-a-file", _dir_is_file, "is not a directory", "pass the model directory"),
    Case("init-on-a-file", _init_on_file, "exists and is not a directory", "choose another path", needs="none"),
    Case("tokenizer-before-init", _tokenizer_before_init, "no config.json", "run 'mlmtool init"),
    Case("prepare-before-tokenizer", _prepare_before_tokenizer, "no tokenizer in", "run 'mlmtool tokenizer"),
    Case("train-before-prepare", _train_before_prepare, "no prepared data", "run 'mlmtool prepare"),
    Case("eval-before-train", _eval_before_train, "no trained model", "run 'mlmtool train"),
    Case("corpus-missing", _corpus_missing, "no-such-corpus.txt does not exist", "check the path"),
    Case("glob-matches-nothing", _glob_matches_nothing, "no files match", "check the pattern"),
    Case("empty-corpus", _empty_corpus, "the corpus has no documents", "one document per line"),
    Case("whitespace-only-corpus", _whitespace_corpus, "only empty or whitespace-only text", "one document per line"),
    Case("not-utf8", _not_utf8, "2 lines were skipped as not valid UTF-8", "iconv -f latin1 -t utf-8"),
    Case("binary-file", _binary, "weights.txt looks binary", "pass UTF-8 text files"),
    Case("text-column-jsonl", _text_column_jsonl, "has no column 'text' (its columns: 'body')", "--text-column"),
    Case("text-column-csv", _text_column_csv, "has no column 'content' (its columns: 'id', 'text')", "--text-column"),
    Case("vocab-below-bytes", _vocab_below_bytes, "vocab size 100 is too small for the 256 byte symbols",
         "--vocab-size 261 or more"),
    Case("vocab-below-alphabet", _vocab_below_alphabet, "vocab size 12 is too small for this corpus' alphabet",
         "or more"),
    Case("seq-len-beyond-positions", _seq_len_beyond_positions, "exceeds the model's limit of 64 positions",
         "--max-seq-length 64 or less"),
    Case("batch-larger-than-data", _batch_larger_than_data, "is larger than the 850 training blocks",
         "lower --per-device-train-batch-size"),
    Case("mesh-not-dividing-devices", _mesh_not_dividing, "devices are not divisible by",
         "choose axis sizes that divide the device count"),
    Case("unknown-remat-policy", _unknown_remat_policy, "--gradient-checkpointing must be one of none, dots, full",
         "fix the option"),
    Case("unknown-prng-impl", _unknown_prng_impl, "--prng-impl must be one of threefry2x32, rbg, unsafe_rbg",
         "fix the option"),
    Case("config-truncated", _config_truncated, "config.json is not valid JSON", "--force', then 'mlmtool tokenizer"),
    Case("config-not-an-object", _config_not_an_object, "config.json has no model_type",
         "--force', then 'mlmtool tokenizer"),
    Case("tokenizer-truncated-prepare", _tokenizer_truncated_prepare, "cannot load",
         "retrain it with 'mlmtool tokenizer"),
    Case("tokenizer-truncated-train", _tokenizer_truncated_train, "is not the tokenizer the data",
         "retrain it with 'mlmtool tokenizer"),
    Case("train-bin-truncated", _train_bin_truncated, "train.bin is damaged: 1,000 bytes",
         "rerun 'mlmtool prepare DIR FILE... --force'"),
    Case("meta-json-truncated", _meta_truncated, "meta.json is unreadable", "rerun 'mlmtool prepare"),
    Case("checkpoint-file-truncated", _checkpoint_truncated, "checkpoint step 4 in", "to resume from step 2",
         may_change=("manifest.json",), needs="trained"),
    Case("checkpoint-file-deleted", _checkpoint_file_deleted, "checkpoint step 4 in", "to resume from step 2",
         may_change=("manifest.json",), needs="trained"),
    Case("checkpoint-meta-truncated", _checkpoint_meta_truncated, "checkpoint step 4 in", "to resume from step 2",
         may_change=("manifest.json",), needs="trained"),
    Case("checkpoint-damaged-eval", _checkpoint_damaged_eval, "checkpoint step 4 in", "to resume from step 2",
         needs="trained"),
    Case("tokenizer-bigger-than-config", _config_vocab_smaller_than_tokenizer,
         "the tokenizer has 300 tokens but config.json's vocab_size is 290",
         "retrain the tokenizer with 'mlmtool tokenizer"),
    Case("config-vocab-differs-from-data", _config_vocab_differs_from_data,
         "made with a vocabulary of 300 but config.json says vocab_size=320", "put back vocab_size=300"),
    Case("unknown-preset", _unknown_preset, "unknown preset 'robert'", "did you mean 'roberta-base'", needs="none"),
    Case("unknown-model-type", _unknown_model_type, "unsupported model_type 'gpt2'", "roberta, bert", needs="none"),
    Case("set-unknown-key", _set_unknown_key, "unknown config key 'hiden_size'", "did you mean 'hidden_size'",
         needs="none"),
    Case("set-wrong-type", _set_wrong_type, "--set num_hidden_layers='two': expected int",
         "--set num_hidden_layers=", needs="none"),
    Case("set-inconsistent", _set_inconsistent, "is not a multiple of num_attention_heads 5", "--set", needs="none"),
    Case("read-only-init", _read_only_init, "Read-only file system", "use a writable directory"),
    Case("read-only-tokenizer", _read_only_tokenizer, "cannot write to", "check the directory's permissions"),
    Case("read-only-prepare", _read_only_prepare, "(Read-only file system)", "check the directory's permissions"),
    Case("read-only-train", _read_only_train, "(Read-only file system)", "check the directory's permissions"),
    Case("disk-full-init", _disk_full_init, "No space left on device", "free some space"),
    Case("disk-full-prepare", _disk_full_prepare, "No space left on device", "free some space"),
    Case("disk-full-tokenizer", _disk_full_tokenizer, "No space left on device", "free some space"),
    Case("disk-full-checkpoint", _disk_full_checkpoint, "cannot save checkpoint step 2 in",
         "free some space, then 'mlmtool train",
         may_change=("manifest.json", "metrics.jsonl", "checkpoints", "tensorboard")),
]


# A failed orbax restore leaves coroutines that pytest reports when they are collected.
_QUIET = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# the cases over a trained directory train it first, disk-full-checkpoint trains to its first save: slow
_TRAINED = [_QUIET, pytest.mark.slow]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=_TRAINED if c.needs == "trained" else
                                               [pytest.mark.slow] if c.id == "disk-full-checkpoint" else [])
                                  for c in CASES])
def test_bad_input(case: Case, request, tmp_path, monkeypatch):
    env = {"monkeypatch": monkeypatch}
    if case.needs != "none":
        env["prepared"] = request.getfixturevalue("prepared")
        env["corpus"] = env["prepared"].parent / "corpus.txt"
    if case.needs == "trained":
        env["trained"] = request.getfixturevalue("trained")
    env.setdefault("corpus", tmp_path / "corpus.txt")
    args = case.setup(tmp_path, env)
    watched = tmp_path / case.watch
    before = snapshot(watched)

    r = invoke(*args)
    monkeypatch.undo()

    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), repr(r.exception)  # handled, not a crash
    assert "Traceback" not in r.output, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr  # one line, the last one
    line = " ".join(errors[0].split())
    assert case.problem in line, line
    assert case.fix in line, line
    assert line.index(case.problem) < line.rindex(case.fix), line  # "problem: fix"

    after = snapshot(watched)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    allowed = {k for k in changed if k.split(os.sep)[0] in case.may_change}
    assert changed == allowed, sorted(changed - allowed)
    for name in allowed:  # what may change is still whole
        p = watched / name
        if p.is_file() and p.suffix in (".json", ".jsonl"):
            [json.loads(x) for x in p.read_text().splitlines()] if p.suffix == ".jsonl" else json.loads(p.read_text())
    if case.id == "disk-full-checkpoint":
        assert not list((watched / "checkpoints").iterdir())  # nothing half-written


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="running as root: chmod does not stop root from writing (see the read-only-* cases, "
                           "which simulate EROFS)")
def test_read_only_directory_for_real(prepared, tmp_path):
    d = Path(shutil.copytree(prepared, tmp_path / "model"))
    before = snapshot(d)
    for p in [d, *d.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        for args in (("tokenizer", d, prepared.parent / "corpus.txt"),
                     ("prepare", d, prepared.parent / "corpus.txt", "--force"), ("train", d, "--max-steps", 1)):
            r = invoke(*args)
            assert r.exit_code == 1 and "Traceback" not in r.output, r.output
            assert "Permission denied" in r.output and "permissions" in r.output, r.output
    finally:
        for p in [d, *d.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert snapshot(d) == before


@pytest.mark.slow
def test_some_lines_not_utf8_are_skipped_with_a_count(prepared, tmp_path):
    d = Path(shutil.copytree(prepared, tmp_path / "model"))
    corpus = tmp_path / "mixed.txt"
    corpus.write_bytes((prepared.parent / "corpus.txt").read_bytes() + "café\nnaïve\n".encode("latin-1"))
    r = invoke("prepare", d, corpus, "--max-seq-length", 32, "--validation-split-percentage", 10)
    assert r.exit_code == 0, r.output
    assert f"warning: skipped 2 lines that are not valid UTF-8: {corpus} (2)" in " ".join(r.stderr.split())
    assert json.loads((d / "data" / "meta.json").read_text())["skipped_lines"] == 2
