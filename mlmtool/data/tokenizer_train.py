"""Train the model's tokenizer from a corpus (``mlmtool tokenizer DIR FILE...``).

Three algorithms; each model family says which is its default and which special tokens it
uses (``mlmtool.models``: ``Family.tokenizer``):

* ``bpe``: byte-level BPE as RoBERTa (and the seed notebook, HF's "Pre-Training a
  Transformers model on TPU with Flax/JAX"): ByteLevel pre-tokenizer without prefix
  space, initial alphabet = the 256 byte symbols, ByteLevel decoder.
* ``wordpiece``: as BERT: BertNormalizer (lowercasing by default, as the uncased
  presets), BertPreTokenizer, ``##`` continuing prefix.
* ``unigram``: SentencePiece's Unigram language model (Kudo 2018, arXiv:1804.10959) as
  XLM-R and CamemBERT use it: SentencePiece's default ``nmt_nfkc`` normalization (NFKC,
  as a Precompiled charsmap, the form XLM-R's tokenizer.json has and ``XLMRobertaTokenizer``
  rebuilds), split on whitespace, Metaspace ``▁`` word boundaries, no pre-split on
  punctuation, so it suits languages without spaces between words or with rich morphology
  (Korean, the seed notebook's language).

The special tokens take ids 0..4 in the family's (or the algorithm's) order, e.g.
``<s> <pad> </s> <unk> <mask>`` (RoBERTa/XLM-R: ``<mask>`` an lstrip AddedToken,
``<s> … </s>`` post-processing) or ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (BERT: ``[CLS] $A
[SEP]`` template).  ``--lowercase`` adds a Lowercase normalizer.

Training streams the corpus into ``tokenizers``' ``train_from_iterator`` in batches of
documents (no per-document Python work).  The result is saved as a Hugging Face
tokenizer directory (without importing transformers) so
``AutoTokenizer.from_pretrained(DIR)`` gives the same ids as
``tokenizers.Tokenizer.from_file(DIR/tokenizer.json)``, and config.json's vocab_size and
special token ids are brought into agreement with it.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from mlmtool import models
from mlmtool.constants import DEFAULT_MIN_FREQUENCY
from mlmtool.data.corpus import Corpus
from mlmtool.data.corpus.sample import Reservoir
from mlmtool.errors import ConfigError, ModelDirError
from mlmtool.modeldir import TOKENIZER_FILES, ModelDir, file_sha256, remove_leftovers
from mlmtool.presets import MAX_VOCAB_SIZE, max_sequence_length
from mlmtool.runtime.progress import StageProgress, console, human_bytes, say
from mlmtool.models.base import ALGORITHM_SPECIALS, ALGORITHMS, SpecialTokens

KINDS = ALGORITHMS
KIND_NAMES = {"bpe": "byte-level BPE", "wordpiece": "WordPiece", "unigram": "Unigram"}
#: WordPiece keeps at most this many distinct characters (rarer ones become [UNK]), as
#: HF's BertWordPieceTokenizer.train does.
WORDPIECE_LIMIT_ALPHABET = 1000
#: Unigram pieces are at most this many characters (SentencePiece's max_sentencepiece_length).
UNIGRAM_MAX_PIECE_LENGTH = 16


def minimum_vocab_size(kind: str, specials: SpecialTokens | None = None) -> int:
    """Smallest vocabulary that holds the specials and the base alphabet (known up front:
    byte-level BPE needs the 256 byte symbols).  For WordPiece and Unigram the alphabet
    depends on the corpus; the check after training names it."""
    n = len((specials or ALGORITHM_SPECIALS[kind]).order)
    return n + 256 if kind == "bpe" else n + 1


def _added_tokens(kind: str, specials: SpecialTokens) -> list:
    from tokenizers import AddedToken

    return [AddedToken(content, lstrip=specials.mask_lstrip and content == specials.mask, rstrip=False,
                       normalized=False, special=True) for content in specials.order]


def nmt_nfkc_charsmap() -> bytes:
    """SentencePiece's ``nmt_nfkc`` normalization rule (NFKC, control characters removed,
    Unicode spaces made spaces) as the charsmap of a ``Precompiled`` normalizer: what XLM-R's
    and CamemBERT's tokenizer.json hold, the one normalizer their transformers classes keep.
    Generated with sentencepiece by scripts/make_charsmap.py (240 kB, stored gzipped)."""
    return gzip.decompress((Path(__file__).parents[1] / "resources" / "nmt_nfkc.charsmap.gz").read_bytes())


def build_tokenizer(kind: str, *, lowercase: bool, specials: SpecialTokens | None = None):
    """An untrained ``tokenizers.Tokenizer`` of ``kind``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    specials = specials or ALGORITHM_SPECIALS[kind]

    if kind == "bpe":
        tok = Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False))
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=specials.unk,
                                         continuing_subword_prefix="##", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        nfkc = normalizers.Precompiled(nmt_nfkc_charsmap())
        tok.normalizer = normalizers.Sequence([nfkc, normalizers.Lowercase()]) if lowercase else nfkc
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    else:
        raise ConfigError(f"unknown tokenizer type {kind!r}", f"use one of: {', '.join(KINDS)}")
    return tok


