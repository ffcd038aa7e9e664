"""Corpus input shared by ``mlmtool tokenizer`` and ``mlmtool prepare``.

:func:`open_corpus` turns the command line's ``FILE...`` (or ``--dataset NAME``) into a
:class:`Corpus`: a checked, ordered list of sources that streams its documents in
batches (:meth:`Corpus.batches`), never holding the whole corpus in memory, and that
has a cheap :meth:`Corpus.fingerprint` for "up to date" checks.

The parts, one concern each:

* :mod:`~mlmtool.data.corpus.sources`: resolving the inputs (files, directories, globs,
  ``save_to_disk`` directories, ``--data-files``) into checked sources; fingerprints.
* :mod:`~mlmtool.data.corpus.streams`: decompressing (``.gz``/``.xz``/``.zst``/``.bz2``; ``.zst``
  needs the optional ``zstandard`` package) and cutting text into whole-line blocks.
* :mod:`~mlmtool.data.corpus.readers`: one reader per format (``.txt``/``.text``,
  ``.jsonl``/``.ndjson``, ``.json``, ``.csv``, ``.parquet``, saved datasets, hub datasets),
  registered in ``READERS``.
* :mod:`~mlmtool.data.corpus.sample`: a seeded uniform sample of the documents within a byte or
  document budget (``tokenizer --sample-bytes``/``--sample-documents``).

Inputs: ``.txt`` holds one document per line; the structured formats hold the text in
the column ``text_column`` (``--text-column``, default ``text``).  A hub dataset is
``dataset=NAME`` with ``dataset_config``, ``split``, ``streaming``, ``revision``, read with
``datasets.load_dataset``; ``dataset`` may also name one of datasets' packaged builders
(``json``, ``csv``, ``parquet``, ``text``, ...) with ``data_files`` (local paths and globs,
checked and expanded here, or URLs): the same code path as a hub dataset, streaming
included, without a hub.

Order is deterministic: the arguments in the order given, each directory or glob in
sorted order; a file named twice is read once.  Lines that are not valid UTF-8 are
skipped and counted per file (:attr:`CorpusStats.skipped_lines`, :meth:`Corpus.warnings`).

This package imports neither JAX nor transformers (``prepare`` forks worker processes,
and forking after JAX has started threads can deadlock); ``datasets``, ``pyarrow`` and
``zstandard`` are imported only when an input needs them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

from mlmtool.data.corpus.readers import (DEFAULT_BATCH_BYTES, DEFAULT_BATCH_DOCUMENTS, READERS, Batch, CorpusStats,
                                         read_hub)
from mlmtool.data.corpus.sources import PACKAGED_BUILDERS, HubDataset, Source, expand_data_files, fingerprint, resolve
from mlmtool.errors import DataError

__all__ = ["open_corpus", "Corpus", "Batch", "CorpusStats", "Source", "HubDataset", "DataError",
           "DEFAULT_BATCH_BYTES", "DEFAULT_BATCH_DOCUMENTS"]


def open_corpus(files: Sequence[str | os.PathLike] | None = None, *, text_column: str = "text",
                dataset: str | None = None, dataset_config: str | None = None,
                split: str = "train", streaming: bool = False,
                revision: str | None = None, data_files: Sequence[str | os.PathLike] | None = None) -> "Corpus":
    """Resolve and check the inputs (raises :class:`DataError`); nothing is read yet.

    Either ``files`` (paths, directories, globs) or ``dataset`` (a hub dataset name) must
    be given, not both.
    """
    files = [str(f) for f in (files or [])]
    if dataset and files:
        raise DataError("both corpus files and --dataset given", "pass one or the other")
    if data_files and not dataset:
        raise DataError("--data-files needs --dataset",
                        "e.g. --dataset json --data-files 'data/*.jsonl' (or csv, parquet, text)")
    if dataset:
        if dataset in PACKAGED_BUILDERS and not data_files and not Path(dataset).exists():
            raise DataError(f"--dataset {dataset} needs --data-files",
                            f"e.g. --dataset {dataset} --data-files 'data/*.{dataset.replace('text', 'txt')}'")
        patterns = [str(f) for f in data_files or []]
        # Local files for a packaged builder; for a hub dataset, paths inside its repository.
        hub = HubDataset(dataset, dataset_config, split, streaming, revision,
                         expand_data_files(patterns) if dataset in PACKAGED_BUILDERS else tuple(patterns))
        return Corpus([], text_column=text_column, split=split, hub=hub)
    if not files:
        raise DataError("no corpus given",
                        "pass corpus files after DIR (e.g. 'data/*.txt') or --dataset NAME")
    return Corpus(resolve(files), text_column=text_column, split=split)


class Corpus:
    """Ordered, checked corpus sources; stream the documents with :meth:`batches`."""

    def __init__(self, sources: list[Source], *, text_column: str = "text", split: str = "train",
                 hub: HubDataset | None = None):
        self.sources = sources
        self.text_column = text_column
        self.split = split
        self.hub = hub
        self.stats = CorpusStats()

    # -- description -------------------------------------------------------------------
    @property
    def unit(self) -> str:
        """Unit of :attr:`total` and of :attr:`Batch.progress`: "bytes" or "documents"."""
        return "documents" if self.hub is not None else "bytes"

    @property
    def total(self) -> int | None:
        """Total progress in :attr:`unit` when known up front (on-disk bytes for files)."""
        if self.hub is not None:
            return None
        return sum(s.size for s in self.sources)

    def describe(self) -> str:
        if self.hub is not None:
            cfg = f" ({self.hub.config})" if self.hub.config else ""
            n = len(self.hub.data_files)
            files = f" of {n} file{'s' if n != 1 else ''}" if n else ""
            return f"dataset {self.hub.name}{cfg}{files}, split {self.hub.split}"
        n = len(self.sources)
        from mlmtool.runtime.progress import human_bytes

        return f"{n} input{'s' if n != 1 else ''}, {human_bytes(self.total or 0)}"

    def fingerprint(self) -> dict:
        """What identifies the input, cheaply (see :func:`mlmtool.data.corpus.sources.fingerprint`)."""
        return fingerprint(self.sources, self.hub, self.text_column, self.split)

    def warnings(self) -> list[str]:
        """Human-readable notes about the last pass (lines skipped as not UTF-8)."""
        if not self.stats.skipped_lines:
            return []
        where = ", ".join(f"{p} ({n:,})" for p, n in self.stats.skipped_lines.items())
        n = self.stats.skipped
        return [f"skipped {n:,} line{'s that are' if n != 1 else ' that is'} not valid UTF-8: {where}"]

    # -- reading -----------------------------------------------------------------------
    def batches(self, batch_bytes: int = DEFAULT_BATCH_BYTES,
                batch_documents: int = DEFAULT_BATCH_DOCUMENTS, *, allow_empty: bool = False) -> Iterator[Batch]:
        """Stream the documents in order, in batches; :attr:`stats` counts as it goes.

        Raises :class:`DataError` at the end if the corpus held no document at all (unless
        ``allow_empty``: one shard of a corpus may hold none, :mod:`mlmtool.data.shards`).
        """
        self.stats = CorpusStats()
        for batch in self._all_batches(batch_bytes, batch_documents):
            self.stats.documents += len(batch.documents)
            yield batch
        if self.stats.documents == 0 and not allow_empty:
            self._raise_empty()

    def _all_batches(self, batch_bytes: int, batch_documents: int) -> Iterator[Batch]:
        if self.hub is not None:
            yield from read_hub(self, batch_documents)
            return
        for src in self.sources:
            yield from READERS[src.format](self, src, batch_bytes, batch_documents)

    def _raise_empty(self) -> None:
        if self.stats.skipped:
            raise DataError(f"the corpus has no usable documents: {self.stats.skipped:,} lines "
                            f"were skipped as not valid UTF-8 "
                            f"({', '.join(self.stats.skipped_lines)})",
                            "convert the files to UTF-8 (e.g. iconv -f latin1 -t utf-8)")
        if self.hub is not None:
            what = self.describe()
        else:
            names = [str(s.path) for s in self.sources[:3]]
            what = ", ".join(names) + (f" and {len(self.sources) - 3} more" if len(self.sources) > 3 else "")
        structured = self.hub is not None or any(s.format != "txt" for s in self.sources)
        hint = ("pass text with one document per line" if not structured else
                f"pass input whose {self.text_column!r} column holds text (see --text-column)")
        raise DataError(f"the corpus has no documents: {what} hold only empty or whitespace-only "
                        "text", hint)
