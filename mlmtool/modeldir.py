"""The model directory: the one unit every subcommand reads and writes.

It is a valid Hugging Face model directory at every stage (``config.json``, then the
tokenizer files, then ``model.safetensors``), with mlmtool's own state beside it::

    DIR/
      config.json              init         (AutoConfig loads it)
      tokenizer.json           tokenizer    (AutoTokenizer loads DIR)
      tokenizer_config.json    tokenizer
      special_tokens_map.json  tokenizer
      data/                    prepare      (block store: train.bin, validation.bin, meta.json)
      checkpoints/             train        (orbax: one folder per saved step)
      init.safetensors         init --from  (starting weights for continued pre-training)
      model.safetensors        train        (export, HF key names and layouts)
      metrics.jsonl            train/eval   (one JSON object per logging event)
      tensorboard/             train        (TensorBoard event files)
      profile/                 train --profile-steps (jax.profiler traces)
      report.png               report       (training and evaluation curves)
      eval_results.json        eval         (HF key names)
      manifest.json            every step   (arguments, input fingerprints, versions)
      .mlmtool.runtime.lock            train/prepare while running (PID of the holder)

Every file is written under a temporary name and renamed into place, so an
interrupted command never leaves a half-written artefact behind.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

# The atomic writes live in mlmtool.atomic (below hf_weights, which writes weights with them);
# the names are also importable from here, where most commands look for them.
from mlmtool.atomic import (atomic_directory, atomic_write, atomic_write_json,  # noqa: F401
                            fsync_directory, remove_leftovers)
from mlmtool.errors import ConfigError, ModelDirError
from mlmtool.runtime.lock import LOCK_FILE, hold as _hold_lock
from mlmtool.presets import hint_in_dir, load_config_file

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
GENERATOR = "generator"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
#: Vocabulary files of other tokenizer classes (from another tool, or copied by init --from):
#: stale once DIR has another tokenizer.json.
TOKENIZER_EXTRA = ("vocab.json", "merges.txt", "vocab.txt")
DATA = "data"
CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
PROFILE = "profile"
INIT_WEIGHTS = "init.safetensors"
EVAL_RESULTS = "eval_results.json"
MANIFEST = "manifest.json"

# Packages whose versions are recorded with each artefact.
_TRACKED_PACKAGES = (
    "mlmtool", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
    "transformers", "tokenizers", "datasets", "numpy",
)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (the tokenizer's identity in meta.json, read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_number(name: str) -> bool:
    """A step or stage folder's name: ASCII digits only (``'²'.isdigit()`` is true, int() fails)."""
    return name.isascii() and name.isdigit()


