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
    """Importing mlmtool.training.checkpoint leaves absl's verbosity and sys.unraisablehook alone; the
    CLI's root callback sets them (orbax errors only with MLMTOOL_DEBUG)."""
    code = ("import sys; from absl import logging; v, h = logging.get_verbosity(), sys.unraisablehook\n"
            "import mlmtool.training.checkpoint\n"
            "assert (logging.get_verbosity(), sys.unraisablehook) == (v, h)\n"
            "from mlmtool.cli import app; from typer.testing import CliRunner\n"
            "assert CliRunner().invoke(app, ['info', '.']).exit_code in (0, 1)\n"
            "print(logging.get_verbosity(), sys.unraisablehook is h)")
    for debug, want in (("", f"{-3} False"), ("1", f"{-2} True")):  # absl: FATAL = -3, ERROR = -2
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MLMTOOL_DEBUG": debug},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[-2] == want


# -- options declared once (issue 23, item 4) ------------------------------------------------------

def _choices():
    from mlmtool import constants
    from mlmtool.models.base import ALGORITHMS

    return [("train", "--lr-scheduler", constants.SCHEDULES), ("train", "--decay-shape", constants.DECAY_SHAPES),
            ("train", "--optimizer", constants.OPTIMIZERS), ("train", "--masking", constants.MASKING_MODES),
            ("train", "--gradient-checkpointing", constants.REMAT_POLICIES),
            ("train", "--prng-impl", constants.PRNG_IMPLS), ("train", "--dtype", constants.DTYPES),
            ("eval", "--masking", constants.MASKING_MODES), ("eval", "--dtype", constants.DTYPES),
            ("eval", "--pll", constants.PLL_MODES), ("prepare", "--executor", constants.EXECUTORS),
            ("tokenizer", "--type", ALGORITHMS)]


@pytest.mark.parametrize("command, option, choices", _choices(), ids=lambda x: x if isinstance(x, str) else "")
def test_choices_are_the_library_tuples(command, option, choices):
    """Each choice option lists, takes and refuses exactly the library's tuple: listed in --help,
    any member parsed as that plain string, anything else one error line (exit 1) before any work."""
    wide = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}
    assert "<" + "|".join(choices) + ">" in CliRunner().invoke(app, [command, "--help"], env=wide).stdout
    param = option.lstrip("-").replace("-", "_")
    for value in choices:
        parsed = _params(command, ["DIR", option, value])["type_" if param == "type" else param]
        assert parsed == value and type(parsed) is str
    r = invoke(command, "DIR", option, "bogus")
    want = " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert r.stderr.strip().splitlines() == [f"error: {option} must be {want}, got 'bogus': fix the option and run "
                                             "again"]


def test_the_library_refuses_a_choice_in_the_same_words():
    from mlmtool import constants
    from mlmtool.errors import TrainingError
    from mlmtool.models.layers import REMAT_POLICIES
    from mlmtool.training.train_config import TrainConfig

    assert tuple(REMAT_POLICIES) == constants.REMAT_POLICIES  # the networks' table, the option's names
    with pytest.raises(TrainingError, match=r"^--optimizer must be one of adamw, adafactor, lamb, lion, stable-adamw, "
                                            r"got 'sgd'"):
        TrainConfig(optimizer="sgd").validate()
    with pytest.raises(TrainingError, match=r"^--dtype must be float32 or bfloat16, got 'float16'"):
        TrainConfig(dtype="float16").validate()


class _Captured(Exception):
    pass


def _train_config(monkeypatch, *args):
    """The TrainConfig ``mlmtool train DIR ARGS`` builds, and its stderr (the run stops there)."""
    from mlmtool.training.train_config import TrainConfig

    seen = []

    def capture(cfg):
        seen.append(cfg)
        raise _Captured

    monkeypatch.setattr(TrainConfig, "validate_ranges", capture)
    r = invoke("train", "DIR", *args)
    assert isinstance(r.exception, _Captured), r.output
    return seen[0], r.stderr


def test_adafactor_is_a_deprecated_alias_of_the_optimizer_option(monkeypatch):
    from mlmtool.cli.train import _explicit

    alias, stderr = _train_config(monkeypatch, "--adafactor")
    assert alias == _train_config(monkeypatch, "--optimizer", "adafactor")[0] and alias.optimizer == "adafactor"
    assert stderr.splitlines() == ["warning: --adafactor is deprecated and goes in the next release: use --optimizer "
                                   "adafactor"]
    assert _train_config(monkeypatch, "--adafactor", "--optimizer", "adafactor")[0] == alias
    cfg, stderr = _train_config(monkeypatch, "--no-adafactor", "--optimizer", "lion")
    assert cfg.optimizer == "lion" and "--no-adafactor is deprecated and changes nothing" in stderr
    _, stderr = _train_config(monkeypatch)
    assert stderr == ""  # no word without the option
    cmd = get_command(app).commands["train"]
    with cmd.make_context("train", ["DIR", "--adafactor"]) as ctx:  # a resume keeps it, as --optimizer adafactor
        assert "optimizer" in _explicit(ctx, alias)
    with cmd.make_context("train", ["DIR"]) as ctx:
        assert "optimizer" not in _explicit(ctx, alias)


