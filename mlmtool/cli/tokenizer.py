"""``mlmtool tokenizer DIR FILE...``: train the tokenizer on a corpus and save it into DIR."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mlmtool import constants
from mlmtool.cli import app
from mlmtool.cli.options import _checked, Corpus, FilesArg, JsonOpt, ModelDirArg, SeedOpt, choice, emit, option_groups
from mlmtool.models import tokenizer_help
from mlmtool.models.base import ALGORITHMS

TOKENIZER = "Tokenizer"


@app.command("tokenizer")
@option_groups
def tokenizer_command(
    model_dir: ModelDirArg,
    files: FilesArg = None,
    type_: Annotated[Optional[str], choice(
        "--type", ALGORITHMS, help="bpe (byte-level, as RoBERTa), wordpiece (as BERT) or unigram (SentencePiece's, as "
                       f"XLM-R) (default: the model family's: {tokenizer_help()}).",
        rich_help_panel=TOKENIZER, show_default=False)] = None,
    vocab_size: Annotated[Optional[int], typer.Option(
        "--vocab-size", min=1, help="Vocabulary size, special tokens included (default: config.json's).",
        rich_help_panel=TOKENIZER, show_default=False)] = None,
    min_frequency: Annotated[int, typer.Option(
        "--min-frequency", min=1, help="Least count for a merge / word piece to enter the vocabulary.",
        rich_help_panel=TOKENIZER)] = constants.DEFAULT_MIN_FREQUENCY,
    lowercase: Annotated[Optional[bool], typer.Option(
        "--lowercase/--no-lowercase", help="Lowercase the text first (default: the model's "
        "convention: yes for wordpiece (uncased BERT), no for bpe).",
        rich_help_panel=TOKENIZER, show_default=False)] = None,
    sample_bytes: Annotated[Optional[int], typer.Option(
        "--sample-bytes", min=1, help="Train on a uniform random sample of the documents, about N bytes of "
                                      "text (for a corpus too big for the trainer's memory; drawn with --seed).",
        rich_help_panel=TOKENIZER, show_default=False)] = None,
    sample_documents: Annotated[Optional[int], typer.Option(
        "--sample-documents", min=1, help="Train on a uniform random sample of N documents (drawn with --seed).",
        rich_help_panel=TOKENIZER, show_default=False)] = None,
    pad_vocab_to_multiple_of: Annotated[int, typer.Option(
        "--pad-vocab-to-multiple-of", help="Round config.json's vocab_size (the embedding matrix) up to a multiple "
        "of N, as resize_token_embeddings(pad_to_multiple_of=N) does (64 helps GPU/TPU matrix units); the ids past "
        "the tokenizer are never drawn by masking nor predicted.",
        callback=_checked("--pad-vocab-to-multiple-of", lambda v: 1 <= v <= 1 << 16, "in 1 .. 65536"),
        rich_help_panel=TOKENIZER)] = 1,
    seed: SeedOpt = 0,
    corpus_options: Corpus = Corpus(),
    force: Annotated[bool, typer.Option(
        "--force", "-f", help="Replace the tokenizer even though trained weights (checkpoints, "
                              "model.safetensors, 'init --from' weights) belong to it: they become unusable "
                              "('init --from' weights are dropped).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train the tokenizer (byte-level BPE, WordPiece or Unigram) on FILE... and save it into DIR.

    Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json (AutoTokenizer
    loads DIR), and sets config.json's vocab_size and special token ids to match.
    """
    from mlmtool.modeldir import ModelDir
    from mlmtool.runtime.progress import err_console, human_bytes, quiet, say
    from mlmtool.data.tokenizer_train import train_tokenizer

    mdir = ModelDir(model_dir)
    if not mdir.config_path.exists():
        mdir.read_config()  # "run 'mlmtool init DIR' first" before reading any corpus
    from mlmtool.data.tokenizer_train import check_replaceable

    check_replaceable(mdir, force)  # before reading any corpus
    corpus = corpus_options.open(files)
    result = train_tokenizer(mdir, corpus, kind=type_, vocab_size=vocab_size,
                             min_frequency=min_frequency, lowercase=lowercase,
                             show_progress=not json_out and not quiet(), force=force,
                             sample_bytes=sample_bytes, sample_documents=sample_documents, seed=seed,
                             pad_vocab_to_multiple_of=pad_vocab_to_multiple_of)
    if mdir.init_weights_path.exists():  # --force: the weights no longer fit the vocabulary
        mdir.init_weights_path.unlink()
        err_console.print(f"[bold yellow]warning:[/] removed {mdir.init_weights_path}: the new tokenizer "
                          "makes those weights meaningless; training starts from random weights",
                          soft_wrap=True, highlight=False)
    if result.get("stale_data"):
        err_console.print(f"[bold yellow]warning:[/] {mdir.data_dir} was prepared with the previous tokenizer: "
                          f"run 'mlmtool prepare {mdir} FILE... --force' before training", soft_wrap=True,
                          highlight=False)
    for line in [*corpus.warnings(), *([] if json_out else result.get("warnings", []))]:  # --json: in the object
        err_console.print(f"[bold yellow]warning:[/] {line}", soft_wrap=True, highlight=False)
    if json_out:
        emit(result)
        return
    from mlmtool.data.tokenizer_train import KIND_NAMES

    kind = KIND_NAMES[result["type"]]
    case = ", lowercased" if result["lowercase"] else ""
    def documents(n: int) -> str:
        return f"{n:,} document{'' if n == 1 else 's'}"

    sample = result.get("sample")
    read = (f"on a sample of {documents(sample['documents'])} ({human_bytes(sample['bytes'])}, seed {sample['seed']}) "
            f"of the corpus' {documents(result['documents'])} ({human_bytes(result['bytes'])})" if sample
            else f"on {documents(result['documents'])} ({human_bytes(result['bytes'])})")
    say(f"Trained a {kind} tokenizer{case}: vocab {result['vocab_size']:,} "
        f"(asked {result['requested_vocab_size']:,}), {read} in {result['seconds']:.1f} s")
    padded = (f" (padded from the tokenizer's {result['vocab_size']:,} to a multiple of {pad_vocab_to_multiple_of})"
              if result["model_vocab_size"] != result["vocab_size"] else "")
    say(f"Wrote {', '.join(result['files'])}; config.json vocab_size = {result['model_vocab_size']}{padded}")
