"""One reader per input format, registered in :data:`READERS` by :attr:`Source.format`.

A reader turns one source into :class:`Batch` es of documents, counting into the corpus's
:attr:`~mlmtool.data.corpus.Corpus.stats` as it goes, and reports progress in on-disk bytes
(compressed bytes for compressed files; an estimate from the row count for parquet and
saved datasets), so that a corpus's batches add up to its known total.

* ``txt``: one document per line; the newline (and a ``\\r`` before it) is stripped,
  empty and whitespace-only lines are skipped, lines that are not valid UTF-8 are skipped
  and counted.  This is the hot path: per ~1 MB block it does one ``decode`` and one
  ``split``, and no per-line Python work beyond the blank-line filter.
* ``jsonl``/``json``/``csv``/``parquet``/``saved_dataset``: the text is in the column
  ``text_column``; ``.json`` is JSON lines or one array of objects (read whole).
* :func:`read_hub`: a dataset through ``datasets.load_dataset`` (progress in documents).

``pyarrow`` and ``datasets`` are imported only by the readers that need them.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

from mlmtool.data.corpus.remote import open_url
from mlmtool.data.corpus.sources import Source
from mlmtool.data.corpus.streams import SNIFF_BYTES, Opened, lines
from mlmtool.errors import DataError

if TYPE_CHECKING:
    from mlmtool.data.corpus import Corpus

#: Bytes read per batch from a text file: big enough that per-batch overhead vanishes,
#: small enough that a batch is a sensible unit of work for a worker process.
DEFAULT_BATCH_BYTES = 1 << 20
#: Documents per batch for row-based inputs (parquet, datasets).
DEFAULT_BATCH_DOCUMENTS = 1000


@dataclass
class CorpusStats:
    """Counts of the last (or running) pass over the corpus."""

    documents: int = 0
    bytes: int = 0              # input bytes read, uncompressed (text bytes for row inputs)
    skipped_lines: dict[str, int] = field(default_factory=dict)   # not valid UTF-8, per file

    @property
    def skipped(self) -> int:
        return sum(self.skipped_lines.values())


class Batch(NamedTuple):
    documents: list[str]
    progress: int               # advance in Corpus.unit (on-disk bytes, or documents)


#: (corpus, source, batch_bytes, batch_documents) -> the source's batches
Reader = Callable[["Corpus", Source, int, int], Iterator[Batch]]


# -- shared helpers -------------------------------------------------------------------------

def _skip(corpus: Corpus, src: Source, n: int) -> None:
    key = str(src.path)
    corpus.stats.skipped_lines[key] = corpus.stats.skipped_lines.get(key, 0) + n


def _missing_column(corpus: Corpus, src: Source | str, columns) -> DataError:
    cols = ", ".join(repr(str(c)) for c in columns) or "none"
    where = src.path if isinstance(src, Source) else src
    return DataError(f"{where} has no column {corpus.text_column!r} (its columns: {cols})",
                     "name the text column with --text-column")


def _text_value(corpus: Corpus, value, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DataError(f"{where}: column {corpus.text_column!r} holds {type(value).__name__}, not text",
                    "name the text column with --text-column")


def _records_to_docs(corpus: Corpus, src: Source, records, where) -> list[str]:
    col = corpus.text_column
    docs = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{where(i)} is not a JSON object", "write one JSON object per record")
        value = rec.get(col)
        if value is None and col not in rec:
            raise _missing_column(corpus, src, rec.keys())
        value = _text_value(corpus, value, where(i))
        if value and not value.isspace():
            docs.append(value)
    return docs


def _filter_values(corpus: Corpus, src, values: list) -> list[str]:
    docs = []
    for v in values:
        if v is None:
            continue
        if not isinstance(v, str):
            _text_value(corpus, v, str(getattr(src, "path", src)))
        if v and not v.isspace():
            docs.append(v)
            corpus.stats.bytes += len(v)
    return docs


def _rows_progress(src: Source, done: int, total: int, reported: int) -> tuple[int, int]:
    target = src.size if total == 0 or done >= total else src.size * done // total
    return target - reported, target


# -- text -----------------------------------------------------------------------------------

def _decode(corpus: Corpus, src: Source, data: bytes) -> list[str]:
    """Lines of ``data`` (whole lines) as documents: decoded, newline-stripped, non-blank."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        decoded = []
        bad = 0
        for raw in data.split(b"\n"):
            try:
                decoded.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                bad += 1
        _skip(corpus, src, bad)
    else:
        decoded = text.split("\n")
    if b"\r" in data:
        decoded = [s[:-1] if s.endswith("\r") else s for s in decoded]
    return [s for s in decoded if s and not s.isspace()]


