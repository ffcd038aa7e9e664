"""Shared helpers for tests that need a prepared model directory (small and fast)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from mlmtool.cli import app
from tests.conftest import WORDS, make_documents, write_documents

__all__ = ["WORDS", "invoke", "prepared_dir", "trained_dir", "write_corpus"]


def write_corpus(path: Path, n_docs: int = 400, seed: int = 0) -> Path:
    """English-like text with learnable structure (40 fixed phrases of WORDS), one document per line."""
    return write_documents(path, make_documents(n_docs, seed, words=WORDS, phrases=40))


def invoke(*args: str, input: str | None = None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    return result


HEAVY = ("transformers", "torch", "jax", "flax", "datasets")


def error_line(result) -> str:
    """The command's only output on stderr: one ``error:`` line, exit 1, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def heavy_imports(*args) -> list[str]:
    """The HEAVY top-level packages that ``mlmtool ARGS`` imports, run in a fresh interpreter
    (it must succeed)."""
    import subprocess
    import sys

    code = ("import sys; from mlmtool.cli import app; from typer.testing import CliRunner; "
            f"r = CliRunner().invoke(app, {[str(a) for a in args]!r}); assert r.exit_code == 0, r.output; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])  # a printed list of names


def prepared_dir(root: Path, *, preset: str = "tiny", vocab_size: int = 300, max_seq_length: int = 32,
                 n_docs: int = 400, extra_set: tuple[str, ...] = ()) -> Path:
    """init → tokenizer → prepare on a generated corpus; returns DIR."""
    corpus = write_corpus(root / "corpus.txt", n_docs=n_docs)
    d = root / "model"
    sets: list[str] = []
    for s in ("hidden_size=32", "num_attention_heads=2", "intermediate_size=64", "num_hidden_layers=2",
              "max_position_embeddings=66", *extra_set):
        sets += ["--set", s]
    for args in (("init", d, "--preset", preset, *sets),
                 ("tokenizer", d, corpus, "--vocab-size", vocab_size),
                 ("prepare", d, corpus, "--max-seq-length", max_seq_length,
                  "--validation-split-percentage", 10)):
        r = invoke(*args)
        assert r.exit_code == 0, (args, r.output, r.exception)
    return d


# -- a trained model directory, shared by the predict/report/info/TensorBoard tests ------------

TRAINED_ARGS = ("--max-steps", 20, "--per-device-train-batch-size", 8, "--learning-rate", 5e-3,
                "--warmup-steps", 2, "--logging-steps", 5, "--eval-steps", 10, "--save-steps", 10)
_TRAINED: dict[str, Path] = {}


def trained_dir(tmp_path_factory) -> Path:
    """``prepared_dir`` + ``mlmtool train`` for 20 steps (TRAINED_ARGS: logs every 5, evaluates
    at 10 and 20, checkpoints 10 and 20), built once per test session: copy it before changing it."""
    if "dir" not in _TRAINED:
        d = prepared_dir(tmp_path_factory.mktemp("trained"))
        r = invoke("train", d, *TRAINED_ARGS)
        assert r.exit_code == 0, (r.output, r.exception)
        _TRAINED["dir"] = d
    return _TRAINED["dir"]