def build_trainer(kind: str, *, vocab_size: int, min_frequency: int, specials: SpecialTokens | None = None):
    """The trainer of ``kind``.  (Unigram has no frequency threshold: it prunes by likelihood.)"""
    from tokenizers import pre_tokenizers, trainers

    specials = specials or ALGORITHM_SPECIALS[kind]
    if kind == "bpe":
        return trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                   special_tokens=_added_tokens(kind, specials), show_progress=False,
                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if kind == "unigram":
        return trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=_added_tokens(kind, specials),
                                       unk_token=specials.unk, show_progress=False,
                                       max_piece_length=UNIGRAM_MAX_PIECE_LENGTH)
    return trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                     special_tokens=_added_tokens(kind, specials), show_progress=False,
                                     limit_alphabet=WORDPIECE_LIMIT_ALPHABET,
                                     continuing_subword_prefix="##")


def add_post_processor(tok, kind: str, specials: SpecialTokens | None = None) -> None:
    """``<s> $A </s>`` (RoBERTa's convention; RobertaProcessing for byte-level BPE, whose
    offsets it trims, as XLM-R's template otherwise) or ``[CLS] $A [SEP]`` (BERT's; for
    byte-level BPE, ModernBERT's, after a ByteLevel step that trims the offsets of the
    leading space: token classification's entities start on the word, as in RoBERTa)."""
    from tokenizers import processors

    specials = specials or ALGORITHM_SPECIALS[kind]
    cls_id, sep_id = tok.token_to_id(specials.cls), tok.token_to_id(specials.sep)
    cls, sep = specials.cls, specials.sep
    if specials.processor == "roberta" and kind == "bpe":
        tok.post_processor = processors.RobertaProcessing(
            (sep, sep_id), (cls, cls_id), trim_offsets=True, add_prefix_space=False)
    elif specials.processor == "roberta":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} {sep} $B {sep}",
            special_tokens=[(cls, cls_id), (sep, sep_id)])
    else:
        template = processors.TemplateProcessing(
            single=f"{specials.cls} $A {specials.sep}",
            pair=f"{specials.cls} $A {specials.sep} $B:1 {specials.sep}:1",
            special_tokens=[(specials.cls, cls_id), (specials.sep, sep_id)])
        tok.post_processor = (processors.Sequence([processors.ByteLevel(trim_offsets=True), template])
                              if kind == "bpe" else template)


def tokenizer_files(tok, kind: str, *, model_max_length: int, specials: SpecialTokens | None = None,
                    fields: dict | None = None) -> dict[str, str]:
    """The three files of a Hugging Face tokenizer directory, as text, without transformers.

    tokenizer.json is ``Tokenizer.to_str``, the same JSON ``save_pretrained`` writes (tested).
    tokenizer_config.json names the family's class and its fields (``fields``:
    ``TokenizerDefaults.tokenizer_config``; tested to behave as that class built from the
    same tokenizer.json), or ``PreTrainedTokenizerFast`` without ``fields`` or where that
    class would rebuild another pipeline (transformers 5 resolves it to its tokenizers
    backend, which loads tokenizer.json as it is).  special_tokens_map.json is for transformers
    4.x and other tools (5 no longer writes it).  Importing transformers to write them cost
    0.65 CPU-s, 10% of training a 50k vocabulary on 21 MB (docs/benchmarks.md).
    """
    specials = specials or ALGORITHM_SPECIALS[kind]
    config = {"backend": "tokenizers", **specials.hf_kwargs(), "model_max_length": model_max_length,
              "tokenizer_class": "PreTrainedTokenizerFast", **(fields or {})}
    smap = dict(specials.hf_kwargs())
    smap["mask_token"] = {"content": specials.mask, "lstrip": specials.mask_lstrip, "rstrip": False,
                          "normalized": False, "single_word": False}
    dump = lambda d: json.dumps(d, indent=2, sort_keys=True, ensure_ascii=False) + "\n"  # noqa: E731
    return {"tokenizer.json": tok.to_str(pretty=True), "tokenizer_config.json": dump(config),
            "special_tokens_map.json": dump(smap)}


