"""Every option shared across commands, declared once: ``typing.Annotated`` aliases (as the
``hf`` CLI does), choices and defaults taken from the library (:mod:`mlmtool.constants`),
the option groups (:class:`Corpus`, :class:`Distributed`) and the one ``--json`` printer."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer

from mlmtool import constants
from mlmtool.models import document_attention_help


def choice(option: str, choices: tuple[str, ...], **kwargs) -> typer.models.OptionInfo:
    """A ``typer.Option`` taking one of ``choices`` (a library tuple): listed in --help as
    ``<a|b|c>`` and completed by the shell, as Typer lists a ``Literal``; any other value is
    refused by the parser with the library's one error line (exit 1), not a usage box."""
    def parse(value):
        if value not in choices:
            from mlmtool.errors import ConfigError

            raise ConfigError(constants.choice_error(option, value, choices), "fix the option and run again")
        return value

    return typer.Option(option, parser=parse, metavar="<" + "|".join(choices) + ">",
                        autocompletion=lambda incomplete: [c for c in choices if c.startswith(incomplete)], **kwargs)


def emit(result) -> None:
    """The ``--json`` result of every command: one JSON value on one line of stdout (printed
    under --quiet too: a requested result), non-ASCII text as it is."""
    import json

    typer.echo(json.dumps(result, ensure_ascii=False))

ModelDirArg = Annotated[Path, typer.Argument(
    help="Model directory (created by 'mlmtool init', read and written by every command).",
    show_default=False)]

# -- corpus input (tokenizer, prepare) ---------------------------------------------------
CORPUS = "Corpus"
FilesArg = Annotated[Optional[list[str]], typer.Argument(
    help="Corpus files: .txt (one document per line), .jsonl/.json/.csv/.parquet (see "
         "--text-column), compressed .gz/.xz/.zst, directories (walked) or glob patterns; or "
         "a dataset saved with datasets' save_to_disk; fsspec URLs (s3://, gs://, hf://: pip install "
         "'mlmtool\\[cloud]') are streamed.", show_default=False)]
TextColumnOpt = Annotated[str, typer.Option(
    "--text-column", envvar="MLMTOOL_TEXT_COLUMN",
    help="Column holding the text in .jsonl/.json/.csv/.parquet/datasets input.",
    rich_help_panel=CORPUS)]
DatasetOpt = Annotated[Optional[str], typer.Option(
    "--dataset", help="A dataset read with datasets.load_dataset instead of FILE...: a hub name "
                      "(e.g. oscar), or a local builder (json, csv, parquet, text) with --data-files.",
    rich_help_panel=CORPUS, show_default=False)]
DataFilesOpt = Annotated[Optional[list[str]], typer.Option(
    "--data-files", help="Files (or globs) for --dataset json|csv|parquet|text, e.g. --dataset json "
                         "--data-files 'shards/*.jsonl.gz' --streaming (repeatable).",
    rich_help_panel=CORPUS, show_default=False)]
DatasetConfigOpt = Annotated[Optional[str], typer.Option(
    "--dataset-config", help="Hub dataset configuration (e.g. unshuffled_deduplicated_ko).",
    rich_help_panel=CORPUS, show_default=False)]
SplitOpt = Annotated[str, typer.Option("--split", help="Dataset split to read.", rich_help_panel=CORPUS)]
StreamingOpt = Annotated[bool, typer.Option(
    "--streaming", help="Stream the --dataset instead of downloading (or converting) it whole.",
    rich_help_panel=CORPUS)]
