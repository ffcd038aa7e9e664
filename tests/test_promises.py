"""The promises of README's "What happens when…", one section per promise (issue 13).

1. Nothing trained or imported is destroyed or invalidated without ``--force``.
2. Diagnose, never misdiagnose.
3. No silent wrong result.
4. One line, never a traceback, never a hang.
5. Interrupted means resumable, with nothing left behind.
6. Shared storage works.

Each case runs the command in-process on a copy of the session's small trained directory
(tests/pipeline.py) or of its state before training, as tests/test_bad_input.py does; what the
command must leave untouched is compared file by file (its ``snapshot``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from tests.pipeline import TRAINED_ARGS, invoke, trained_dir
from tests.test_bad_input import snapshot

# A failed orbax restore leaves coroutines that pytest reports when they are collected.
# end to end, over module-scoped trained directories: slow (make test-fast leaves them out)
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"), pytest.mark.slow]

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The session's trained directory (tests/pipeline.py: TRAINED_ARGS, 20 steps, checkpoints
    10 and 20, model.safetensors), shared with the predict/report/info tests: copy it first."""
    return trained_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def prepared(trained, tmp_path_factory) -> Path:
    """``trained`` before training: config, tokenizer, data (and its corpus beside it)."""
    root = tmp_path_factory.mktemp("promises")
    shutil.copy(trained.parent / "corpus.txt", root / "corpus.txt")
    d = Path(shutil.copytree(trained, root / "model"))
    for name in ("checkpoints", "tensorboard"):
        shutil.rmtree(d / name, ignore_errors=True)
    for name in ("model.safetensors", "metrics.jsonl", "eval_results.json", "manifest.json", "report.png"):
        (d / name).unlink(missing_ok=True)
    return d


@pytest.fixture
def corpus(prepared) -> Path:
    return prepared.parent / "corpus.txt"


def copy(src: Path, tmp: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(src, tmp / name))


def edit_config(d: Path, **fields) -> None:
    config = json.loads((d / "config.json").read_text())
    config.update(fields)
    (d / "config.json").write_text(json.dumps(config, indent=2))


def error_line(r) -> str:
    """The one ``error:`` line of a failed command (exit 1, no traceback), whitespace normalised."""
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    return " ".join(errors[0].split())


def refused(r, d: Path, before: dict, *phrases: str) -> str:
    """A one-line refusal naming ``phrases``, with DIR exactly as it was."""
    line = error_line(r)
    for phrase in phrases:
        assert phrase in line, (phrase, line)
    assert snapshot(d) == before, sorted(set(snapshot(d).items()) ^ set(before.items()))
    return line


# == 4. One line, never a traceback, never a hang =================================================

@pytest.mark.parametrize("args, phrase", [
    (("--learning-rate", "inf"), "--learning-rate must be a positive number, got inf"),
    (("--learning-rate", "nan"), "--learning-rate must be a positive number, got nan"),
    (("--adam-beta1", "1"), "--adam-beta1 must be in [0, 1)"),
    (("--adam-beta2", "1.5"), "--adam-beta2 must be in [0, 1), got 1.5"),
    (("--adam-epsilon", "0"), "--adam-epsilon must be a positive number"),
    (("--weight-decay", "-0.1"), "--weight-decay must be a number >= 0"),
    (("--max-grad-norm", "-1"), "--max-grad-norm must be a number >= 0"),
    (("--num-train-epochs", "inf"), "--num-train-epochs must be a finite number"),
    (("--num-train-epochs", "1e12"), "beyond the 2^31 a run can count"),
    (("--max-steps", str(2**31)), "--max-steps must be below 2^31"),
    (("--seed", "-1"), "--seed must be in [0, 2^32), got -1"),
    (("--seed", str(2**70)), "--seed must be in [0, 2^32)"),
    (("--per-device-eval-batch-size", "0"), "--per-device-eval-batch-size must be positive"),
    (("--warmup-steps", str(2**70)), "--warmup-steps must be below 2^31"),
    (("--masking", "words"), "--masking must be one of token, whole-word, span"),
    (("--masking", "span", "--mlm-probability-final", "0.9"), "span masking leaves at least one word between spans"),
    (("--mlm-probability-final", "1"), "--mlm-probability-final must be in (0, 1)"),
])
def test_train_option_ranges_are_checked_before_any_work(prepared, tmp_path, args, phrase):
    d = copy(prepared, tmp_path)
    before = snapshot(d)
    refused(invoke("train", d, "--per-device-train-batch-size", 8, *args), d, before, phrase)


@pytest.mark.parametrize("args, phrase", [
    (("--mlm-probability", "0"), "--mlm-probability must be in (0, 1), got 0.0"),
    (("--mlm-probability", "1"), "--mlm-probability must be in (0, 1)"),
    (("--per-device-eval-batch-size", "0"), "--per-device-eval-batch-size must be positive, got 0"),
    (("--per-device-eval-batch-size", "-1"), "--per-device-eval-batch-size must be positive"),
    (("--dtype", "float16"), "--dtype must be float32 or bfloat16"),
    (("--masking", "words"), "--masking must be one of token, whole-word, span, got 'words'"),
])
def test_eval_option_ranges(trained, tmp_path, args, phrase):
    """--mlm-probability 0 used to write loss 0 / perplexity 1.00 as the model's result."""
    d = copy(trained, tmp_path)
    before = snapshot(d)
    refused(invoke("eval", d, *args), d, before, phrase)


@pytest.mark.parametrize("args, phrase", [
    (("--vocab-size", str(2**70)), "token ids the block store holds"),
    (("--min-frequency", str(2**70)), "--min-frequency must be in 1 .. 2^32-1"),
])
def test_tokenizer_option_ranges(prepared, corpus, tmp_path, args, phrase):
    d = copy(prepared, tmp_path)
    before = snapshot(d)
    refused(invoke("tokenizer", d, corpus, *args), d, before, phrase)


def test_prepare_num_proc_beyond_the_cores_is_refused(prepared, corpus, tmp_path):
    d = copy(prepared, tmp_path)
    before = snapshot(d)
    refused(invoke("prepare", d, corpus, "--num-proc", 1000, "--max-seq-length", 32, "--force"), d, before,
            "--num-proc 1000 is not in 1 ..", "CPU cores")


@pytest.mark.parametrize("field, value, phrase", [
    ("layer_norm_eps", "1e-5", "config layer_norm_eps must be a number, got '1e-5'"),
    ("hidden_dropout_prob", "0.1", "config hidden_dropout_prob must be a number"),
    ("hidden_size", "32", "config hidden_size must be a positive integer, got '32'"),
    ("pad_token_id", "1", "config pad_token_id must be a token id"),
    ("type_vocab_size", 1.5, "config type_vocab_size must be a positive integer"),
    ("hidden_act", 3, "config hidden_act must be a string"),
    ("num_hidden_layers", 100_000_000, "num_hidden_layers 100,000,000 is beyond mlmtool's limit"),
])
def test_config_json_of_the_wrong_type_or_size_at_predict(trained, tmp_path, field, value, phrase):
    d = copy(trained, tmp_path)
    edit_config(d, **{field: value})
    before = snapshot(d)
    refused(invoke("predict", d, "the <mask> said"), d, before, phrase)


def test_init_refuses_absurd_sizes(tmp_path):
    r = invoke("init", tmp_path / "model", "--preset", "tiny", "--set", "num_hidden_layers=100000000")
    assert "beyond mlmtool's limit" in error_line(r)
    r = invoke("init", tmp_path / "model", "--preset", "tiny", "--set", "vocab_size=100000000000000")
    assert "beyond the 4,294,967,296 token ids" in error_line(r)
    r = invoke("init", tmp_path / "model", "--preset", "tiny", "--set", "hidden_size=10000000",
               "--set", "num_attention_heads=1")
    assert "parameters, beyond mlmtool's limit" in error_line(r)


def test_report_output_is_checked_before_any_work(trained, tmp_path):
    d = copy(trained, tmp_path)
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("x")
    before = snapshot(d)
    for output, phrase in ((tmp_path / "r.xyz", "cannot write a figure as .xyz"),
                           (tmp_path / "noext", "a file without an extension"),
                           (tmp_path / "a-dir", "is a directory"),
                           (tmp_path / "a-file" / "r.png", "is not a directory")):
        refused(invoke("report", d, "-o", output), d, before, phrase)
    assert invoke("report", d, "-o", tmp_path / "r.svg").exit_code == 0
    assert (tmp_path / "r.svg").read_text().lstrip().startswith("<?xml")