def save_tokenizer(tok, model_dir: ModelDir, kind: str, *, model_max_length: int,
                   config: dict | None = None, specials: SpecialTokens | None = None,
                   fields: dict | None = None) -> list[Path]:
    """Write :func:`tokenizer_files` into a staging folder, then install the set into DIR
    (``ModelDir.install_tokenizer``: staged whole first, tokenizer.json last after
    ``config``), so a full disk or a kill while writing leaves DIR as it was or complete."""
    with model_dir.tokenizer_staging() as tmp:
        for name, text in tokenizer_files(tok, kind, model_max_length=model_max_length, specials=specials,
                                          fields=fields).items():
            (tmp / name).write_text(text, encoding="utf-8")
        return model_dir.install_tokenizer(tmp, config=config)


#: Text per item handed to ``train_from_iterator``.  tokenizers buffers up to 256 items
#: ahead of its workers, so this bounds the read-ahead (and the progress bar's lead over
#: the real work) to about 16 MB.
TRAIN_BATCH_BYTES = 1 << 16
#: Documents per item when the trainer is handed a sample (already in memory).
SAMPLE_CHUNK_DOCUMENTS = 1000


class _ReadingProgress:
    """Progress of the reading (and counting) pass, then a status line while the trainer
    computes the vocabulary from the counts, which it does without reporting progress.
    """

    def __init__(self, corpus: Corpus, show: bool, sample: Reservoir | None = None):
        self.corpus = corpus
        self.show = show
        self.sample = sample  # None: the whole corpus goes to the trainer as it is read
        what = "Sampling corpus" if sample is not None else "Reading corpus"
        self.progress = StageProgress(what, total=corpus.total, unit=corpus.unit) if show else None
        self.open = False
        self._status = None

    def batches(self) -> Iterator[list[str]]:
        if self.progress is not None:
            self.progress.__enter__()
            self.open = True
        try:
            for batch in self.corpus.batches(batch_bytes=TRAIN_BATCH_BYTES):
                if self.progress is not None:
                    self.progress.advance(batch.progress, documents=len(batch.documents))
                if self.sample is not None:
                    self.sample.add(batch.documents)
                elif batch.documents:
                    yield batch.documents
        except BaseException as e:
            self.close(e)
            raise
        self.close(None)
        if self.sample is not None:
            yield from self._sampled()
        else:
            self._start_status("Computing the vocabulary (merges / word pieces)…")

    def _sampled(self) -> Iterator[list[str]]:
        """The sample, after the pass, in corpus order; the trainer counts it from memory."""
        documents = self.sample.take()
        if self.show:
            say(f"Sampled {self.sample.documents:,} of {self.sample.seen:,} documents "
                f"({human_bytes(self.sample.bytes)}, seed {self.sample.seed})")
        self._start_status("Counting the sample, then computing the vocabulary (merges / word pieces)…")
        for start in range(0, len(documents), SAMPLE_CHUNK_DOCUMENTS):
            yield documents[start:start + SAMPLE_CHUNK_DOCUMENTS]

    def _start_status(self, text: str) -> None:
        if self.show:
            if console.is_terminal:
                self._status = console.status(text)
                self._status.start()
            else:
                say(text)

    def close(self, exc: BaseException | None) -> None:
        if self.open:
            self.open = False
            self.progress.__exit__(type(exc) if exc else None, exc, None)

    def finish(self) -> None:
        self.close(None)
        if self._status is not None:
            self._status.stop()
            self._status = None


def check_replaceable(mdir: ModelDir, force: bool) -> None:
    """Refuse (before reading any corpus) to retrain the tokenizer of a DIR whose trained or
    imported weights belong to it: a new vocabulary makes every checkpoint, the export and
    ``init --from``'s weights unusable."""
    if force:
        return
    if mdir.init_weights_path.exists():
        raise ModelDirError(
            f"{mdir} continues the model {mdir.init_source() or mdir.init_weights_path} ('mlmtool init --from'), "
            "whose weights belong to its tokenizer",
            f"skip this step: run 'mlmtool prepare {mdir} FILE...'; or pass --force to train a new tokenizer "
            "and start from random weights")
    trained = mdir.trained_state()
    if trained:
        raise ModelDirError(
            f"{mdir} holds a model trained with its tokenizer ({', '.join(trained)}): a new tokenizer would make "
            "it unusable",
            f"train the new tokenizer in a new directory ('mlmtool init NEW --from-config {mdir.config_path}'), "
            "or pass --force to replace it anyway (then 'mlmtool prepare DIR FILE... --force' and "
            "'mlmtool train DIR --no-resume --force')")


