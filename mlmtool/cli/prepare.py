"""``mlmtool prepare DIR FILE...``: tokenize the corpus into fixed-length blocks in DIR/data."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mlmtool import constants
from mlmtool.cli import app
from mlmtool.cli.options import (Corpus, FilesArg, ForceOpt, JsonOpt, MaxSeqLengthOpt, ModelDirArg, NumProcOpt,
                                 PieceCacheOpt, choice, emit, option_groups)

BLOCKS = "Blocks"
SHARDS = "Shards (corpora beyond one machine: docs/corpora.md)"


@app.command("prepare")
@option_groups
def prepare_command(
    model_dir: ModelDirArg,
    files: FilesArg = None,
    max_seq_length: MaxSeqLengthOpt = constants.DEFAULT_MAX_SEQ_LENGTH,
    line_by_line: Annotated[bool, typer.Option(
        "--line-by-line", help="One document per block (truncated, padded) instead of the "
                               "concatenated token stream cut into blocks.",
        rich_help_panel=BLOCKS)] = False,
    validation_split_percentage: Annotated[float, typer.Option(
        "--validation-split-percentage",
        help="Percent of the documents held out for validation, spread evenly through the "
             "corpus (document i is held out when floor((i+1)p/100) > floor(ip/100)); 0 for none.",
        rich_help_panel=BLOCKS)] = constants.DEFAULT_VALIDATION_SPLIT_PERCENTAGE,
    num_proc: NumProcOpt = None,
    piece_cache: PieceCacheOpt = True,
    corpus_options: Corpus = Corpus(),
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Write block store NAME (DIR/data-NAME) beside the default DIR/data, e.g. seq128 and "
                       "seq512 for training in stages; 'train --data NAME' reads it.",
        rich_help_panel=BLOCKS, show_default=False)] = None,
    num_shards: Annotated[int, typer.Option(
        "--num-shards", min=1, help="Cut the corpus into N shards (by file, and large .txt/.jsonl by byte range at "
                                    "line boundaries), each tokenized, packed and split on its own; the store depends "
                                    "only on the inputs and N.", rich_help_panel=SHARDS)] = 1,
    shard_index: Annotated[Optional[list[int]], typer.Option(
        "--shard-index", help="Prepare only shard I (repeatable): processes on any hosts fill one store together; "
                              "the one that finds every shard done finishes it (so does a later plain prepare).",
        rich_help_panel=SHARDS, show_default=False)] = None,
    executor: Annotated[str, choice(
        "--executor", constants.EXECUTORS,
        help="local: this process (and its --num-proc workers); ray: one Ray task per shard "
             "(pip install 'mlmtool\\[ray]').", rich_help_panel=SHARDS)] = constants.EXECUTORS[0],
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", help="The Ray cluster to run on (default: start a local one).",
        rich_help_panel=SHARDS, show_default=False)] = None,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Re-read every shard of the store against its ledger (sizes, sha256); "
                         "without FILE... only that.", rich_help_panel=SHARDS)] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Tokenize FILE... into blocks of --max-seq-length tokens (DIR/data: train, validation).

    Re-running with the same inputs, tokenizer and options does nothing ("up to date");
    --force redoes it.
    """
    from mlmtool.modeldir import ModelDir
    from mlmtool.data.prepare import prepare
    from mlmtool.runtime.progress import err_console, human_bytes, quiet, say

    mdir = ModelDir(model_dir).with_data(name)
    if verify and not files and not corpus_options.dataset:
        _verify(mdir, json_out)
        return
    if not mdir.config_path.exists():
        mdir.read_config()  # "run 'mlmtool init DIR' first"
    mdir.require_tokenizer()
    corpus = corpus_options.open(files)
    result = prepare(mdir, corpus, max_seq_length=max_seq_length, line_by_line=line_by_line,
                     validation_split_percentage=validation_split_percentage,
                     num_proc=num_proc, force=force, show_progress=not json_out and not quiet(),
                     piece_cache=piece_cache, num_shards=num_shards, shard_indices=shard_index,
                     executor=executor, ray_address=ray_address)
    if verify and result["status"] != "shards written":
        result["verify"] = _verify(mdir, json_out=False, quiet_out=True)
    for line in [*corpus.warnings(), *result.get("warnings", [])]:
        err_console.print(f"[bold yellow]warning:[/] {line}", soft_wrap=True, highlight=False)
    if json_out:
        emit(result)
        return
    if result["status"] == "shards written":
        say(f"Shards {', '.join(map(str, result['shards_here']))} of {result['num_shards']} written "
            f"({result['shards_done']} of {result['num_shards']} done); the store is finished by the process that "
            f"finds them all done, or by 'mlmtool prepare {model_dir} FILE... --num-shards {result['num_shards']}'")
        return
    if result["status"] == "up to date":
        say(f"Up to date: {result['data_dir']} ({result['num_blocks']['train']:,} train, "
            f"{result['num_blocks']['validation']:,} validation blocks of {result['seq_len']}); "
            "--force redoes it")
        return
    nb, docs = result["num_blocks"], result["documents_per_split"]
    say(f"Prepared {result['documents']:,} documents, {result['tokens']:,} tokens → "
        f"{result['blocks']:,} blocks of {result['seq_len']} "
        f"(train {nb['train']:,} blocks from {docs['train']:,} documents, "
        f"validation {nb['validation']:,} from {docs['validation']:,})")
    say(f"{human_bytes(result['bytes'])} in {result['seconds']:.1f} s "
        f"({result['mb_per_s'] or 0:.1f} MB/s, {result['parallelism']}) → {result['data_dir']}")


def _verify(mdir, json_out: bool, quiet_out: bool = False) -> dict:
    from mlmtool.runtime.progress import say
    from mlmtool.data.shards import verify

    mdir.require_data()
    result = verify(mdir.data_dir)
    if quiet_out:
        return result
    if json_out:
        emit(result)
    else:
        fp = result["fingerprint"] or {}
        say(f"Verified {result['shards']} shard{'s' if result['shards'] != 1 else ''} of {mdir.data_dir} against "
            f"the ledger ({result['bytes_read']:,} bytes); train {fp.get('train', '?')[:16]}, "
            f"validation {fp.get('validation', '?')[:16]}")
    return result