# == 6. Shared storage works ======================================================================

def test_weights_and_block_store_honour_the_umask(trained, prepared, corpus, tmp_path, request):
    """model.safetensors, init.safetensors and data/ were 0600/0700 whatever the umask."""
    from mlmtool.models import load_model

    request.addfinalizer(lambda old=os.umask(0o022): os.umask(old))  # read when each file is written
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    d = copy(prepared, tmp_path)
    assert invoke("prepare", d, corpus, "--max-seq-length", 32, "--validation-split-percentage", 10,
                  "--force").exit_code == 0
    assert mode(d / "data") == 0o755
    assert all(mode(p) == 0o644 for p in (d / "data").iterdir())
    # train's export, as train writes it
    loaded = load_model(json.loads((trained / "config.json").read_text()))
    loaded.save_hf(loaded.load_hf(trained / "model.safetensors"), d / "model.safetensors")
    assert mode(d / "model.safetensors") == 0o644
    # init --from converts the weights into init.safetensors with the same helper
    r = invoke("init", tmp_path / "cont", "--from", d)
    assert r.exit_code == 0, r.output
    assert mode(tmp_path / "cont" / "init.safetensors") == 0o644


@pytest.mark.parametrize("name", ["../../outside.bin", "/etc/passwd", "sub/train.bin", ".."])
def test_paths_in_meta_json_stay_inside_dir(prepared, tmp_path, name):
    d = copy(prepared, tmp_path)
    meta = json.loads((d / "data" / "meta.json").read_text())
    meta["files"]["train"] = name
    (d / "data" / "meta.json").write_text(json.dumps(meta))
    before = snapshot(d)
    refused(invoke("train", d, "--max-steps", 1, "--per-device-train-batch-size", 8), d, before,
            f"names {name!r} for the train split, a path outside", "mlmtool prepare")


# == 3. No silent wrong result ====================================================================