def read_txt(corpus: Corpus, src: Source, batch_bytes: int, batch_documents: int) -> Iterator[Batch]:
    with Opened(src) as f:
        first = True
        for data in lines(f, batch_bytes):
            corpus.stats.bytes += len(data)
            if first:
                first = False
                if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
                    data = data[3:]
            docs = _decode(corpus, src, data)
            yield Batch(docs, f.advanced())


def read_json(corpus: Corpus, src: Source, batch_bytes: int, batch_documents: int) -> Iterator[Batch]:
    with Opened(src) as f:
        head = b""
        if src.format == "json":
            # A JSON array is read whole; anything else is taken as JSON lines.
            chunk = f.read(SNIFF_BYTES)
            stripped = chunk.lstrip(b"\xef\xbb\xbf \t\r\n")
            if stripped.startswith(b"["):
                yield from _json_array(corpus, src, f, chunk, batch_bytes)
                return
            head = chunk
        line_no = 0
        first = True
        for data in lines(f, batch_bytes, head):
            corpus.stats.bytes += len(data)
            if first:
                first = False
                if data.startswith(b"\xef\xbb\xbf"):
                    data = data[3:]
            records = []
            bad = 0
            for raw in data.split(b"\n"):
                line_no += 1
                if not raw.strip():
                    continue
                try:
                    records.append((line_no, json.loads(raw)))
                except UnicodeDecodeError:
                    bad += 1
                except ValueError as e:
                    raise DataError(f"{src.path} line {line_no} is not valid JSON ({e})",
                                    "write one JSON object per line") from None
            line_no -= 1  # the split's last piece is what follows the final newline
            if bad:
                _skip(corpus, src, bad)
            docs = _records_to_docs(corpus, src, [r for _, r in records],
                                    lambda i: f"{src.path} line {records[i][0]}")
            yield Batch(docs, f.advanced())


def _json_array(corpus: Corpus, src: Source, f: Opened, chunk: bytes, batch_bytes: int) -> Iterator[Batch]:
    rest = [chunk]
    while block := f.read(batch_bytes):
        rest.append(block)
    data = b"".join(rest)
    corpus.stats.bytes += len(data)
    try:
        records = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{src.path} is not valid JSON ({e})",
                        "write a JSON array of objects, or JSON lines") from None
    docs = _records_to_docs(corpus, src, records, lambda i: f"{src.path} item {i + 1}")
    for start in range(0, len(docs), DEFAULT_BATCH_DOCUMENTS):
        yield Batch(docs[start:start + DEFAULT_BATCH_DOCUMENTS], f.advanced() if start == 0 else 0)
    if not docs:
        yield Batch([], f.advanced())


