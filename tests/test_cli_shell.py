"""The command line in a shell: completion, MLMTOOL_* environment variables, --quiet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from mlmtool.cli import app
from tests.pipeline import invoke

MLMTOOL = Path(sys.executable).parent / "mlmtool"  # the console script of this environment


@pytest.fixture(autouse=True)
def _not_quiet(monkeypatch):
    # --quiet sets MLMTOOL_QUIET=1 in the process; monkeypatch restores it afterwards.
    monkeypatch.setenv("MLMTOOL_QUIET", "0")


def _complete(words: str, cword: int) -> list[str]:
    env = {**os.environ, "_MLMTOOL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    out = subprocess.run([str(MLMTOOL)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.slow
@pytest.mark.skipif(not MLMTOOL.exists(), reason="mlmtool console script not installed in this environment")
def test_shell_completion():
    # --show-completion detects the shell from the process tree (not possible under every test
    # runner); typer's own switch makes it take the shell's name instead.
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    out = subprocess.run([str(MLMTOOL), "--show-completion", "bash"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "_MLMTOOL_COMPLETE=complete_bash" in out.stdout and "complete -o default -F" in out.stdout
    assert _complete("mlmtool in", 1) == ["init", "info"]
    assert set(_complete("mlmtool ", 1)) >= {"init", "tokenizer", "prepare", "train", "eval", "predict", "report",
                                              "info"}
    assert _complete("mlmtool init d --preset bert-", 4) == ["bert-base", "bert-large", "bert-small", "bert-tiny"]
    assert "--per-device-train-batch-size" in _complete("mlmtool train d --per-device-t", 3)


def _params(command: str, args: list[str]) -> dict:
    """The values the command would run with (options parsed, environment variables applied)."""
    cmd = get_command(app).commands[command]
    with cmd.make_context(command, list(args)) as ctx:
        return ctx.params


def test_environment_variables(monkeypatch):
    p = _params("train", ["DIR"])
    assert (p["per_device_train_batch_size"], p["dtype"], p["mesh"]) == (64, "float32", None)
    monkeypatch.setenv("MLMTOOL_PER_DEVICE_TRAIN_BATCH_SIZE", "16")
    monkeypatch.setenv("MLMTOOL_PER_DEVICE_EVAL_BATCH_SIZE", "32")
    monkeypatch.setenv("MLMTOOL_DTYPE", "bfloat16")
    monkeypatch.setenv("MLMTOOL_MESH", "data=1")
    monkeypatch.setenv("MLMTOOL_NUM_PROC", "3")
    monkeypatch.setenv("MLMTOOL_TEXT_COLUMN", "content")
    p = _params("train", ["DIR"])
    assert (p["per_device_train_batch_size"], p["per_device_eval_batch_size"], p["dtype"], p["mesh"]) == (
        16, 32, "bfloat16", "data=1")
    assert _params("train", ["DIR", "--dtype", "float32"])["dtype"] == "float32"  # the option wins
    assert _params("eval", ["DIR"])["dtype"] == "bfloat16"
    assert _params("prepare", ["DIR", "f.jsonl"])["num_proc"] == 3
    assert _params("prepare", ["DIR", "f.jsonl"])["text_column"] == "content"
    assert _params("tokenizer", ["DIR", "f.jsonl"])["text_column"] == "content"
    monkeypatch.setenv("MLMTOOL_NUM_PROC", "0")
    r = invoke("prepare", "DIR", "f.txt")
    assert r.exit_code == 2 and "--num-proc" in r.output  # a usage error (min=1), as for the option


@pytest.mark.slow
def test_environment_variable_reaches_the_run(tmp_path, monkeypatch):
    d = tmp_path / "m"
    assert invoke("init", d, "--preset", "tiny").exit_code == 0
    monkeypatch.setenv("MLMTOOL_DTYPE", "float16")
    r = invoke("train", d)
    assert r.exit_code == 1 and "--dtype must be float32 or bfloat16" in r.stderr


def test_help_names_the_environment_variables():
    wide = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}
    r = CliRunner().invoke(app, ["train", "--help"], env=wide)
    for name in ("MLMTOOL_PER_DEVICE_TRAIN_BATCH_SIZE", "MLMTOOL_DTYPE", "MLMTOOL_MESH"):
        assert name in r.stdout, name
    r = CliRunner().invoke(app, ["prepare", "--help"], env=wide)
    assert "MLMTOOL_NUM_PROC" in r.stdout and "MLMTOOL_TEXT_COLUMN" in r.stdout


def test_quiet_keeps_results_and_errors(tmp_path, corpus_file, monkeypatch):
    d = tmp_path / "m"
    r = invoke("--quiet", "init", d, "--preset", "tiny", "--set", "vocab_size=400")
    assert r.exit_code == 0 and r.stdout == ""
    r = invoke("-q", "tokenizer", d, corpus_file)
    assert r.exit_code == 0 and r.stdout == ""
    r = invoke("-q", "prepare", d, corpus_file, "--max-seq-length", 32, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["seq_len"] == 32  # requested result
    r = invoke("-q", "info", d)
    assert r.exit_code == 0 and "tokenizer" in r.stdout  # info's table is the result
    r = invoke("-q", "init", d, "--preset", "tiny", "--set", "bogus_key=1")
    assert r.exit_code == 1 and "unknown config key 'bogus_key'" in r.stderr and r.stdout == ""
    monkeypatch.setenv("MLMTOOL_QUIET", "1")
    r = invoke("init", tmp_path / "n", "--preset", "tiny")
    assert r.exit_code == 0 and r.stdout == ""
    r = invoke("init", tmp_path / "n", "--preset", "tiny", "--json")
    assert json.loads(r.stdout)["status"] == "unchanged"


@pytest.mark.slow
def test_orbax_is_quieted_by_the_command_line_not_by_importing_the_library():
    """Importing mlmtool.checkpoint leaves absl's verbosity and sys.unraisablehook alone; the
    CLI's root callback sets them (orbax errors only with MLMTOOL_DEBUG)."""
    code = ("import sys; from absl import logging; v, h = logging.get_verbosity(), sys.unraisablehook\n"
            "import mlmtool.checkpoint\n"
            "assert (logging.get_verbosity(), sys.unraisablehook) == (v, h)\n"
            "from mlmtool.cli import app; from typer.testing import CliRunner\n"
            "assert CliRunner().invoke(app, ['info', '.']).exit_code in (0, 1)\n"
            "print(logging.get_verbosity(), sys.unraisablehook is h)")
    for debug, want in (("", f"{-3} False"), ("1", f"{-2} True")):  # absl: FATAL = -3, ERROR = -2
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MLMTOOL_DEBUG": debug},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[-2] == want