@pytest.mark.parametrize("suffix", [".gz", ".xz", ".bz2", ".zst"])
def test_every_compressed_format_fails_loudly_when_truncated(prepared, corpus, tmp_path, suffix):
    """A truncated .zst was read as a shorter corpus, with exit 0."""
    import bz2
    import gzip
    import lzma

    import zstandard

    compress = {".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress,
                ".zst": zstandard.ZstdCompressor().compress}[suffix]
    data = compress(corpus.read_bytes() * 4)
    whole, cut = tmp_path / f"whole.txt{suffix}", tmp_path / f"cut.txt{suffix}"
    whole.write_bytes(data)
    cut.write_bytes(data[: len(data) * 3 // 4])
    d = copy(prepared, tmp_path)
    before = snapshot(d)
    for command in ("tokenizer", "prepare"):
        refused(invoke(command, d, cut, *(("--max-seq-length", 32) if command == "prepare" else ())), d, before,
                f"cannot decompress {cut}", "the file is damaged")
    r = invoke("prepare", d, whole, "--max-seq-length", 32, "--validation-split-percentage", 10)
    assert r.exit_code == 0, r.output
    meta = json.loads((d / "data" / "meta.json").read_text())
    assert sum(meta["documents"].values()) == 4 * len(corpus.read_text().splitlines())


def test_zstd_with_several_frames_is_read_whole(tmp_path):
    import zstandard

    from mlmtool.data.corpus import open_corpus

    path = tmp_path / "two-frames.txt.zst"
    c = zstandard.ZstdCompressor()
    path.write_bytes(c.compress(b"first document\n" * 5000) + c.compress(b"second document\n"))
    docs = [doc for b in open_corpus([path]).batches(batch_bytes=4096) for doc in b.documents]
    assert len(docs) == 5001 and docs[-1] == "second document"


def test_predict_refuses_a_text_longer_than_the_model_reads(trained, tmp_path):
    """A mask past the model's positions got no prediction, and predict exited 0."""
    d = copy(trained, tmp_path)
    before = snapshot(d)
    long = " ".join(["the king said"] * 30) + " <mask>."
    refused(invoke("predict", d, long), d, before, "tokens long, but the model reads at most 64",
            "shorten the text")
    assert invoke("predict", d, "the king said <mask>.").exit_code == 0


def test_line_by_line_blocks_of_only_special_tokens_are_flagged_then_refused(prepared, corpus, tmp_path):
    """--line-by-line --max-seq-length 2 trained to a "perfect" model (loss 0 over nothing)."""
    d = copy(prepared, tmp_path)
    r = invoke("prepare", d, corpus, "--line-by-line", "--max-seq-length", 2, "--validation-split-percentage", 10,
               "--force")
    assert r.exit_code == 0, r.output
    assert "warning: --line-by-line blocks of 2 tokens hold only the 2 special tokens" in " ".join(r.stderr.split())
    line = error_line(invoke("train", d, "--max-steps", 2, "--per-device-train-batch-size", 8, "--logging-steps", 1))
    assert "no token was chosen for prediction in steps 1..1: the loss would read 0" in line, line
    assert not (d / "checkpoints").exists() or not any((d / "checkpoints").iterdir())
    r = invoke("prepare", d, corpus, "--line-by-line", "--max-seq-length", 3, "--validation-split-percentage", 10,
               "--force")
    assert r.exit_code == 0 and "warning" not in r.output, r.output


def _special_only(d: Path, split: str) -> None:
    import numpy as np

    meta = json.loads((d / "data" / "meta.json").read_text())
    path = d / "data" / f"{split}.bin"
    np.full(path.stat().st_size // 2, meta["cls_token_id"], dtype="<u2").tofile(path)


def test_nothing_to_predict_is_no_perfect_score(trained, prepared, tmp_path):
    """Blocks without a maskable token gave loss 0 / perplexity 1.00 in eval and train."""
    d = copy(trained, tmp_path)
    _special_only(d, "validation")
    before = snapshot(d)
    refused(invoke("eval", d), d, before, "hold no token to predict", "mlmtool prepare")
    # train on such blocks: test_line_by_line_blocks_of_only_special_tokens_are_flagged_then_refused


def test_nan_weights_fail_eval_and_predict(trained, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    d = copy(trained, tmp_path)
    shutil.rmtree(d / "checkpoints")
    state = load_file(d / "model.safetensors")
    key = sorted(state)[0]
    state[key] = state[key] * np.nan
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    before = snapshot(d)
    refused(invoke("eval", d), d, before, "computed a loss of nan", "evaluate another checkpoint")
    refused(invoke("predict", d, "the <mask> said"), d, before, "predictions are not finite", "--checkpoint")


# == 1. Nothing trained or imported is destroyed or invalidated without --force ====================

def test_tokenizer_refuses_to_replace_the_tokenizer_of_a_trained_model(trained, corpus, tmp_path):
    """It retrained the tokenizer, changed vocab_size, and every checkpoint stopped loading."""
    d = copy(trained, tmp_path)
    before = snapshot(d)
    refused(invoke("tokenizer", d, corpus, "--vocab-size", 320), d, before,
            "holds a model trained with its tokenizer (checkpoints up to step 20, model.safetensors)",
            "train the new tokenizer in a new directory", "--force")
    shutil.rmtree(d / "checkpoints")  # the export alone is protected too
    before = snapshot(d)
    refused(invoke("tokenizer", d, corpus), d, before, "(model.safetensors)")
    r = invoke("tokenizer", d, corpus, "--vocab-size", 320, "--force")
    assert r.exit_code == 0, r.output
    assert json.loads((d / "config.json").read_text())["vocab_size"] == 320


def test_a_tokenizer_retrained_over_prepared_data_says_the_data_is_stale(prepared, corpus, tmp_path):
    d = copy(prepared, tmp_path)
    r = invoke("tokenizer", d, corpus)  # the same tokenizer again: nothing is invalidated, no warning
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    r = invoke("tokenizer", d, corpus, "--vocab-size", 320)
    assert r.exit_code == 0, r.output
    assert "was prepared with the previous tokenizer: run 'mlmtool prepare" in " ".join(r.stderr.split())
    line = error_line(invoke("train", d, "--max-steps", 1, "--per-device-train-batch-size", 8))
    assert "mlmtool prepare" in line and "--force" in line, line


def test_a_save_pretrained_directory_is_trained_from_its_weights(trained, corpus, tmp_path):
    """config + tokenizer + model.safetensors (as save_pretrained writes) then prepare and train
    silently replaced the user's weights with a random initialisation."""
    from safetensors.numpy import load_file

    d = tmp_path / "hf"
    d.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "model.safetensors"):
        shutil.copy(trained / name, d / name)
    r = invoke("prepare", d, corpus, "--max-seq-length", 32, "--validation-split-percentage", 10)
    assert r.exit_code == 0, r.output
    before = snapshot(d)
    refused(invoke("train", d, "--max-steps", 1, "--per-device-train-batch-size", 8, "--no-resume"), d, before,
            "model.safetensors holds trained weights that --no-resume would replace", "add --force")
    mine = load_file(d / "model.safetensors")
    r = invoke("train", d, "--max-steps", 1, "--per-device-train-batch-size", 8, "--learning-rate", "1e-9")
    assert r.exit_code == 0, r.output
    assert "".join(f"Starting from the weights in {d / 'model.safetensors'}".split()) in "".join(r.output.split())
    after = load_file(d / "model.safetensors")  # one step at lr 1e-9: still the user's weights
    key = "roberta.embeddings.word_embeddings.weight"
    assert abs(after[key] - mine[key]).max() < 1e-6


def test_imported_weights_that_do_not_fit_the_config_are_not_overwritten(trained, tmp_path):
    d = copy(trained, tmp_path)
    shutil.rmtree(d / "checkpoints")
    edit_config(d, intermediate_size=48)
    before = snapshot(d)
    refused(invoke("train", d, "--max-steps", 1, "--per-device-train-batch-size", 8), d, before,
            "model.safetensors does not fit config.json", "--no-resume --force")


def test_init_takes_the_lock_of_a_running_command(trained, tmp_path):
    """init --force during a running train rewrote config.json under it."""
    from mlmtool.modeldir import ModelDir

    d = copy(trained, tmp_path)
    before = snapshot(d)
    with ModelDir(d).lock("train"):
        refused(invoke("init", d, "--preset", "tiny", "--force"), d, snapshot(d), "is in use by 'mlmtool train'")
    refused(invoke("init", d, "--preset", "tiny"), d, before,
            "already exists with a different config (checkpoints up to step 20, model.safetensors were made with it)",
            "--force")
    r = invoke("init", d, "--preset", "tiny", "--force")
    assert r.exit_code == 0, r.output
    assert "model.safetensors in" in r.stderr and "were made with the earlier config" in r.stderr, r.stderr


@pytest.mark.parametrize("how", ["other-settings", "damaged-checkpoint"])
def test_a_refused_train_leaves_the_manifest_as_it_was(trained, tmp_path, how):
    """It rewrote manifest.json, losing the record of the settings that resume needs."""
    d = copy(trained, tmp_path)
    if how == "other-settings":
        args = ("--seed", 7)
    else:
        for p in (d / "checkpoints" / "20" / "params").rglob("manifest.ocdbt"):
            p.unlink()
        args = ()
    before = snapshot(d)
    line = error_line(invoke("train", d, *TRAINED_ARGS, *args))
    assert "seed=0" in line or "damaged" in line, line
    assert snapshot(d) == before


# == 2. Diagnose, never misdiagnose ===============================================================

@pytest.mark.parametrize("command", ["eval", "predict", "train"])
def test_a_changed_config_is_named_not_called_damage(trained, tmp_path, command):
    """eval/predict/train said "checkpoint step 20 is damaged, delete it" about good checkpoints."""
    d = copy(trained, tmp_path)
    edit_config(d, intermediate_size=48)
    before = snapshot(d)
    args = {"eval": (), "predict": ("the <mask> said",),
            "train": ("--max-steps", 6, "--per-device-train-batch-size", 8)}
    line = refused(invoke(command, d, *args[command]), d, before,
                   "config.json no longer matches checkpoint step 20", "intermediate_size 64 -> 48",
                   "put back intermediate_size=64 in", "--no-resume --force")
    assert "damaged" not in line and "delete" not in line, line


def test_a_field_that_keeps_the_shapes_is_named_too(trained, tmp_path):
    """num_attention_heads changes no parameter shape: the checkpoint's recorded config names it."""
    d = copy(trained, tmp_path)
    edit_config(d, num_attention_heads=4)
    before = snapshot(d)
    refused(invoke("eval", d), d, before, "num_attention_heads 2 -> 4", "put back num_attention_heads=2")


def test_a_retrained_tokenizer_is_named_as_the_cause(trained, corpus, tmp_path):
    d = copy(trained, tmp_path)
    assert invoke("tokenizer", d, corpus, "--vocab-size", 320, "--force").exit_code == 0
    before = snapshot(d)
    refused(invoke("eval", d, "--checkpoint", "10"), d, before, "vocab_size 300 -> 320",
            "put back the old tokenizer files too")


# == 5. Interrupted means resumable, with nothing left behind =====================================

def test_plain_train_resumes_with_the_recorded_settings(trained, tmp_path):
    """After Ctrl-C the tool says "run 'mlmtool train DIR' again", and exactly that failed: the
    batch size had to be repeated."""
    d = copy(trained, tmp_path)
    shutil.rmtree(d / "checkpoints" / "20")  # as if stopped at step 10
    before = snapshot(d)
    # options given now still must match what fixes the data order
    refused(invoke("train", d, "--per-device-train-batch-size", 4), d, before,
            "trained with global_batch=8, this run has global_batch=4", "--no-resume --force")
    r = invoke("train", d)
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "Resuming with the settings recorded at step 10: --per-device-train-batch-size 8" in out, out
    assert "--learning-rate 0.005" in out and "Resuming from checkpoint step 10 (of 20)" in out, out
    from mlmtool.modeldir import checkpoint_steps

    assert checkpoint_steps(d / "checkpoints") == [10, 20]
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["train"]["args"]["per_device_train_batch_size"] == 8


def test_a_failed_checkpoint_save_leaves_no_temporary_folder(tmp_path):
    """A full disk during train left checkpoints/<step>.orbax-checkpoint-tmp filling the disk.
    (train's path to this: test_bad_input's disk-full-checkpoint case.)"""
    import errno

    from mlmtool.training import checkpoint

    ckpts = tmp_path / "model" / "checkpoints"
    tmp = ckpts / "2.orbax-checkpoint-tmp-1234"
    (tmp / "params").mkdir(parents=True)
    (tmp / "params" / "d").write_bytes(b"\0" * 4096)
    with checkpoint.manager(ckpts, async_save=False) as mngr:
        e = checkpoint.save_error(mngr, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 2)
    assert "cannot save checkpoint step 2" in str(e) and "the disk is full" in str(e), str(e)
    assert list(ckpts.iterdir()) == []


# `mlmtool` reading its corpus and writing blocks slowly (a bigger corpus, in effect), so that
# the signal lands mid-run and not while the finished artefact is being renamed into place.
_SLOW = r"""
import sys, time
from mlmtool.data import blocks
from mlmtool.data.corpus import readers
read, add = readers.READERS["txt"], blocks.SplitWriter.add_stream
def slow_read(*a, **k):
    for batch in read(*a, **k):
        time.sleep(0.1)
        yield batch
def slow_add(self, tokens):
    time.sleep(0.15)
    return add(self, tokens)
readers.READERS["txt"], blocks.SplitWriter.add_stream = slow_read, slow_add
from mlmtool.cli import main
sys.argv = ["mlmtool", *sys.argv[1:]]
main()
"""


def _sigterm(tmp_path: Path, args: list, started) -> tuple[int, str]:
    import signal
    import subprocess
    import sys

    from tests.test_reliability import ENV, ROOT, wait_for

    p = subprocess.Popen([sys.executable, "-c", _SLOW, *map(str, args)], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(started, timeout=120, what="the command to start writing")
        assert p.poll() is None, "it finished before the signal"
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return p.returncode, " ".join(err.split())


@pytest.mark.parametrize("command", ["prepare", "tokenizer"])
def test_sigterm_during_prepare_or_tokenizer_cleans_up_and_says_so(prepared, tmp_path, command):
    """SIGTERM exited 143 with no message and left a temporary block store and the lock."""
    import time

    from tests.test_reliability import _big_corpus

    big = _big_corpus(tmp_path / "big.txt", mb=3)
    d = copy(prepared, tmp_path)
    before = snapshot(d)
    if command == "prepare":
        args = ["prepare", d, big, "--max-seq-length", 32, "--num-proc", 2, "--force"]
        started = lambda: [x for x in d.glob(".data.*") if (x / ".train.bin.tmp").exists()]  # noqa: E731
    else:
        args = ["tokenizer", d, big, "--force"]
        started = lambda: (d / ".mlmtool.runtime.lock").exists() and time.sleep(0.5) is None  # noqa: E731
    rc, err = _sigterm(tmp_path, args, started)
    assert rc == 143, err
    assert "error: stopped by SIGTERM; temporary files removed" in err and "Traceback" not in err, err
    assert snapshot(d) == before  # no .data.*.tmp, no .tokenizer.*.tmp, no lock, data as it was


def test_a_fifo_corpus_is_refused_not_waited_on(prepared, tmp_path):
    """A FIFO given as a corpus hung prepare for ever (it was opened twice)."""
    import signal

    fifo = tmp_path / "stream.txt"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # data waiting, and a writer that never closes
    os.write(writer, b"the king said good night\n" * 100)

    def hung(*_):
        raise AssertionError("the command waited on the FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        d = copy(prepared, tmp_path)
        before = snapshot(d)
        for command in ("tokenizer", "prepare"):
            refused(invoke(command, d, fifo, "--force"), d, before, "is a named pipe (FIFO)",
                    "write the stream to a file first")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.close(writer)


# == Issue 21, class 1: a stage never loses or hides the run it starts from ========================
# train --from-checkpoint checks the source and restores it in memory, saves the new stage's
# step 0 into DIR/stages/.next, and only then archives DIR's checkpoints (mlmtool.training.stages).

STAGE = ("--max-steps", 2, "--per-device-train-batch-size", 8, "--save-steps", 1, "--logging-steps", 1,
         "--learning-rate", 1e-3, "--lr-scheduler", "constant")


def _steps(folder: Path) -> list[int]:
    from mlmtool.modeldir import checkpoint_steps

    return checkpoint_steps(folder)


def _run_before_continues(d: Path) -> None:
    """A plain ``train`` continues the run DIR had (the trained fixture's, complete at step 20)."""
    r = invoke("train", d)
    assert r.exit_code == 0, r.output
    assert "Training already complete at step 20" in r.output and "New stage" not in r.output, r.output
    assert _steps(d / "checkpoints") == [10, 20] and not (d / "stages" / ".next").exists()


@pytest.fixture(scope="module")
def other_model(prepared, tmp_path_factory) -> Path:
    """A checkpoint (step 5) of another config: ``prepared`` with intermediate_size 48."""
    import jax

    from mlmtool.training import checkpoint
    from mlmtool.modeldir import ModelDir
    from mlmtool.training.train import TrainConfig, Trainer

    d = Path(shutil.copytree(prepared, tmp_path_factory.mktemp("other") / "model"))
    edit_config(d, intermediate_size=48)
    t = Trainer(ModelDir(d), TrainConfig(max_steps=1, per_device_train_batch_size=8))
    state = t.training.init_state(jax.random.PRNGKey(0))
    with checkpoint.manager(d / "checkpoints", async_save=False) as mngr:
        checkpoint.save(mngr, 5, state.params, state.opt_state, t._meta(5))
        checkpoint.wait(mngr)
    return d


def _edit_meta(folder: Path, step: int, edit) -> None:
    path = folder / str(step) / "meta" / "metadata"  # orbax's JSON item
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("kind, phrase", [
    ("another-config", "intermediate_size 48 -> 64 (checkpoint -> DIR's config.json)"),
    ("another-family", "it is a modernbert model, DIR's config.json is a roberta model"),
    ("unrecorded-config", "intermediate_size 48 -> 64"),  # an older checkpoint: its shapes tell
])
def test_a_source_that_does_not_fit_is_refused_before_anything_moves(trained, other_model, tmp_path, kind, phrase):
    d, src = copy(trained, tmp_path), copy(other_model, tmp_path, "other") / "checkpoints"
    if kind == "another-family":
        _edit_meta(src, 5, lambda m: m["config"].update(model_type="modernbert"))
    elif kind == "unrecorded-config":
        _edit_meta(src, 5, lambda m: m.pop("config"))
    before = snapshot(d)
    line = refused(invoke("train", d, "--from-checkpoint", src, *STAGE), d, before,
                   f"checkpoint step 5 in {src} does not fit DIR's model", phrase,
                   "nothing was moved: DIR's checkpoints are as they were")
    assert "damaged" not in line and "delete" not in line, line
    if kind == "another-config":
        _run_before_continues(d)


def test_dir_s_own_checkpoints_are_dir_s_however_spelled(trained, tmp_path):
    from mlmtool.training import stages
    from mlmtool.modeldir import ModelDir

    d = copy(trained, tmp_path)
    link = tmp_path / "link"
    link.symlink_to(d, target_is_directory=True)
    (tmp_path / "sub").mkdir()
    for source in (d / "checkpoints" / "20", f"{tmp_path}/sub/../model/checkpoints/20", link / "checkpoints",
                   link, f"{link}/checkpoints/../checkpoints/10"):
        folder, step, own = stages.resolve(str(source), ModelDir(d))
        assert own and folder == d / "checkpoints" and step in (10, 20), source
    assert stages.resolve("20", ModelDir(link))[2]  # DIR given through the symlink
    # and the stage runs: the source is restored before DIR's checkpoints move
    r = invoke("train", link, "--from-checkpoint", f"{tmp_path}/sub/../link/checkpoints/20", *STAGE)
    assert r.exit_code == 0, r.output
    assert _steps(d / "stages" / "1" / "checkpoints") == [10, 20] and _steps(d / "checkpoints") == [0, 1, 2]
    from mlmtool.training import checkpoint

    started = checkpoint.restore_meta(d / "checkpoints", 0)["started_from"]
    assert started["step"] == 20 and started["checkpoint"].endswith("stages/1/checkpoints/20"), started


class _Killed(BaseException):
    """kill -9, in process: no cleanup of mlmtool's runs (it catches Exception only)."""


def test_a_full_disk_at_the_stage_s_step_0_moves_nothing(trained, tmp_path, monkeypatch):
    import errno

    import orbax.checkpoint as ocp

    d = copy(trained, tmp_path)
    before = snapshot(d)

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(d / "stages/.next/checkpoints/0.orbax-tmp"))

    with monkeypatch.context() as m:
        m.setattr(ocp.CheckpointManager, "save", full)
        refused(invoke("train", d, "--from-checkpoint", "latest", *STAGE), d, before,
                "the new stage did not start: the disk is full", "free some space, then run the same",
                "nothing was moved", "a plain 'mlmtool train' continues the run before")
    _run_before_continues(d)


@pytest.mark.parametrize("where", ["mid-save", "before-archive", "between-renames"])
def test_a_stage_killed_at_its_start_leaves_one_run_that_train_continues(trained, tmp_path, monkeypatch, where):
    """Killed while step 0 is written: the stage never started, the run before goes on.  Killed
    once step 0 is complete: a plain ``train`` finishes the move and resumes the stage."""
    from mlmtool.training import checkpoint, stages

    d = copy(trained, tmp_path)
    with monkeypatch.context() as m:
        if where == "mid-save":
            def save(mngr, step, *a, **k):  # what a kill leaves: orbax's unfinished folder
                (Path(str(mngr.directory)) / "0.orbax-checkpoint-tmp-1").mkdir(parents=True)
                raise _Killed
            m.setattr(checkpoint, "save", save)
        else:
            rename, calls = stages._rename, []

            def killed_rename(src, dst):
                calls.append(src)
                if len(calls) == (1 if where == "before-archive" else 2):
                    raise _Killed
                rename(src, dst)
            m.setattr(stages, "_rename", killed_rename)
        with pytest.raises(_Killed):
            invoke("train", d, "--from-checkpoint", "latest", *STAGE, "--max-steps", 3)
    assert (d / "stages" / ".next").exists()
    r = invoke("info", d)
    assert r.exit_code == 0 and "finishes the start of the interrupted stage" in " ".join(r.output.split()), r.output
    if where == "mid-save":
        _run_before_continues(d)
        return
    r = invoke("train", d)  # a plain train: finishes the start, resumes the stage with its settings
    out = " ".join(r.output.split())
    assert r.exit_code == 0, r.output
    assert "Finished the start of the stage that was interrupted after its step 0" in out, out
    assert "Resuming from checkpoint step 0 (of 3)" in out, out
    assert _steps(d / "stages" / "1" / "checkpoints") == [10, 20] and _steps(d / "checkpoints")[-1] == 3
    assert not (d / "stages" / ".next").exists()


@pytest.mark.slow
def test_kill_9_right_after_the_stage_s_step_0_is_saved(trained, tmp_path):
    """A real SIGKILL (tests/test_reliability's hook) once step 0 is written, before DIR's
    checkpoints are archived: the next plain ``train`` finishes the start and trains the stage."""
    import signal

    from tests.test_reliability import Run

    d = copy(trained, tmp_path)
    run = Run(tmp_path, "stage", "train", d, "--from-checkpoint", "latest", *STAGE,
              env={"MLMTOOL_TEST_KILL_IN_SAVE": "1"})
    try:
        assert run.wait() == -signal.SIGKILL, run
    finally:
        run.stop()
    assert "KILLED IN SAVE 0" in run.out, run
    assert _steps(d / "checkpoints") == [10, 20] and _steps(d / "stages" / ".next" / "checkpoints") == [0]
    r = invoke("train", d)
    out = " ".join(r.output.split())
    assert r.exit_code == 0 and "Finished the start of the stage" in out, out
    assert "Resuming from checkpoint step 0" in out, out
    assert _steps(d / "stages" / "1" / "checkpoints") == [10, 20] and _steps(d / "checkpoints")[-1] == 2


# == Issue 21, class 2: a trained export is never overwritten by a restart from older weights ======

def test_without_checkpoints_train_continues_the_export_not_init_safetensors(trained, tmp_path):
    """On a DIR made with ``init --from``, once checkpoints/ was gone, ``train`` started again from
    init.safetensors and overwrote the trained model.safetensors without --force."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    d = copy(trained, tmp_path)
    shutil.rmtree(d / "checkpoints")  # deleted to save space
    trained_weights = load_file(d / "model.safetensors")
    save_file({k: np.zeros_like(v) for k, v in trained_weights.items()}, d / "init.safetensors")  # older weights
    before = snapshot(d)
    refused(invoke("train", d, "--max-steps", 1, "--per-device-train-batch-size", 8, "--no-resume"), d, before,
            "model.safetensors holds trained weights that --no-resume would replace with the weights of "
            "init.safetensors", "add --force")
    r = invoke("train", d, "--max-steps", 1, "--per-device-train-batch-size", 8, "--learning-rate", "1e-9")
    assert r.exit_code == 0, r.output
    out = "".join(r.output.split())
    assert "".join(f"Starting from the weights in {d / 'model.safetensors'}".split()) in out, r.output
    assert "--no-resume--forcestartsfromtheweightsofinit.safetensors" in out, r.output
    key = "roberta.embeddings.word_embeddings.weight"
    assert abs(load_file(d / "model.safetensors")[key] - trained_weights[key]).max() < 1e-6


# == Issue 21, class 5: tracebacks; every option's range checked before jax loads ==================

def test_info_ignores_what_is_not_a_stage_in_stages(trained, tmp_path):
    d = copy(trained, tmp_path)
    (d / "stages").mkdir()
    shutil.copytree(d / "checkpoints", d / "stages" / "1" / "checkpoints")
    for name in (".DS_Store", ".nfs0000000001234", "²"):
        (d / "stages" / name).write_text("x")
    (d / "stages" / "my notes").mkdir()
    r = invoke("info", d)
    assert r.exit_code == 0, r.output
    assert "stage 1" in r.output and "stage 2" in r.output, r.output
    r = invoke("info", d, "--json")
    assert r.exit_code == 0 and len(json.loads(r.output)["stages"]) == 1, r.output


@pytest.mark.parametrize("source", ["²", "١٢", "-1"])
def test_from_checkpoint_that_is_no_step_is_one_line(trained, tmp_path, source):
    d = copy(trained, tmp_path)
    before = snapshot(d)
    refused(invoke("train", d, "--from-checkpoint", source, *STAGE), d, before,
            f"--from-checkpoint {source}: no checkpoint there")


_NO_JAX = r"""
import sys
from typer.testing import CliRunner
from mlmtool.cli import app
for args, phrase in CASES:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1 and phrase in r.output, (args, r.output)
    loaded = sorted({m.split('.')[0] for m in sys.modules} & {"jax", "orbax", "optax", "flax", "torch"})
    assert not loaded, (args, loaded)
print("ok")
"""


def test_option_ranges_are_refused_before_jax_loads_in_every_command(trained, corpus, tmp_path):
    """``train --seed -1`` was refused after 7-10 s (jax, the checkpoints), ``tokenizer --seed -1``
    with sampling was a traceback; the shared options are checked by the parser, the same way."""
    import subprocess
    import sys

    from tests.test_reliability import ENV, ROOT

    d = str(copy(trained, tmp_path))
    cases = [
        (["train", d, "--seed", "-1"], "--seed must be in [0, 2^32), got -1"),
        (["train", d, "--learning-rate", "inf"], "--learning-rate must be a positive number, got inf"),
        (["train", d, "--max-grad-norm", "-1"], "--max-grad-norm must be a number >= 0"),
        (["train", d, "--mlm-probability", "1.5"], "--mlm-probability must be in (0, 1), got 1.5"),
        (["train", d, "--per-device-eval-batch-size", "0"], "--per-device-eval-batch-size must be positive, got 0"),
        (["tokenizer", d, str(corpus), "--seed", "-1", "--sample-documents", "10"], "--seed must be in [0, 2^32)"),
        (["tokenizer", d, str(corpus), "--pad-vocab-to-multiple-of", "0"], "--pad-vocab-to-multiple-of must be in"),
        (["eval", d, "--mlm-probability", "0"], "--mlm-probability must be in (0, 1), got 0.0"),
        (["eval", d, "--per-device-eval-batch-size", "-2"], "--per-device-eval-batch-size must be positive"),
        # the choices too: parsed against the library's tuples (mlmtool.constants), not after jax loads
        (["train", d, "--optimizer", "sgd"], "--optimizer must be one of adamw, adafactor, lamb, lion, stable-adamw"),
        (["train", d, "--gradient-checkpointing", "all"], "--gradient-checkpointing must be one of none, dots, full"),
        (["eval", d, "--dtype", "float16"], "--dtype must be float32 or bfloat16, got 'float16'"),
        (["eval", d, "--pll", "l2r"], "--pll must be word-l2r or token, got 'l2r'"),
    ]
    out = subprocess.run([sys.executable, "-c", f"CASES = {cases!r}\n" + _NO_JAX], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# == Issue 21, class 6: no silent wrong summary or setting =========================================

def _metrics(d: Path, records: list[dict]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_keeps_the_first_stage_when_a_stage_starts_from_an_earlier_checkpoint(tmp_path):
    from mlmtool.report import read_metrics

    first = [{"step": s, "loss": 5.0 - s / 10, "tokens_seen": 256 * s} for s in (5, 10, 15, 20)]
    # --from-checkpoint 10: steps from 1 again, tokens from checkpoint 10's on (below the last record's)
    stage = [{"step": s, "loss": 3.0, "tokens_seen": 256 * (10 + s)} for s in (5, 10)]
    _metrics(tmp_path / "a", first + stage)
    train, _, _ = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [(r["stage"], r["step"], r["global_step"]) for r in train] == \
        [(0, 5, 5), (0, 10, 10), (0, 15, 15), (0, 20, 20), (1, 5, 25), (1, 10, 30)]
    # a resume of the same run from its checkpoint 10 still replaces the records after it
    resume = [{"step": 15, "loss": 9.0, "tokens_seen": 256 * 15}]
    _metrics(tmp_path / "b", first + resume)
    train, _, _ = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [(r["stage"], r["step"], r["loss"]) for r in train] == [(0, 5, 4.5), (0, 10, 4.0), (0, 15, 9.0)]


def test_eval_scores_the_store_the_run_trained_on_and_report_keeps_stores_apart(trained, corpus, tmp_path):
    d = copy(trained, tmp_path)
    r = invoke("prepare", d, corpus, "--max-seq-length", 64, "--validation-split-percentage", 10, "--name", "long")
    assert r.exit_code == 0, r.output
    _edit_meta(d / "checkpoints", 20, lambda m: m["train_config"].update(data="long"))  # as a stage on --data long
    r = invoke("eval", d)
    assert r.exit_code == 0 and "blocks of data-long" in " ".join(r.output.split()), r.output
    assert json.loads((d / "eval_results.json").read_text())["data"] == "long"
    r = invoke("eval", d, "--data", "data", "--json")  # DIR/data, named
    assert r.exit_code == 0 and json.loads(r.output)["data"] is None, r.output
    r = invoke("report", d, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["data"] == "long" and summary["other_store_eval_records"] == 1, summary


def test_a_resume_that_changes_the_computation_says_so(trained, tmp_path):
    d = copy(trained, tmp_path)
    shutil.rmtree(d / "checkpoints" / "20")
    r = invoke("train", d, "--masking", "whole-word", "--no-scan-layers", "--logging-steps", 2)
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "Resuming with changed settings: --masking whole-word (was token), --scan-layers False (was None)" \
        in out and "no longer bit-identical" in out and "--logging-steps" not in out.split("changed settings")[1], out


def test_wsd_decay_longer_than_the_run_and_cudnn_that_cannot_run_are_said(prepared, tmp_path, monkeypatch):
    d = copy(prepared, tmp_path)
    before = snapshot(d)
    refused(invoke("train", d, "--lr-scheduler", "wsd", "--decay-steps", 100, "--max-steps", 4,
                   "--per-device-train-batch-size", 8), d, before,
            "--decay-steps 100 is longer than the run after its warm-up (4 of 4 steps)", "--decay-steps 4 or fewer")
    from mlmtool.runtime.kernels import select

    k = select("cpu", overrides="attention=cudnn")
    assert k.attention == "xla" and "MLMTOOL_KERNELS attention=cudnn not taken: not an NVIDIA GPU" in k.describe()
    assert "not taken" not in select("cpu", overrides="").describe()
    assert "--dtype float32" in select("gpu", dtype="float32", overrides="attention=cudnn").describe()


# == Issue 21, class 7: every hint is a command that works in that state ===========================

def follow(line: str, corpus: Path):
    """Run the last ``'mlmtool ...'`` command a hint names, FILE... being the corpus."""
    import re
    import shlex

    commands = re.findall(r"'mlmtool ([^']+)'", line)
    assert commands, line
    args = [str(corpus) if a == "FILE..." else a for a in shlex.split(commands[-1])]
    return invoke(*args)


def test_a_named_store_s_hints_rebuild_that_store(trained, corpus, tmp_path):
    """The rebuild hints omitted FILE... and --name: followed, they rebuilt DIR/data."""
    d = copy(trained, tmp_path)
    r = invoke("prepare", d, corpus, "--max-seq-length", 64, "--validation-split-percentage", 0, "--name", "long")
    assert r.exit_code == 0, r.output
    data_before = snapshot(d / "data")
    line = error_line(invoke("eval", d, "--data", "long"))
    assert "has no validation blocks" in line and "FILE... --name long" in line, line
    r = follow(line, corpus)
    assert r.exit_code == 0, r.output
    r = invoke("eval", d, "--data", "long", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["data"] == "long", r.output
    line = error_line(invoke("train", d, "--data", "short", "--max-steps", 1))
    assert "no prepared data 'short'" in line and f"'mlmtool prepare {d} FILE... --name short' first" in line, line
    assert snapshot(d / "data") == data_before  # DIR/data was never the one rebuilt


def test_a_hint_to_prepare_again_names_a_command_that_works(prepared, corpus, tmp_path):
    from mlmtool.modeldir import ModelDir
    from mlmtool.data.stores import open_stores

    d = copy(prepared, tmp_path)
    edit_config(d, max_position_embeddings=20)  # blocks of 32 no longer fit
    line = error_line(invoke("train", d, "--max-steps", 1, "--per-device-train-batch-size", 8))
    assert "exceed the model's 18 positions" in line and "FILE... --max-seq-length 18 --force" in line, line
    r = follow(line, corpus)
    assert r.exit_code == 0, r.output
    mdir = ModelDir(d)
    assert open_stores(mdir, mdir.read_config())[0].seq_len == 18


def _no_weights(d: Path) -> Path:
    for name in ("checkpoints", "tensorboard", "model.safetensors", "metrics.jsonl", "eval_results.json"):
        p = d / name
        if p.is_dir():
            shutil.rmtree(p)
        p.unlink(missing_ok=True)
    return d


def test_the_positions_hint_is_one_that_works_in_each_state(trained, prepared, corpus, tmp_path):
    """'raise max_position_embeddings with init DIR --set ... --force' rebuilt config.json from the
    default preset (roberta-base) and deleted an imported DIR's weights; positions of imported or
    trained weights cannot grow, a rotary model's can (they are no weights)."""
    d = copy(prepared, tmp_path)  # no weights yet: its own config with more positions
    line = error_line(invoke("prepare", d, corpus, "--max-seq-length", 100))
    assert f"--from-config {d / 'config.json'} --set max_position_embeddings=102 --force" in line, line
    hidden = json.loads((d / "config.json").read_text())["hidden_size"]
    assert follow(line, corpus).exit_code == 0
    assert json.loads((d / "config.json").read_text())["hidden_size"] == hidden  # not roberta-base's
    r = invoke("prepare", d, corpus, "--max-seq-length", 100, "--validation-split-percentage", 10)
    assert r.exit_code == 0, r.output

    t = copy(trained, tmp_path, "trained")
    line = error_line(invoke("prepare", t, corpus, "--max-seq-length", 100))
    assert "use --max-seq-length 64 or less (the checkpoints up to step 20 and model.safetensors" in line, line
    assert "'mlmtool init" not in line, line

    imported = tmp_path / "imported"
    assert invoke("init", imported, "--from", trained).exit_code == 0
    line = error_line(invoke("prepare", imported, corpus, "--max-seq-length", 100))
    assert f"use --max-seq-length 64 or less: the weights of {trained} have a table of 66 positions that cannot " \
        "grow" in line and "'mlmtool init" not in line, line
    r = invoke("prepare", imported, corpus, "--max-seq-length", 64, "--validation-split-percentage", 10)
    assert r.exit_code == 0 and (imported / "init.safetensors").exists(), r.output


def test_a_rotary_model_s_positions_are_imported_again_as_the_hint_says(corpus, tmp_path):
    from mlmtool.modeldir import ModelDir
    from mlmtool.models import load_model

    src = tmp_path / "src"  # a ModernBERT as save_pretrained writes it (rotary: no position weights)
    sets = [x for s in ("hidden_size=32", "num_attention_heads=2", "intermediate_size=64",
                        "max_position_embeddings=66") for x in ("--set", s)]
    assert invoke("init", src, "--preset", "modernbert-tiny", *sets).exit_code == 0
    assert invoke("tokenizer", src, corpus, "--vocab-size", 300).exit_code == 0
    m = ModelDir(src)
    loaded = load_model(m.read_config())
    loaded.save_hf(loaded.init(3), m.weights_path)
    d = tmp_path / "model"
    assert invoke("init", d, "--from", src).exit_code == 0
    line = error_line(invoke("prepare", d, corpus, "--max-seq-length", 100))
    assert f"'mlmtool init {d} --from {src} --set max_position_embeddings=100 --force'" in line, line
    assert follow(line, corpus).exit_code == 0
    r = invoke("prepare", d, corpus, "--max-seq-length", 100, "--validation-split-percentage", 10)
    assert r.exit_code == 0, r.output
    assert (d / "init.safetensors").exists()


@pytest.mark.parametrize("fields, phrase, fix", [
    ({"hidden_dropout_prob": 2}, 'set "hidden_dropout_prob" to 0.1 in {config}', {"hidden_dropout_prob": 0.1}),
    ({"hidden_act": 5}, 'set "hidden_act" to "gelu" in {config}', {"hidden_act": "gelu"}),
    ({"num_attention_heads": 3}, "change one of them in {config}", {"num_attention_heads": 2}),
    ({"pad_token_id": 100000}, "fix it in {config}", {"pad_token_id": 1}),
    ({"num_hidden_layers": 5000}, 'fix "num_hidden_layers" in {config} (BERT-large has 24)',
     {"num_hidden_layers": 2}),
])
def test_a_bad_config_json_is_fixed_where_it_is(trained, tmp_path, fields, phrase, fix):
    """'fix it with --set ...' was printed by train, eval, predict, prepare: none has --set, and
    'init DIR --set ... --force' would rebuild config.json from the default preset."""
    d = copy(trained, tmp_path)
    edit_config(d, **fields)
    before = snapshot(d)
    for args in (("train", d, "--max-steps", 21), ("eval", d), ("predict", d, "the <mask>"),
                 ("export", d, tmp_path / "out"), ("prepare", d, trained.parent / "corpus.txt")):
        line = refused(invoke(*args), d, before, phrase.format(config=d / "config.json"))
        assert "--set" not in line and "'mlmtool tokenizer" not in line, line
    edit_config(d, **fix)  # as the hint says
    r = invoke("eval", d, "--json")
    assert r.exit_code == 0, r.output


def test_init_from_config_takes_the_set_its_hint_names(trained, tmp_path):
    """The file was validated before --set applied, and --set was typed by the wrong value."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads((trained / "config.json").read_text()), "hidden_dropout_prob": 2}))
    line = error_line(invoke("init", tmp_path / "m", "--from-config", bad))
    assert "fix it with --set hidden_dropout_prob=0.1" in line, line
    r = invoke("init", tmp_path / "m", "--from-config", bad, "--set", "hidden_dropout_prob=0.1")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["hidden_dropout_prob"] == 0.1


def _hub_copy(trained: Path, tmp: Path, name: str, decoder_offset: float | None, **config) -> Path:
    """The trained model as save_pretrained writes it, with an lm_head.decoder.weight of its own."""
    from safetensors.numpy import load_file, save_file

    src = tmp / name
    src.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (trained / f).exists():
            shutil.copy(trained / f, src / f)
    weights = load_file(str(trained / "model.safetensors"))
    if decoder_offset is not None:
        weights["lm_head.decoder.weight"] = weights["roberta.embeddings.word_embeddings.weight"] + decoder_offset
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    edit_config(src, **config)
    return src


def test_an_untied_model_s_hints_name_what_works(trained, tmp_path):
    untied = _hub_copy(trained, tmp_path, "untied", 1.0, tie_word_embeddings=False)
    d = tmp_path / "model"
    line = error_line(invoke("init", d, "--from", untied))
    assert "tied to the embeddings: --set tie_word_embeddings=true imports" in line and "transformers" in line, line
    line = error_line(invoke("init", d, "--from", untied, "--set", "tie_word_embeddings=true"))  # followed
    assert "untied lm_head.decoder.weight" in line and "continue this model with transformers" in line, line
    assert "only --set options" not in line and not d.exists(), line
    # a decoder equal to the embeddings under an untied config: the --set the hint names works
    equal = _hub_copy(trained, tmp_path, "equal", 0.0, tie_word_embeddings=False)
    assert invoke("init", d, "--from", equal, "--set", "tie_word_embeddings=true").exit_code == 0
    # untied weights under a tied config, no --set given: no hint about --set
    wrong = _hub_copy(trained, tmp_path, "wrong", 1.0)
    line = error_line(invoke("init", tmp_path / "other", "--from", wrong))
    assert "--set" not in line and "continue this model with transformers" in line, line


def test_a_broken_tokenizer_s_hint_works_where_tokenizer_refuses(trained, prepared, corpus, tmp_path):
    """'retrain it with mlmtool tokenizer' on a DIR whose weights belong to the tokenizer, where
    'mlmtool tokenizer' refuses."""
    imported = tmp_path / "imported"
    assert invoke("init", imported, "--from", trained).exit_code == 0
    (imported / "tokenizer.json").write_text("{broken")
    line = error_line(invoke("prepare", imported, corpus, "--max-seq-length", 32))
    assert f"'mlmtool init {imported} --from {trained} --force'" in line, line
    assert follow(line, corpus).exit_code == 0
    r = invoke("prepare", imported, corpus, "--max-seq-length", 32, "--validation-split-percentage", 10)
    assert r.exit_code == 0 and (imported / "init.safetensors").exists(), r.output

    t = copy(trained, tmp_path, "trained")
    (t / "tokenizer.json").write_text("{broken")
    line = error_line(invoke("prepare", t, corpus, "--max-seq-length", 32, "--force"))
    assert "put back the tokenizer files and config.json that checkpoints up to step 20" in line, line
    assert f"'mlmtool tokenizer {t} FILE... --force'" in line, line
    error_line(invoke("tokenizer", t, corpus))  # what the old hint named: refused here

    d = copy(prepared, tmp_path, "untrained")  # nothing trained: retraining, as told, works
    (d / "tokenizer.json").write_text("{broken")
    line = error_line(invoke("prepare", d, corpus, "--max-seq-length", 32, "--force"))
    assert f"retrain it with 'mlmtool tokenizer {d} FILE...'" in line, line
    r = invoke(*line.split("'mlmtool ")[1].split("'")[0].replace("FILE...", str(corpus)).split(), "--vocab-size", 300)
    assert r.exit_code == 0, r.output
    assert invoke("prepare", d, corpus, "--max-seq-length", 32, "--force").exit_code == 0


def test_an_unreadable_config_json_s_hint_works(trained, prepared, corpus, tmp_path):
    imported = tmp_path / "imported"
    assert invoke("init", imported, "--from", trained).exit_code == 0
    (imported / "config.json").write_text("{not json")
    line = error_line(invoke("prepare", imported, corpus, "--max-seq-length", 32))
    assert f"recreate it with 'mlmtool init {imported} --from {trained} --force'" in line, line
    assert follow(line, corpus).exit_code == 0
    assert invoke("prepare", imported, corpus, "--max-seq-length", 32).exit_code == 0
    t = copy(trained, tmp_path, "trained")
    (t / "config.json").write_text("{not json")
    line = error_line(invoke("train", t, "--max-steps", 21))
    assert f'checkpoint step 20 recorded it (the "config" of {t / "checkpoints" / "20" / "meta" / "metadata"})' \
        in line and "'mlmtool init" not in line, line
    recorded = json.loads((t / "checkpoints" / "20" / "meta" / "metadata").read_text())["config"]
    (t / "config.json").write_text(json.dumps(recorded))  # as the hint says
    assert invoke("eval", t, "--json").exit_code == 0


# == Issue 21, class 4: corpus text that looks like a special token stays text =====================

def test_literal_special_tokens_in_the_corpus_are_text(prepared, corpus, tmp_path):
    """"<s>" in HTML or "<mask>"/"<pad>" in ML text became the special ids mid-document."""
    import numpy as np

    from mlmtool.data.blocks import BlockStore
    from mlmtool.modeldir import ModelDir
    from mlmtool.data.tokenizer_facts import tokenizer_info

    d = copy(prepared, tmp_path)
    lines = ["the king said <s> good night </s> to the <mask> queen <pad> and <unk> lady"] * 40
    literal = tmp_path / "literal.txt"
    literal.write_text("\n".join(lines + corpus.read_text().splitlines()[:40]) + "\n")
    for flags in ((), ("--no-piece-cache",)):
        r = invoke("prepare", d, literal, "--max-seq-length", 32, "--validation-split-percentage", 10, "--force",
                   *flags)
        assert r.exit_code == 0, r.output
        store = BlockStore.open(d / "data", "train")
        ids = np.asarray(store.read(np.arange(len(store)))).ravel()
        facts = tokenizer_info(ModelDir(d))
        specials = dict(zip(("pad", "mask", "unk", "bos", "eos"),
                            (facts.pad_token_id, facts.mask_token_id, facts.unk_token_id, facts.bos_token_id,
                             facts.eos_token_id)))
        documents = len(lines) + 40
        for name in ("mask", "unk", "pad"):  # packed blocks: no padding, and no literal one
            assert (ids == specials[name]).sum() == 0, (name, flags)
        # <s> and </s> only frame documents (one pair each, at most, as blocks cut them)
        assert (ids == specials["bos"]).sum() <= documents and (ids == specials["eos"]).sum() <= documents, flags


# == Issue 21, class 8: smaller ======================================================================

def test_a_refused_init_from_leaves_no_empty_dir(trained, tmp_path):
    d = tmp_path / "new" / "model"
    error_line(invoke("init", d, "--from", tmp_path / "nowhere"))
    assert not d.exists()
    broken = copy(trained, tmp_path, "broken")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    error_line(invoke("init", d, "--from", broken))
    assert not d.exists()
    d.mkdir(parents=True)  # an existing DIR stays
    error_line(invoke("init", d, "--from", tmp_path / "nowhere"))
    assert d.is_dir()


def test_eval_checkpoint_of_an_earlier_stage_names_stages(trained, tmp_path):
    d = copy(trained, tmp_path)
    (d / "stages" / "1").mkdir(parents=True)
    shutil.move(d / "checkpoints", d / "stages" / "1" / "checkpoints")
    shutil.copytree(d / "stages" / "1" / "checkpoints" / "10", d / "checkpoints" / "10")  # the current stage
    line = error_line(invoke("eval", d, "--checkpoint", 20))
    assert f"no checkpoint at step 20 in {d / 'checkpoints'} (the current stage): available: 10" in line, line
    assert f"stage 1's {d / 'stages' / '1' / 'checkpoints'} has steps 10, 20" in line, line


def test_a_vocabulary_far_below_the_one_asked_for_is_warned_about(prepared, corpus, tmp_path):
    d = copy(prepared, tmp_path)
    r = invoke("tokenizer", d, corpus, "--vocab-size", 300, "--force")
    assert r.exit_code == 0 and "of the 300 asked for" not in r.stderr, r.output
    r = invoke("tokenizer", d, corpus, "--vocab-size", 1000, "--force", "--sample-bytes", 1)
    assert r.exit_code == 0, r.output
    err = " ".join(r.stderr.split())
    assert "warning: the vocabulary has" in err and "of the 1,000 asked for: the sample is too small" in err, err
    assert "a larger --sample-bytes" in err, err


def test_more_modernbert_layers_regenerate_layer_types(tmp_path):
    """``--set num_hidden_layers=6`` on modernbert-tiny (4 layer_types) was refused; transformers
    regenerates layer_types when it is not given, a global layer every 3rd."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path / "model"
    r = invoke("init", d, "--preset", "modernbert-tiny", "--set", "num_hidden_layers=6")
    assert r.exit_code == 0, r.output
    config = json.loads((d / "config.json").read_text())
    assert config["layer_types"] == transformers.ModernBertConfig(num_hidden_layers=6).layer_types
    given = ["full_attention"] * 5  # given: kept, and checked against the layers
    r = invoke("init", tmp_path / "other", "--preset", "modernbert-tiny", "--set", "num_hidden_layers=6",
               "--set", f"layer_types={json.dumps(given)}")
    assert "layer_types has 5 entries but num_hidden_layers is 6" in error_line(r)


def test_a_sampled_tokenizer_says_how_much_of_the_corpus_it_read(prepared, corpus, tmp_path):
    d = copy(prepared, tmp_path)
    r = invoke("tokenizer", d, corpus, "--vocab-size", 300, "--force", "--sample-bytes", 1)
    assert r.exit_code == 0, r.output
    out = " ".join(r.stdout.split())
    documents = len(corpus.read_text().splitlines())
    assert "on a sample of 1 document (" in out and f"of the corpus' {documents:,} documents" in out, out
    assert not re.search(r"\b1 documents", out), out

# == Issue 21, class 3: a padded embedding matrix (vocab_size > the tokenizer) is supported ========

@pytest.fixture(scope="module")
def padded_source(tmp_path_factory):
    """A transformers ``save_pretrained`` RoBERTa whose embedding matrix (1024 rows) is larger than
    its tokenizer, as ``resize_token_embeddings(pad_to_multiple_of=...)`` writes; the padding ids'
    output bias is raised so that a predict that does not mask them would return them."""
    torch = pytest.importorskip("torch")
    from tests.pipeline import write_corpus
    from tests.test_init_from import _hf_tokenizer, _torch_model

    root = tmp_path_factory.mktemp("padded")
    corpus = write_corpus(root / "corpus.txt", n_docs=300)
    _, fast = _hf_tokenizer(corpus)
    model = _torch_model(1024)
    assert len(fast) < 1024
    with torch.no_grad():
        model.lm_head.bias[len(fast):] = 30.0
    src = root / "hf-padded"
    model.save_pretrained(src)
    fast.save_pretrained(src)
    return src, corpus, len(fast)


@pytest.mark.slow
def test_a_padded_hub_model_is_prepared_trained_evaluated_predicted_and_exported(padded_source, tmp_path):
    transformers = pytest.importorskip("transformers")
    src, corpus, n = padded_source
    d = tmp_path / "model"
    for args in (("init", d, "--from", src),
                 ("prepare", d, corpus, "--max-seq-length", 32, "--validation-split-percentage", 10),
                 ("train", d, "--max-steps", 3, "--per-device-train-batch-size", 8, "--save-steps", 3,
                  "--eval-steps", 3, "--logging-steps", 1),
                 ("eval", d)):
        r = invoke(*args)
        assert r.exit_code == 0, (args, r.output, r.exception)
    meta = json.loads((d / "data" / "meta.json").read_text())
    assert (meta["vocab_size"], meta["model_vocab_size"]) == (n, 1024)
    assert json.loads((d / "config.json").read_text())["vocab_size"] == 1024
    r = invoke("predict", d, "The king said good <mask> to a woman.", "--top-k", 20, "--json")
    assert r.exit_code == 0, r.output
    predictions = json.loads(r.stdout)
    assert len(predictions) == 20 and all(p["token"] < n for p in predictions), predictions
    out = tmp_path / "out"
    r = invoke("export", d, out)
    assert r.exit_code == 0, r.output
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.vocab_size == 1024 and len(transformers.AutoTokenizer.from_pretrained(str(out))) == n


def test_masking_never_draws_a_padding_id():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mlmtool.training.masking import mask_tokens

    ids = jnp.full((64, 128), 7, dtype=jnp.int32)
    kw = dict(special_token_ids=(0, 1, 2), mask_token_id=4, mlm_probability=0.9)
    key = jax.random.PRNGKey(0)
    bounded = mask_tokens(key, ids, vocab_size=300, **kw).input_ids
    assert int(bounded.max()) < 300
    unbounded = mask_tokens(key, ids, vocab_size=1024, **kw).input_ids  # the bound is what keeps them out
    assert int(unbounded.max()) >= 300
    again = mask_tokens(key, ids, vocab_size=300, **kw)  # the same bound, the same draw
    assert (np.asarray(again.input_ids) == np.asarray(bounded)).all()


@pytest.mark.parametrize("value", ["0", "-64", str(2**17)])
def test_pad_vocab_to_multiple_of_out_of_range_is_one_line(prepared, corpus, tmp_path, value):
    d = copy(prepared, tmp_path)
    before = snapshot(d)
    refused(invoke("tokenizer", d, corpus, "--pad-vocab-to-multiple-of", value, "--force"), d, before,
            f"--pad-vocab-to-multiple-of must be in 1 .. 65536, got {value}")


@pytest.mark.slow
def test_tokenizer_pads_the_vocabulary_to_a_multiple_and_the_pipeline_trains(prepared, corpus, tmp_path):
    d = copy(prepared, tmp_path)
    r = invoke("tokenizer", d, corpus, "--vocab-size", 300, "--pad-vocab-to-multiple-of", 64, "--force")
    assert r.exit_code == 0, r.output
    from tokenizers import Tokenizer

    n = Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    assert vocab % 64 == 0 and n <= vocab < n + 64, (vocab, n)
    assert "padded from the tokenizer's" in " ".join(r.stdout.split()), r.stdout
    for args in (("prepare", d, corpus, "--max-seq-length", 32, "--validation-split-percentage", 10, "--force"),
                 ("train", d, "--max-steps", 2, "--per-device-train-batch-size", 8, "--save-steps", 2,
                  "--eval-steps", 2)):
        r = invoke(*args)
        assert r.exit_code == 0, (args, r.output, r.exception)
    assert json.loads((d / "data" / "meta.json").read_text())["model_vocab_size"] == vocab