def train_tokenizer(model_dir: ModelDir | str | os.PathLike, corpus: Corpus, *,
                    kind: str | None = None, vocab_size: int | None = None,
                    min_frequency: int = DEFAULT_MIN_FREQUENCY, lowercase: bool | None = None,
                    show_progress: bool = True, force: bool = False, sample_bytes: int | None = None,
                    sample_documents: int | None = None, seed: int = 0,
                    pad_vocab_to_multiple_of: int = 1) -> dict[str, Any]:
    """Train, save into DIR, update config.json and the manifest; return a summary dict.

    ``kind``/``vocab_size``/``lowercase`` default to the model family's convention (e.g.
    roberta → byte-level BPE, bert → WordPiece lowercased, xlm-roberta → Unigram); the
    config's vocab_size.  Without
    ``force``, a tokenizer that trained weights belong to is not replaced
    (:func:`check_replaceable`); prepared data made with another tokenizer is reported
    (``stale_data``: the CLI warns, ``train`` refuses it until ``prepare --force``).  DIR is locked
    (``.mlmtool.runtime.lock``) while training, so a running ``train`` or ``prepare`` is not
    pulled out from under.

    ``sample_bytes``/``sample_documents``: train on a seeded uniform sample of the documents
    of about that many bytes (or that many documents) instead of the whole corpus
    (:mod:`mlmtool.data.corpus.sample`); the result and the manifest record it.

    ``pad_vocab_to_multiple_of``: config.json's vocab_size (the embedding matrix) is the
    tokenizer's size rounded up to a multiple of it (``model_vocab_size`` in the result); 1
    keeps them equal.  The padding ids never occur in the data, masking never draws them and
    predict never returns them.
    """
    mdir = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
    config = mdir.read_config()
    defaults = models.family_for(config["model_type"]).tokenizer[config["model_type"]]
    kind = (kind or defaults.algorithm).lower()
    if kind not in KINDS:
        raise ConfigError(f"unknown tokenizer type {kind!r}", f"use one of: {', '.join(KINDS)}")
    specials = defaults.specials_for(kind)
    requested = int(vocab_size if vocab_size is not None else config["vocab_size"])
    minimum = minimum_vocab_size(kind, specials)
    if requested < minimum:
        n = len(specials.order)
        what = f"the 256 byte symbols and {n} special tokens" if kind == "bpe" else "the special tokens"
        raise ConfigError(f"vocab size {requested} is too small for {what}",
                          f"use --vocab-size {minimum} or more")
    if requested > MAX_VOCAB_SIZE:
        raise ConfigError(f"vocab size {requested:,} is beyond the {MAX_VOCAB_SIZE:,} token ids the block store holds",
                          "use e.g. --vocab-size 50265 (RoBERTa's)")
    if not 1 <= min_frequency < 2**32:
        raise ConfigError(f"--min-frequency must be in 1 .. 2^32-1, got {min_frequency}",
                          "use --min-frequency 2 (the default)")
    if not 1 <= pad_vocab_to_multiple_of <= 1 << 16:
        raise ConfigError(f"--pad-vocab-to-multiple-of must be in 1 .. 65536, got {pad_vocab_to_multiple_of}",
                          "use e.g. --pad-vocab-to-multiple-of 64 (or 1: no padding)")
    if lowercase is None:  # the family's choice for its own algorithm; else uncased WordPiece only
        lowercase = defaults.lowercase if kind == defaults.algorithm else kind == "wordpiece"
    if sample_bytes is not None and sample_documents is not None:
        raise ConfigError("--sample-bytes and --sample-documents both given", "pass one of them")
    for flag, n in (("--sample-bytes", sample_bytes), ("--sample-documents", sample_documents)):
        if n is not None and n < 1:
            raise ConfigError(f"{flag} must be at least 1, got {n}", f"e.g. {flag} 1000000")
    sample = (Reservoir(max_bytes=sample_bytes, max_documents=sample_documents, seed=seed)
              if sample_bytes is not None or sample_documents is not None else None)

    if show_progress:
        say(f"Training a {KIND_NAMES[kind]} tokenizer "
            f"(vocab {requested:,}) on {corpus.describe()}")
    check_replaceable(mdir, force)
    with mdir.lock("tokenizer"):
        for name in ("tokenizer", *TOKENIZER_FILES, "config.json"):  # what a killed run left behind
            remove_leftovers(mdir / name)
        return _train(mdir, corpus, config, kind=kind, specials=specials, config_ids=defaults.config_ids,
                      requested=requested, min_frequency=min_frequency, lowercase=lowercase,
                      show_progress=show_progress, sample=sample, fields=defaults.tokenizer_config(kind, lowercase),
                      pad_to=pad_vocab_to_multiple_of)