def test_adafactor_beside_another_optimizer_is_refused(tmp_path):
    r = invoke("train", tmp_path / "m", "--adafactor", "--optimizer", "adamw")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines() == ["error: --adafactor (the same as --optimizer adafactor) contradicts "
                                             "--optimizer adamw: give only --optimizer"]
    assert not (tmp_path / "m").exists()


def test_every_help_imports_nothing_heavy():
    """--help (every command's) loads no jax, numpy, transformers: the choices and defaults it
    shows come from mlmtool.constants and TrainConfig, which import nothing heavy."""
    commands = ["", "init", "tokenizer", "prepare", "train", "eval", "predict", "report", "info", "export"]
    code = ("import sys; from mlmtool.cli import app; from typer.testing import CliRunner\n"
            f"for c in {commands!r}:\n"
            "    r = CliRunner().invoke(app, [c, '--help'] if c else ['--help']); assert r.exit_code == 0, r.output\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'numpy', 'transformers', 'flax', "
            "'optax', 'orbax', 'datasets', 'tokenizers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "[]"


def test_json_is_one_line(tmp_path):
    r = invoke("init", tmp_path / "m", "--preset", "tiny", "--json")
    assert r.exit_code == 0 and r.stdout.count("\n") == 1 and json.loads(r.stdout)["status"] == "written"


# -- the MLMTOOL_* on/off variables, read one way (issue 23, item 10) ---------------------------------

@pytest.mark.parametrize("name", ["MLMTOOL_QUIET", "MLMTOOL_DEBUG", "MLMTOOL_TENSORBOARD"])
def test_env_flags_spellings(monkeypatch, name):
    from mlmtool.runtime import env
    from mlmtool.errors import ConfigError

    for text in ("1", "true", "TRUE", "Yes", "on", " on "):
        monkeypatch.setenv(name, text)
        assert env.flag(name) is True, text
    for text in ("0", "false", "False", "no", "OFF"):
        monkeypatch.setenv(name, text)
        assert env.flag(name) is False, text
    for text in ("", "  "):
        monkeypatch.setenv(name, text)
        assert env.flag(name) is env.FLAGS[name]
    monkeypatch.delenv(name)
    assert env.flag(name) is env.FLAGS[name]
    monkeypatch.setenv(name, "maybe")
    with pytest.raises(ConfigError, match=rf"^{name}='maybe' is neither on nor off"):
        env.flag(name)
    assert env.flag(name, strict=False) is env.FLAGS[name]


@pytest.mark.parametrize("name", ["MLMTOOL_QUIET", "MLMTOOL_DEBUG", "MLMTOOL_TENSORBOARD"])
def test_an_unreadable_env_flag_is_one_error_line(monkeypatch, tmp_path, name):
    monkeypatch.setenv(name, "2")
    r = invoke("init", tmp_path / "m", "--preset", "tiny")
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit) and "Traceback" not in r.output, r.output
    assert r.stderr.strip().splitlines() == [f"error: {name}='2' is neither on nor off: set it to one of 1, true, "
                                             "yes, on (on) or 0, false, no, off (off), or unset it"]
    assert not (tmp_path / "m").exists()  # before any work


def test_quiet_false_in_capitals_is_off(monkeypatch, tmp_path):
    """MLMTOOL_QUIET=FALSE used to mean quiet (only '', '0' and 'false' were off)."""
    monkeypatch.setenv("MLMTOOL_QUIET", "FALSE")
    r = invoke("init", tmp_path / "m", "--preset", "tiny")
    assert r.exit_code == 0 and "Wrote" in r.stdout


def test_compilation_cache_takes_the_flag_spellings(monkeypatch, tmp_path):
    from mlmtool.runtime import compilation_cache

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    for text in ("0", "no", "OFF", "False"):
        monkeypatch.setenv("MLMTOOL_COMPILATION_CACHE", text)
        assert compilation_cache.cache_dir() is None, text
    for text in ("", "1", "Yes", "on", "TRUE"):
        monkeypatch.setenv("MLMTOOL_COMPILATION_CACHE", text)
        assert compilation_cache.cache_dir() == compilation_cache.default_dir(), text
    monkeypatch.setenv("MLMTOOL_COMPILATION_CACHE", str(tmp_path / "cache"))
    assert compilation_cache.cache_dir() == tmp_path / "cache"