def read_csv(corpus: Corpus, src: Source, batch_bytes: int, batch_documents: int) -> Iterator[Batch]:
    csv.field_size_limit(2**31 - 1)
    with Opened(src) as f:
        text = io.TextIOWrapper(f.stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.DictReader(text)
        fields = reader.fieldnames or []
        if corpus.text_column not in fields:
            raise _missing_column(corpus, src, fields)
        col = corpus.text_column
        docs: list[str] = []
        bad = 0
        try:
            for row in reader:
                value = row.get(col)
                if not value or value.isspace():
                    continue
                if not value.isascii():
                    try:
                        value.encode("utf-8")
                    except UnicodeEncodeError:
                        bad += 1
                        continue
                docs.append(value)
                corpus.stats.bytes += len(value)
                if len(docs) >= batch_documents:
                    yield Batch(docs, f.advanced())
                    docs = []
        except csv.Error as e:
            raise DataError(f"{src.path} line {reader.line_num} is not valid CSV ({e})",
                            "check the quoting") from None
        if bad:
            _skip(corpus, src, bad)
        yield Batch(docs, f.advanced())


# -- row formats (pyarrow, datasets) --------------------------------------------------------

def read_parquet(corpus: Corpus, src: Source, batch_bytes: int, batch_documents: int) -> Iterator[Batch]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        raise DataError("parquet input needs pyarrow", "pip install pyarrow") from None
    try:
        if src.url is not None:
            pf = pq.ParquetFile(open_url(src.url))
        else:
            pf = pq.ParquetFile(src.path)
    except Exception as e:
        raise DataError(f"cannot read {src.path} as parquet ({e})", "check the file") from None
    names = pf.schema_arrow.names
    if corpus.text_column not in names:
        raise _missing_column(corpus, src, names)
    yield from _row_batches(corpus, src, (rb.column(0).to_pylist() for rb in pf.iter_batches(
        batch_size=batch_documents, columns=[corpus.text_column])), pf.metadata.num_rows)


def _row_batches(corpus: Corpus, src: Source, value_batches, total: int) -> Iterator[Batch]:
    """Batches of the documents in ``value_batches`` (lists of a column's values, ``total``
    rows in all), progress advanced by the share of rows read."""
    done = reported = 0
    for values in value_batches:
        done += len(values)
        docs = _filter_values(corpus, src, values)
        adv, reported = _rows_progress(src, done, total, reported)
        yield Batch(docs, adv)
    if reported < src.size:
        yield Batch([], src.size - reported)


def read_saved_dataset(corpus: Corpus, src: Source, batch_bytes: int, batch_documents: int) -> Iterator[Batch]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(src.path))
    except Exception as e:
        raise DataError(f"cannot load the dataset in {src.path} ({e.__class__.__name__}: {e})",
                        "pass a directory written by datasets' save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if corpus.split not in ds:
            raise DataError(f"dataset {src.path} has no split {corpus.split!r} "
                            f"(its splits: {', '.join(ds)})", "choose one with --split")
        ds = ds[corpus.split]
    if corpus.text_column not in ds.column_names:
        raise _missing_column(corpus, src, ds.column_names)
    yield from _row_batches(corpus, src, (batch[corpus.text_column] for batch in ds.select_columns(
        [corpus.text_column]).iter(batch_size=batch_documents)), len(ds))


def read_hub(corpus: Corpus, batch_documents: int) -> Iterator[Batch]:
    """The corpus's hub dataset (or packaged builder with data files), through datasets."""
    import datasets

    hub = corpus.hub
    kwargs: dict[str, Any] = {"split": hub.split, "streaming": hub.streaming}
    if hub.revision:
        kwargs["revision"] = hub.revision
    if hub.data_files:
        kwargs["data_files"] = list(hub.data_files)
    try:
        ds = datasets.load_dataset(hub.name, hub.config, **kwargs)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise DataError(f"cannot load dataset {hub.name!r}"
                        f"{' (' + hub.config + ')' if hub.config else ''}: {msg}",
                        "check the name, --dataset-config and --split, and the network") from None
    columns = getattr(ds, "column_names", None)
    if columns is not None and corpus.text_column not in columns:
        raise _missing_column(corpus, f"dataset {hub.name}", columns)
    where = f"dataset {hub.name}"
    for batch in ds.iter(batch_size=batch_documents):
        if corpus.text_column not in batch:
            raise _missing_column(corpus, where, batch.keys())
        values = batch[corpus.text_column]
        docs = _filter_values(corpus, where, values)
        yield Batch(docs, len(values))


#: Source.format -> its reader.
READERS: dict[str, Reader] = {
    "txt": read_txt,
    "jsonl": read_json,
    "json": read_json,
    "csv": read_csv,
    "parquet": read_parquet,
    "saved_dataset": read_saved_dataset,
}
