"""``mlmtool prepare DIR FILE...``: tokenize the corpus into fixed-length blocks in DIR/data."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mlmtool.cli import app
from mlmtool.cli.options import (DataFilesOpt, DatasetConfigOpt, DatasetOpt, DatasetRevisionOpt, FilesArg,
                                 ForceOpt, JsonOpt, MaxSeqLengthOpt, ModelDirArg, NumProcOpt,
                                 PieceCacheOpt, SplitOpt, StreamingOpt, TextColumnOpt)

BLOCKS = "Blocks"


@app.command("prepare")
def prepare_command(
    model_dir: ModelDirArg,
    files: FilesArg = None,
    max_seq_length: MaxSeqLengthOpt = 128,
    line_by_line: Annotated[bool, typer.Option(
        "--line-by-line", help="One document per block (truncated, padded) instead of the "
                               "concatenated token stream cut into blocks.",
        rich_help_panel=BLOCKS)] = False,
    validation_split_percentage: Annotated[float, typer.Option(
        "--validation-split-percentage",
        help="Percent of the documents held out for validation, spread evenly through the "
             "corpus (document i is held out when floor((i+1)p/100) > floor(ip/100)); 0 for none.",
        rich_help_panel=BLOCKS)] = 5.0,
    num_proc: NumProcOpt = None,
    piece_cache: PieceCacheOpt = True,
    text_column: TextColumnOpt = "text",
    dataset: DatasetOpt = None,
    dataset_config: DatasetConfigOpt = None,
    split: SplitOpt = "train",
    streaming: StreamingOpt = False,
    dataset_revision: DatasetRevisionOpt = None,
    data_files: DataFilesOpt = None,
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Write block store NAME (DIR/data-NAME) beside the default DIR/data, e.g. seq128 and "
                       "seq512 for training in stages; 'train --data NAME' reads it.",
        rich_help_panel=BLOCKS, show_default=False)] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Tokenize FILE... into blocks of --max-seq-length tokens (DIR/data: train, validation).

    Re-running with the same inputs, tokenizer and options does nothing ("up to date");
    --force redoes it.
    """
    from mlmtool.corpus import open_corpus
    from mlmtool.modeldir import ModelDir
    from mlmtool.prepare import prepare
    from mlmtool.progress import console, err_console, human_bytes, quiet, say

    mdir = ModelDir(model_dir).with_data(name)
    if not mdir.config_path.exists():
        mdir.read_config()  # "run 'mlmtool init DIR' first"
    mdir.require_tokenizer()
    corpus = open_corpus(files, text_column=text_column, dataset=dataset,
                         dataset_config=dataset_config, split=split, streaming=streaming,
                         revision=dataset_revision, data_files=data_files)
    result = prepare(mdir, corpus, max_seq_length=max_seq_length, line_by_line=line_by_line,
                     validation_split_percentage=validation_split_percentage,
                     num_proc=num_proc, force=force, show_progress=not json_out and not quiet(),
                     piece_cache=piece_cache)
    for line in [*corpus.warnings(), *result.get("warnings", [])]:
        err_console.print(f"[bold yellow]warning:[/] {line}", soft_wrap=True, highlight=False)
    if json_out:
        import json

        console.print_json(json.dumps(result))
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