def numbered_folders(folder: Path) -> list[int]:
    """The numbers of ``folder``'s subfolders named by a number, ascending (other entries --
    ``.DS_Store``, an NFS ``.nfs…`` file, a user's folder, a temporary one -- are skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if is_number(p.name) and p.is_dir())


def checkpoint_steps(folder: Path) -> list[int]:
    """The steps of the complete checkpoints in an orbax checkpoints ``folder`` (any run's,
    an earlier stage's), oldest first, without importing orbax: orbax writes a step into
    ``<step>.orbax-checkpoint-tmp-*`` and renames it to its number when it is complete.  The
    one step lister (train, eval, stages, info, report)."""
    return numbered_folders(folder)


def checkpoint_meta(folder: Path, step: int) -> Any:
    """The ``meta`` item of checkpoint ``step`` in ``folder`` (step, seed, data position, the
    run's ``train_config`` and ``config``), read without orbax as the JSON file its JsonSave
    writes (tested to equal ``checkpoint.restore_meta``); OSError or ValueError if unreadable."""
    return json.loads((Path(folder) / str(step) / "meta" / "metadata").read_text(encoding="utf-8"))


def package_versions() -> dict[str, str]:
    out = {}
    for name in _TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def with_transformers_version(config: dict) -> dict:
    """``config`` with ``transformers_version``: the installed transformers' (no import)."""
    try:
        return {**config, "transformers_version": metadata.version("transformers")}
    except metadata.PackageNotFoundError:
        return dict(config)


class ModelDir:
    """Paths and checks for one model directory."""

    def __init__(self, path: os.PathLike | str, *, create: bool = False):
        self.path = Path(path)
        self.data: str | None = None  # the block store commands read and write (None: DIR/data)
        if create:
            if self.path.exists() and not self.path.is_dir():
                raise ModelDirError(f"{self.path} exists and is not a directory",
                                    "choose another path for the model directory")
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ModelDirError(f"cannot create {self.path} ({e.strerror})",
                                    "choose a writable location") from e
        elif not self.path.exists():
            raise ModelDirError(f"model directory {self.path} does not exist",
                                f"run 'mlmtool init {self.path}' first")
        elif not self.path.is_dir():
            raise ModelDirError(f"{self.path} is not a directory",
                                "pass the model directory created by 'mlmtool init'")

    def __str__(self) -> str:
        return str(self.path)

    # -- paths ---------------------------------------------------------------
    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER

    def with_data(self, name: str | None) -> "ModelDir":
        """This directory with block store ``name`` selected (``prepare --name``, ``train
        --data``): ``DIR/data-NAME``, beside the default ``DIR/data`` (None)."""
        if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
            raise ModelDirError(f"{name!r} is not a block store name",
                                "use letters, digits, '.', '_' and '-' (e.g. seq512)")
        other = copy.copy(self)
        other.data = name
        return other

    def data_names(self) -> list[str]:
        """The names of DIR's block stores besides the default one."""
        return sorted(p.name[len(DATA) + 1:] for p in self.path.glob(f"{DATA}-*")
                      if p.is_dir() and not p.name.endswith(".tmp"))

    @property
    def data_dir(self) -> Path:
        return self.path / (DATA if self.data is None else f"{DATA}-{self.data}")

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def stages_dir(self) -> Path:
        """The checkpoints of earlier stages, ``stages/<n>/checkpoints`` (mlmtool.training.stages)."""
        return self.path / "stages"

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    @property
    def generator(self) -> "ModelDir":
        """``DIR/generator``: the generator of an ELECTRA pair, a model directory of its own
        (created on first use; ``mlmtool.training.objectives``)."""
        return ModelDir(self.path / GENERATOR, create=True)

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def carried_weights(self) -> tuple[Path, ...]:
        """Where an export takes the tensors mlmtool carries but does not train (BERT's
        imported pooler) from: ``init --from``'s weights, else an earlier export."""
        return (self.init_weights_path, self.weights_path)

    @property
    def profile_dir(self) -> Path:
        """``train --profile-steps``' jax.profiler traces (mlmtool.training.profiling)."""
        return self.path / PROFILE

    @property
    def init_weights_path(self) -> Path:
        """``init --from``'s converted weights: what ``train`` starts from (mlmtool.init_from)."""
        return self.path / INIT_WEIGHTS

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def eval_results_path(self) -> Path:
        return self.path / EVAL_RESULTS

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def checkpoint_steps(self) -> list[int]:
        """Steps of DIR's complete checkpoints (the current stage's; :func:`checkpoint_steps`)."""
        return checkpoint_steps(self.checkpoints_dir)

    def init_source(self) -> str | None:
        """The PATH recorded by ``init --from`` (None if DIR was not made that way)."""
        args = (self.read_manifest().get("init") or {}).get("args") or {}
        return args.get("from")

    def trained_state(self) -> list[str]:
        """What training left in DIR (checkpoints, the export), in words; empty if nothing."""
        steps = self.checkpoint_steps()
        out = [f"checkpoints up to step {steps[-1]}"] if steps else []
        if self.weights_path.exists():
            out.append(WEIGHTS)
        return out

    # -- stage checks --------------------------------------------------------
    def read_config(self) -> dict:
        """config.json as a full dict (every field, HF defaults filled in)."""
        if not self.config_path.exists():
            raise ModelDirError(f"no config.json in {self.path}",
                                f"run 'mlmtool init {self.path}' first")
        try:
            return load_config_file(self.config_path)
        except ConfigError as e:  # "fix it with --set ..." means init's --set; here config.json is written
            raise ConfigError(e.message, hint_in_dir(e.hint, self.config_path, self._recreate_hint())) from None

    def _recreate_hint(self) -> str:
        """How to get config.json back when it is unreadable, by what DIR holds: a new one
        from a preset would not match DIR's tokenizer or weights."""
        args = (self.read_manifest().get("init") or {}).get("args") or {}
        if args.get("from"):  # the config comes whole from the imported model
            return f"recreate it with 'mlmtool init {self.path} --from {args['from']} --force'"
        steps = self.checkpoint_steps()
        if steps:
            return (f"checkpoint step {steps[-1]} recorded it (the \"config\" of "
                    f"{self.checkpoints_dir / str(steps[-1]) / 'meta' / 'metadata'})")
        if self.weights_path.exists():
            return f"{self.weights_path} was trained with it (no 'mlmtool init' makes it again)"
        made = ([f"--from-config {args['from_config']}"] if args.get("from_config")
                else [f"--preset {args['preset']}"] if args.get("preset") else [])
        made += [f"--set {item}" for item in args.get("set") or [] if " " not in item and "'" not in item]
        again = f"'mlmtool init {' '.join([str(self.path), *made])} --force'"
        if self.tokenizer_path.exists():
            return f"recreate it with {again}, then 'mlmtool tokenizer {self.path} FILE... --force'"
        return f"recreate it with {again}"

    def write_config(self, config: dict) -> None:
        """config.json, with the ``transformers_version`` it was written for (the installed
        transformers, as ``save_pretrained`` records it; read back, it is dropped again)."""
        atomic_write_json(self.config_path, with_transformers_version(config))

    # -- tokenizer -----------------------------------------------------------
    @contextlib.contextmanager
    def tokenizer_staging(self) -> Iterator[Path]:
        """A fresh folder inside DIR (``.tokenizer.*.tmp``, so the renames stay on one file
        system) to write a tokenizer's files into for :meth:`install_tokenizer`; removed after
        (a killed run's is removed by the next ``tokenizer``, ``remove_leftovers``)."""
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", suffix=".tmp", dir=self.path))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def install_tokenizer(self, staged: Path, config: dict | None = None) -> list[Path]:
        """Move the tokenizer files in ``staged`` (:meth:`tokenizer_staging`) into DIR: the one
        way a tokenizer is installed (``tokenizer``, ``init --from``).  Each file is flushed to
        disk first; then the old tokenizer.json goes, the tokenizer files of DIR that the new
        set lacks go (an earlier tokenizer's ``vocab.txt`` would describe another tokenizer),
        the files move in, and tokenizer.json last, after ``config`` (written as DIR's
        config.json when given): tokenizer.json marks the stage done, so a kill at any moment
        leaves either no tokenizer.json or a complete set that agrees with config.json."""
        names = sorted((p.name for p in Path(staged).iterdir() if p.is_file()), key=lambda n: (n == TOKENIZER, n))
        if TOKENIZER not in names:
            raise ModelDirError(f"no {TOKENIZER} among the tokenizer files to install into {self.path}",
                                "a tokenizer directory needs tokenizer.json")
        for name in names:
            fd = os.open(Path(staged) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.tokenizer_path.unlink(missing_ok=True)
        for stale in (*TOKENIZER_FILES, *TOKENIZER_EXTRA):
            if stale not in names:
                (self.path / stale).unlink(missing_ok=True)
        installed = []
        for name in names:
            if name == TOKENIZER and config is not None:
                self.write_config(config)
            os.replace(Path(staged) / name, self.path / name)
            installed.append(self.path / name)
        fsync_directory(self.path)
        return installed

    def require_tokenizer(self) -> Path:
        if not self.tokenizer_path.exists():
            raise ModelDirError(f"no tokenizer in {self.path}",
                                f"run 'mlmtool tokenizer {self.path} FILE...' first")
        return self.tokenizer_path

    def prepare_command(self, *options: str) -> str:
        """The ``prepare`` command line that (re)builds this block store, for hints: FILE... and,
        for a named store, its ``--name`` (without it, prepare would rebuild DIR/data)."""
        named = ("--name", self.data) if self.data is not None else ()
        kept: list[str] = []  # the store's own settings, so that the rebuild is the same store
        try:
            meta = json.loads((self.data_dir / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        if isinstance(meta, dict):
            if "--max-seq-length" not in options and isinstance(meta.get("seq_len"), int):
                kept += ["--max-seq-length", str(meta["seq_len"])]
            if meta.get("line_by_line") is True:
                kept.append("--line-by-line")
        return " ".join(("mlmtool prepare", str(self.path), "FILE...", *named, *kept, *options))

    def require_data(self) -> Path:
        if not (self.data_dir / "meta.json").exists():
            raise ModelDirError(f"no prepared data{' ' + repr(self.data) if self.data is not None else ''} in "
                                f"{self.path}", f"run '{self.prepare_command()}' first")
        return self.data_dir

    # -- lock ----------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, command: str, enabled: bool = True) -> Iterator[None]:
        """Hold ``DIR/.mlmtool.runtime.lock`` while ``command`` runs; refuse if another process holds
        it (see :mod:`mlmtool.runtime.lock`).  ``enabled=False``: a no-op (processes other than 0)."""
        if not enabled:
            yield
            return
        with _hold_lock(self.path, command):
            yield

    # -- manifest ------------------------------------------------------------
    def read_manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {}
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            # The manifest is provenance only; a damaged one is rebuilt, never fatal.
            return {}

    def record(self, step: str, *, args: dict, inputs: Any = None, outputs: Any = None) -> None:
        """Record which arguments, inputs and package versions produced ``step``'s artefact."""
        manifest = self.read_manifest()
        manifest[step] = {
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "args": args,
            "inputs": inputs,
            "outputs": outputs,
            "versions": package_versions(),
        }
        atomic_write_json(self.manifest_path, manifest)