DatasetRevisionOpt = Annotated[Optional[str], typer.Option(
    "--dataset-revision", help="Hub dataset revision (branch, tag or commit) to read.",
    rich_help_panel=CORPUS, show_default=False)]


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The corpus options of ``tokenizer`` and ``prepare`` (an option group, :func:`option_groups`)."""

    text_column: TextColumnOpt = "text"
    dataset: DatasetOpt = None
    dataset_config: DatasetConfigOpt = None
    split: SplitOpt = "train"
    streaming: StreamingOpt = False
    dataset_revision: DatasetRevisionOpt = None
    data_files: DataFilesOpt = None

    def open(self, files):
        """FILE... (or --dataset) as a :class:`mlmtool.data.corpus.Corpus`."""
        from mlmtool.data.corpus import open_corpus

        return open_corpus(files, text_column=self.text_column, dataset=self.dataset,
                           dataset_config=self.dataset_config, split=self.split, streaming=self.streaming,
                           revision=self.dataset_revision, data_files=self.data_files)

ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Redo / overwrite existing output.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]


def _checked(name: str, ok, want: str):
    """An option callback: the range check every command shares, run by the parser, before any
    import or work; a value out of range is one error line (exit 1), as the library's checks."""
    def check(value):
        if value is not None and not ok(value):
            from mlmtool.errors import ConfigError

            raise ConfigError(f"{name} must be {want}, got {value}", "fix the option and run again")
        return value
    return check


SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.",
                                      callback=_checked("--seed", lambda v: 0 <= v < 2**32, "in [0, 2^32)"))]
DataOpt = Annotated[Optional[str], typer.Option(
    "--data", help="The block store to read: one 'mlmtool prepare --name NAME' wrote (default: DIR/data).",
    show_default=False)]
MaxSeqLengthOpt = Annotated[int, typer.Option(
    "--max-seq-length", help="Tokens per block (the seed notebook's 128).")]
CheckpointOpt = Annotated[str, typer.Option(
    "--checkpoint", help="latest (newest checkpoint, else the export, else the weights of 'init --from') | "
                         "STEP | export (model.safetensors) | init (init.safetensors).")]

# -- training / evaluation ------------------------------------------------------------------
DIST = "Distributed"
PerDeviceEvalBatchOpt = Annotated[Optional[int], typer.Option(
    "--per-device-eval-batch-size", envvar="MLMTOOL_PER_DEVICE_EVAL_BATCH_SIZE",
    help="Sequences per device per eval step (default: the training one).",
    show_default=False, callback=_checked("--per-device-eval-batch-size", lambda v: v > 0, "positive"))]
MlmProbabilityOpt = Annotated[float, typer.Option(
    "--mlm-probability", help="Fraction of tokens chosen for prediction (BERT's 0.15).",
    callback=_checked("--mlm-probability", lambda v: 0.0 < v < 1.0, "in (0, 1)"))]
MaskingOpt = Annotated[str, choice(
    "--masking", constants.MASKING_MODES,
    help="What is masked together: token (BERT's) | whole-word (every token of a chosen word; "
         "word starts from the tokenizer) | span (SpanBERT's runs of whole words, geometric "
         "lengths of mean 3.8 words). The rate counts tokens in every mode.")]
DocumentAttentionOpt = Annotated[Optional[bool], typer.Option(
    "--document-attention/--no-document-attention",
    help="Tokens of a packed block attend only within their own document (where prepare recorded that "
         "it starts), and positions restart at each document: a block computes what each document alone would. "
         f"Default: train, the model family's ({document_attention_help()}); eval, as the model "
         "was trained (the latest checkpoint's setting).", show_default=False)]
DtypeOpt = Annotated[str, choice(
    "--dtype", constants.DTYPES, envvar="MLMTOOL_DTYPE",
    help="Computation dtype: float32 | bfloat16 (master weights stay float32).")]
MeshOpt = Annotated[Optional[str], typer.Option(
    "--mesh", envvar="MLMTOOL_MESH",
    help="Device mesh, e.g. data=-1,fsdp=2 (default: data parallel over all devices).",
    rich_help_panel=DIST, show_default=False)]
CoordinatorOpt = Annotated[Optional[str], typer.Option(
    "--coordinator-address", envvar="MLMTOOL_COORDINATOR_ADDRESS",
    help="host:port of process 0, for multi-process runs.", rich_help_panel=DIST, show_default=False)]
NumProcessesOpt = Annotated[Optional[int], typer.Option(
    "--num-processes", envvar="MLMTOOL_NUM_PROCESSES", help="Number of processes in the run.",
    rich_help_panel=DIST, show_default=False)]