def _data_tokenizer(mdir: ModelDir) -> str | None:
    """sha256 of the tokenizer.json DIR/data was prepared with (None: no prepared data)."""
    try:
        return json.loads((mdir.data_dir / "meta.json").read_text(encoding="utf-8")).get("tokenizer_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _train(mdir: ModelDir, corpus: Corpus, config: dict, *, kind: str, specials: SpecialTokens,
           config_ids: tuple[tuple[str, str], ...], requested: int, min_frequency: int, lowercase: bool,
           show_progress: bool, sample: Reservoir | None = None, fields: dict | None = None,
           pad_to: int = 1) -> dict[str, Any]:
    tok = build_tokenizer(kind, lowercase=lowercase, specials=specials)
    trainer = build_trainer(kind, vocab_size=requested, min_frequency=min_frequency, specials=specials)
    reading = _ReadingProgress(corpus, show_progress, sample)
    start = time.perf_counter()
    try:
        # An exception of the iterator (e.g. DataError: empty corpus) comes back out as is.
        tok.train_from_iterator(reading.batches(), trainer=trainer)
    finally:
        reading.finish()
    seconds = time.perf_counter() - start

    real = tok.get_vocab_size(with_added_tokens=True)
    if real > requested:
        raise ConfigError(f"vocab size {requested} is too small for this corpus' alphabet and the "
                          f"special tokens (they need {real})",
                          f"use --vocab-size {real} or more")
    ids = {t: tok.token_to_id(t) for t in specials.order}
    assert list(ids.values()) == list(range(len(ids))), ids
    add_post_processor(tok, kind, specials)
    if kind == "bpe":  # as RobertaTokenizer rebuilds it (the trainer leaves None: the same tokenizer)
        tok.model.continuing_subword_prefix = tok.model.end_of_word_suffix = ""

    config["vocab_size"] = -(-real // pad_to) * pad_to  # the embedding rows: padded up to a multiple
    for field, role in config_ids:  # the family's special ids in config.json
        config[field] = ids[specials.role(role)]
    max_len = max_sequence_length(config)
    files = save_tokenizer(tok, mdir, kind, model_max_length=max_len, config=config, specials=specials,
                           fields=fields)

    stats = corpus.stats
    result = {
        "type": kind,
        "vocab_size": real,
        "requested_vocab_size": requested,
        "model_vocab_size": config["vocab_size"],
        "min_frequency": min_frequency,
        "lowercase": lowercase,
        "model_max_length": max_len,
        "documents": stats.documents,
        "bytes": stats.bytes,
        "skipped_lines": stats.skipped,
        "seconds": round(seconds, 3),
        "special_tokens": {t: i for t, i in ids.items()},
        "files": [str(p) for p in files],
        "tokenizer_sha256": file_sha256(mdir.tokenizer_path),
    }
    result["stale_data"] = _data_tokenizer(mdir) not in (None, result["tokenizer_sha256"])
    result["warnings"] = []
    if real < 0.9 * requested:  # the text holds too few distinct pieces: say so, not just the number
        on = "the sample" if sample is not None else "the corpus"
        more = "a larger --sample-bytes / --sample-documents" if sample is not None else "more text"
        result["warnings"].append(f"the vocabulary has {real:,} tokens, {real / requested:.0%} of the {requested:,} "
                                  f"asked for: {on} is too small to make more (give {more}, or a smaller "
                                  "--vocab-size)")
    args = {"type": kind, "vocab_size": requested, "min_frequency": min_frequency,
            "lowercase": lowercase, "text_column": corpus.text_column}
    outputs = {k: result[k] for k in ("vocab_size", "documents", "bytes", "tokenizer_sha256")}
    if pad_to != 1:  # recorded only when asked for: earlier manifests stay as they were
        args["pad_vocab_to_multiple_of"] = pad_to
        outputs["model_vocab_size"] = config["vocab_size"]
    if sample is not None:  # what the tokenizer was trained on, and how to draw it again
        result["sample"] = sample.summary()
        args |= ({"sample_bytes": sample.max_bytes} if sample.max_bytes is not None
                 else {"sample_documents": sample.max_documents}) | {"seed": sample.seed}
        outputs["sample"] = {k: result["sample"][k] for k in ("documents", "bytes")}
    mdir.record("tokenizer", args=args, inputs=corpus.fingerprint(), outputs=outputs)
    return result