ProcessIdOpt = Annotated[Optional[int], typer.Option(
    "--process-id", envvar="MLMTOOL_PROCESS_ID", help="This process's index (0 .. num-processes-1).",
    rich_help_panel=DIST, show_default=False)]
DistributedTimeoutOpt = Annotated[Optional[int], typer.Option(
    "--distributed-timeout", envvar="MLMTOOL_DISTRIBUTED_TIMEOUT", min=1,
    help="Seconds to wait for every process to join before failing with an error (default: 300).",
    rich_help_panel=DIST, show_default=False)]


@dataclasses.dataclass(frozen=True)
class Distributed:
    """The distributed options of ``train`` and ``eval`` (an option group, :func:`option_groups`)."""

    mesh: MeshOpt = None
    coordinator_address: CoordinatorOpt = None
    num_processes: NumProcessesOpt = None
    process_id: ProcessIdOpt = None
    distributed_timeout: DistributedTimeoutOpt = None

    def join(self) -> None:
        """Start (or join) the multi-process run these options describe; alone, nothing to join."""
        from mlmtool.runtime.distributed import initialize_distributed

        initialize_distributed(self.coordinator_address, self.num_processes, self.process_id,
                               timeout=self.distributed_timeout)


GROUPS = (Corpus, Distributed)


def option_groups(command):
    """Lets ``command`` take an option group (:data:`GROUPS`) as one parameter: Typer sees the
    group's options in that parameter's place, and the command gets them as one value.  A
    group is declared once, in its dataclass, for every command that has it."""
    hints = typing.get_type_hints(command, include_extras=True)
    params, groups = [], {}
    for p in inspect.signature(command).parameters.values():
        kind = hints.get(p.name, p.annotation)
        if kind in GROUPS:
            groups[p.name] = kind
            fields = typing.get_type_hints(kind, include_extras=True)
            params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                         annotation=fields[f.name]) for f in dataclasses.fields(kind)]
        else:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=kind))

    @functools.wraps(command)
    def run(**kwargs):
        for name, kind in groups.items():
            kwargs[name] = kind(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(kind)})
        return command(**kwargs)

    run.__signature__ = inspect.Signature(params)
    return run
# -- train: measure before (--dry-run) and while (--profile-steps) -----------------------------
PERF = "Memory and speed"
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="Compile the step and time a few steps, an evaluation, a save and the export (outside "
                      "DIR), then print tokens/s, MFU, device memory, whether the batch fits and the projected "
                      "wall time of the whole run; DIR is not changed.", rich_help_panel=PERF)]
FindMaxBatchOpt = Annotated[bool, typer.Option(
    "--find-max-batch", help="A --dry-run that also finds the largest --per-device-train-batch-size that fits in the "
                             "device's memory (compile-only programs).", rich_help_panel=PERF)]
ProfileStepsOpt = Annotated[int, typer.Option(
    "--profile-steps", min=0, help="Trace N steps after the first with jax.profiler into DIR/profile/ and print "
                                   "where the device time goes (kernels by kind, idle share). 0: off.",
    rich_help_panel=PERF)]
PieceCacheOpt = Annotated[bool, typer.Option(
    "--piece-cache/--no-piece-cache",
    help="Encode through a cache of space-separated pieces (2-3x faster, the same blocks); "
         "--no-piece-cache: plain encode_batch.")]
NumProcOpt = Annotated[Optional[int], typer.Option(
    "--num-proc", min=1, envvar="MLMTOOL_NUM_PROC",
    help="Worker processes for tokenizing (default: all CPU cores).",
    show_default=False)]


def parse_duration(text) -> float:
    """``90m``, ``2h30m``, ``1.5h``, ``45s`` or plain seconds -> seconds, for duration options."""
    import re

    if isinstance(text, (int, float)):
        return float(text)
    spec = str(text).strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([dhms]?)", spec)
    if not spec or not parts or re.sub(r"[\d.\sdhms]", "", spec) or \
            "".join(n + u for n, u in parts) != re.sub(r"\s", "", spec):
        raise typer.BadParameter(f"{text!r} is not a duration (e.g. 90m, 2h30m, 3600)")
    scale = {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 1}
    return float(sum(float(n) * scale[u] for n, u in parts))
