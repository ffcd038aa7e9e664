"""Corpus input shared by ``mlmtool tokenizer`` and ``mlmtool prepare``.

:func:`open_corpus` turns the command line's ``FILE...`` (or ``--dataset NAME``) into a
:class:`Corpus`: a checked, ordered list of sources that streams its documents in
batches (:meth:`Corpus.batches`), never holding the whole corpus in memory, and that
has a cheap :meth:`Corpus.fingerprint` for "up to date" checks.

Inputs
  * ``.txt`` (also ``.text``): one document per line; the newline (and a ``\\r`` before
    it) is stripped, empty and whitespace-only lines are skipped.
  * ``.jsonl``/``.ndjson``/``.json``/``.csv``/``.parquet``: the text is in the column
    ``text_column`` (``--text-column``, default ``text``).  ``.json`` is JSON lines or
    one array of objects (the latter is read whole).
  * ``.gz``/``.xz``/``.zst``/``.bz2`` compressed variants of the text formats (``.zst``
    needs the optional ``zstandard`` package).
  * directories, walked recursively in sorted order, skipping hidden files and files of
    other types; glob patterns (expanded here too, so quoted globs work), sorted.
  * a dataset directory written by ``datasets``' ``save_to_disk`` (has
    ``dataset_info.json``/``state.json``/``dataset_dict.json``), or a hub dataset
    (``dataset=NAME``, ``dataset_config``, ``split``, ``streaming``, ``revision``) read
    with ``datasets.load_dataset``; ``dataset`` may also name one of datasets' packaged
    builders (``json``, ``csv``, ``parquet``, ``text``, ...) with ``data_files`` (local
    paths and globs, checked and expanded here, or URLs): the same code path as a hub
    dataset, streaming included, without a hub.

Order is deterministic: the arguments in the order given, each directory or glob in
sorted order; a file named twice is read once.  Lines that are not valid UTF-8 are
skipped and counted per file (:attr:`CorpusStats.skipped_lines`, :meth:`Corpus.warnings`).

This module imports neither JAX nor transformers (``prepare`` forks worker processes,
and forking after JAX has started threads can deadlock); ``datasets``, ``pyarrow`` and
``zstandard`` are imported only when an input needs them.
"""

from __future__ import annotations

import bz2
import csv
import glob as _glob
import gzip
import hashlib
import io
import json
import lzma
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

from mlmtool.errors import DataError

TEXT_FORMATS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl",
                ".json": "json", ".csv": "csv"}
FORMATS = {**TEXT_FORMATS, ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".xz": "xz", ".zst": "zstd", ".bz2": "bz2"}
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
SUPPORTED_HELP = ".txt, .jsonl, .json, .csv, .parquet (text formats also as .gz/.xz/.zst/.bz2)"

#: Bytes read per batch from a text file: big enough that per-batch overhead vanishes,
#: small enough that a batch is a sensible unit of work for a worker process.
DEFAULT_BATCH_BYTES = 1 << 20
#: Documents per batch for row-based inputs (parquet, datasets).
DEFAULT_BATCH_DOCUMENTS = 1000
_SNIFF_BYTES = 1024


@dataclass(frozen=True)
class Source:
    """One local input: a file, or a ``save_to_disk`` dataset directory."""

    path: Path
    format: str                 # txt | jsonl | json | csv | parquet | saved_dataset
    compression: str | None     # gzip | xz | zstd | bz2 | None
    size: int                   # bytes on disk (all files, for a dataset directory)
    mtime_ns: int               # latest modification time (ns)

    def fingerprint(self) -> dict:
        return {"path": str(self.path.resolve()), "size": self.size, "mtime_ns": self.mtime_ns}


@dataclass(frozen=True)
class HubDataset:
    name: str
    config: str | None
    split: str
    streaming: bool
    revision: str | None
    data_files: tuple[str, ...] = ()


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


# -- resolving the command line -----------------------------------------------------------

def _file_fingerprint(name: str) -> dict | str:
    """Path, size and mtime of a local file (a URL or a path in a hub repository as it is)."""
    if "://" in name or not os.path.isfile(name):
        return name
    st = os.stat(name)
    return {"path": str(Path(name).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _split_suffix(path: Path) -> tuple[str | None, str | None]:
    """(format, compression) from the file name; format None if unsupported."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = None
    if suffixes and suffixes[-1] in COMPRESSIONS:
        compression = COMPRESSIONS[suffixes.pop()]
        fmt = TEXT_FORMATS.get(suffixes[-1]) if suffixes else None
    else:
        fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    return fmt, compression


def _is_dataset_dir(path: Path) -> bool:
    return any((path / m).is_file() for m in DATASET_MARKERS)


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _dataset_source(path: Path) -> Source:
    size, mtime = 0, 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            size += st.st_size
            mtime = max(mtime, st.st_mtime_ns)
    return Source(path, "saved_dataset", None, size, mtime)


def _file_source(path: Path) -> Source:
    if not path.is_file():  # a FIFO, a device, a socket: read twice (sniffed, then read), it would hang
        import stat

        mode = path.stat().st_mode
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise DataError(f"{path} is {kind}: a corpus is read more than once",
                        "write the stream to a file first (e.g. 'cat ... > corpus.txt') and pass that file")
    fmt, compression = _split_suffix(path)
    if fmt is None:
        raise DataError(f"unsupported input file type: {path}",
                        f"pass {SUPPORTED_HELP} files, or a directory of them")
    if compression == "zstd":
        _zstd()
    st = path.stat()
    src = Source(path, fmt, compression, st.st_size, st.st_mtime_ns)
    if fmt != "parquet":
        _sniff(src)
    return src


def _walk(directory: Path) -> list[Source]:
    """Usable files under ``directory``, recursively, sorted, hidden ones skipped."""
    out: list[Source] = []
    for root, dirs, files in os.walk(directory):
        root_path = Path(root)
        keep = []
        for d in sorted(dirs):
            if d.startswith("."):
                continue
            sub = root_path / d
            if _is_dataset_dir(sub):
                out.append(_dataset_source(sub))
            else:
                keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = root_path / name
            if _split_suffix(p)[0] is not None and p.is_file():
                out.append(_file_source(p))
    # os.walk visits a directory's files before its subdirectories: sort the whole list
    # by path so the order is plainly "sorted by path".
    out.sort(key=lambda s: s.path.parts)
    return out


def _expand(arg: str) -> list[Source]:
    path = Path(arg)
    if path.exists():
        if path.is_dir():
            if _is_dataset_dir(path):
                return [_dataset_source(path)]
            found = _walk(path)
            if not found:
                raise DataError(f"directory {arg} has no usable files",
                                f"put {SUPPORTED_HELP} files in it (hidden files are skipped)")
            return found
        return [_file_source(path)]
    if _glob.has_magic(arg):
        matches = sorted(_glob.glob(arg, recursive=True))
        matches = [m for m in matches if not _is_hidden(Path(m))]
        if not matches:
            raise DataError(f"no files match {arg!r}", "check the pattern and the current directory")
        out: list[Source] = []
        for m in matches:
            out.extend(_expand(m))
        return out
    raise DataError(f"input {arg} does not exist", "check the path")


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
                         _expand_data_files(patterns) if dataset in PACKAGED_BUILDERS else tuple(patterns))
        return Corpus([], text_column=text_column, split=split, hub=hub)
    if not files:
        raise DataError("no corpus given",
                        "pass corpus files after DIR (e.g. 'data/*.txt') or --dataset NAME")
    sources: list[Source] = []
    seen: set[Path] = set()
    for arg in files:
        for src in _expand(arg):
            key = src.path.resolve()
            if key not in seen:
                seen.add(key)
                sources.append(src)
    return Corpus(sources, text_column=text_column, split=split)


#: datasets' packaged builders that read --data-files (no hub needed).
PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "webdataset", "xml")


def _expand_data_files(patterns: list[str]) -> tuple[str, ...]:
    """Local paths and globs -> existing files (sorted per pattern); URLs kept as given."""
    out: list[str] = []
    for pattern in patterns:
        if "://" in pattern:
            out.append(pattern)
            continue
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(str(p) for p in path.rglob("*") if p.is_file() and not _is_hidden(p))
        elif path.exists():
            matches = [pattern]
        else:
            matches = sorted(m for m in _glob.glob(pattern, recursive=True)
                             if Path(m).is_file() and not _is_hidden(Path(m)))
        if not matches:
            raise DataError(f"--data-files {pattern}: no such file", "check the path or pattern")
        out.extend(m for m in matches if m not in out)
    return tuple(out)


# -- opening files ------------------------------------------------------------------------

def _zstd():
    try:
        import zstandard
    except ImportError:
        raise DataError(".zst input needs the zstandard package",
                        "pip install zstandard, or decompress the file first") from None
    return zstandard


class _ZstdStream:
    """The frames of a .zst file, decompressed one after another.  A file that ends inside a
    frame is an error, as gzip, lzma and bz2 make it (zstandard's ``stream_reader`` reads it
    as a shorter file: a truncated download would go unnoticed)."""

    CHUNK = 1 << 16

    def __init__(self, raw):
        self.raw = raw
        self._decompressor = _zstd().ZstdDecompressor()
        self._frame = None  # the decompressobj of the frame being read
        self._buffer = bytearray()
        self._eof = False

    def read(self, n: int) -> bytes:
        while len(self._buffer) < n and not self._eof:
            chunk = self.raw.read(self.CHUNK)
            if not chunk:
                self._eof = True
                if self._frame is not None:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                break
            while chunk:
                if self._frame is None:
                    self._frame = self._decompressor.decompressobj()
                self._buffer += self._frame.decompress(chunk)
                if self._frame.eof:
                    chunk, self._frame = self._frame.unused_data, None
                else:
                    chunk = b""
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    def close(self) -> None:
        self._buffer.clear()


class _Opened:
    """A decompressing binary stream plus the raw file underneath (for on-disk progress)."""

    def __init__(self, src: Source):
        self.raw = open(src.path, "rb")
        c = src.compression
        try:
            if c is None:
                self.stream = self.raw
            elif c == "gzip":
                self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb")
            elif c == "xz":
                self.stream = lzma.LZMAFile(self.raw, mode="rb")
            elif c == "bz2":
                self.stream = bz2.BZ2File(self.raw, mode="rb")
            elif c == "zstd":
                self.stream = _ZstdStream(self.raw)
            else:  # pragma: no cover - guarded by _split_suffix
                raise AssertionError(c)
        except BaseException:
            self.raw.close()
            raise
        self.src = src
        self._pos = 0

    def read(self, n: int) -> bytes:
        if self.stream is self.raw:
            return self.raw.read(n)
        try:
            return self.stream.read(n)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise DataError(f"cannot decompress {self.src.path} ({e})",
                            "the file is damaged or not really " + str(self.src.compression)) from None
        except Exception as e:  # zstandard.ZstdError
            if type(e).__name__ == "ZstdError":
                raise DataError(f"cannot decompress {self.src.path} ({e})",
                                "the file is damaged or not really zstd") from None
            raise

    def advanced(self) -> int:
        """On-disk bytes consumed since the last call."""
        pos = self.raw.tell() if not self.raw.closed else self.src.size
        delta, self._pos = pos - self._pos, pos
        return delta

    def close(self) -> None:
        if self.stream is not self.raw:
            self.stream.close()
        self.raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _sniff(src: Source) -> None:
    """Refuse binary files (NUL bytes in the first KB) by name, before any work starts."""
    with _Opened(src) as f:
        head = f.read(_SNIFF_BYTES)
    if b"\x00" in head:
        raise DataError(f"{src.path} looks binary (NUL bytes in its first KB), not "
                        f"{'UTF-8 text' if src.format == 'txt' else src.format}",
                        "pass UTF-8 text files (UTF-16 is not supported), or name the "
                        "right file")


def _lines(f: _Opened, batch_bytes: int, head: bytes = b"") -> Iterator[bytes]:
    """Blocks of whole lines (each ending at a newline, or at EOF), about batch_bytes each.

    ``head``: bytes already read from ``f``, to go first.
    """
    parts: list[bytes] = [head] if head else []
    while True:
        block = f.read(batch_bytes)
        if not block:
            break
        cut = block.rfind(b"\n")
        if cut < 0:
            parts.append(block)
            continue
        if parts:
            parts.append(block[:cut + 1])
            yield b"".join(parts)
            parts = []
        else:
            yield block[:cut + 1]
        if cut + 1 < len(block):
            parts.append(block[cut + 1:])
    if parts:
        yield b"".join(parts)


# -- the corpus ---------------------------------------------------------------------------

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
        from mlmtool.progress import human_bytes

        return f"{n} input{'s' if n != 1 else ''}, {human_bytes(self.total or 0)}"

    def fingerprint(self) -> dict:
        """What identifies the input, cheaply (path + size + mtime; hub name/config/split).

        ``digest`` is a short hash of the rest, for comparisons.
        """
        if self.hub is not None:
            fp: dict[str, Any] = {"dataset": self.hub.name, "config": self.hub.config,
                                  "split": self.hub.split, "text_column": self.text_column}
            if self.hub.revision:
                fp["revision"] = self.hub.revision
            if self.hub.data_files:
                fp["data_files"] = [_file_fingerprint(f) for f in self.hub.data_files]
        else:
            fp = {"files": [s.fingerprint() for s in self.sources], "text_column": self.text_column}
            if any(s.format == "saved_dataset" for s in self.sources):
                fp["split"] = self.split
        fp["digest"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
        return fp

    def warnings(self) -> list[str]:
        """Human-readable notes about the last pass (lines skipped as not UTF-8)."""
        if not self.stats.skipped_lines:
            return []
        where = ", ".join(f"{p} ({n:,})" for p, n in self.stats.skipped_lines.items())
        n = self.stats.skipped
        return [f"skipped {n:,} line{'s that are' if n != 1 else ' that is'} not valid UTF-8: {where}"]

    # -- reading -----------------------------------------------------------------------
    def batches(self, batch_bytes: int = DEFAULT_BATCH_BYTES,
                batch_documents: int = DEFAULT_BATCH_DOCUMENTS) -> Iterator[Batch]:
        """Stream the documents in order, in batches; :attr:`stats` counts as it goes.

        Raises :class:`DataError` at the end if the corpus held no document at all.
        """
        self.stats = CorpusStats()
        for batch in self._all_batches(batch_bytes, batch_documents):
            self.stats.documents += len(batch.documents)
            yield batch
        if self.stats.documents == 0:
            self._raise_empty()

    def _all_batches(self, batch_bytes: int, batch_documents: int) -> Iterator[Batch]:
        if self.hub is not None:
            yield from self._hub_batches(batch_documents)
            return
        for src in self.sources:
            if src.format == "txt":
                yield from self._txt_batches(src, batch_bytes)
            elif src.format in ("jsonl", "json"):
                yield from self._json_batches(src, batch_bytes)
            elif src.format == "csv":
                yield from self._csv_batches(src, batch_documents)
            elif src.format == "parquet":
                yield from self._parquet_batches(src, batch_documents)
            else:
                yield from self._saved_dataset_batches(src, batch_documents)

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

    def _skip(self, src: Source, n: int) -> None:
        key = str(src.path)
        self.stats.skipped_lines[key] = self.stats.skipped_lines.get(key, 0) + n

    def _decode(self, src: Source, data: bytes) -> list[str]:
        """Lines of ``data`` (whole lines) as documents: decoded, newline-stripped, non-blank."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            lines = []
            bad = 0
            for raw in data.split(b"\n"):
                try:
                    lines.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    bad += 1
            self._skip(src, bad)
        else:
            lines = text.split("\n")
        if b"\r" in data:
            lines = [s[:-1] if s.endswith("\r") else s for s in lines]
        return [s for s in lines if s and not s.isspace()]

    def _txt_batches(self, src: Source, batch_bytes: int) -> Iterator[Batch]:
        with _Opened(src) as f:
            first = True
            for data in _lines(f, batch_bytes):
                self.stats.bytes += len(data)
                if first:
                    first = False
                    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
                        data = data[3:]
                docs = self._decode(src, data)
                yield Batch(docs, f.advanced())

    def _missing_column(self, src: Source | str, columns) -> DataError:
        cols = ", ".join(repr(str(c)) for c in columns) or "none"
        where = src.path if isinstance(src, Source) else src
        return DataError(f"{where} has no column {self.text_column!r} (its columns: {cols})",
                         "name the text column with --text-column")

    def _text_value(self, src: Source, value, where: str) -> str | None:
        if value is None or isinstance(value, str):
            return value
        raise DataError(f"{where}: column {self.text_column!r} holds {type(value).__name__}, not text",
                        "name the text column with --text-column")

    def _records_to_docs(self, src: Source, records, where) -> list[str]:
        col = self.text_column
        docs = []
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise DataError(f"{where(i)} is not a JSON object", "write one JSON object per record")
            value = rec.get(col)
            if value is None and col not in rec:
                raise self._missing_column(src, rec.keys())
            value = self._text_value(src, value, where(i))
            if value and not value.isspace():
                docs.append(value)
        return docs

    def _json_batches(self, src: Source, batch_bytes: int) -> Iterator[Batch]:
        with _Opened(src) as f:
            head = b""
            if src.format == "json":
                # A JSON array is read whole; anything else is taken as JSON lines.
                chunk = f.read(_SNIFF_BYTES)
                stripped = chunk.lstrip(b"\xef\xbb\xbf \t\r\n")
                if stripped.startswith(b"["):
                    rest = [chunk]
                    while block := f.read(batch_bytes):
                        rest.append(block)
                    data = b"".join(rest)
                    self.stats.bytes += len(data)
                    try:
                        records = json.loads(data.decode("utf-8-sig"))
                    except (UnicodeDecodeError, ValueError) as e:
                        raise DataError(f"{src.path} is not valid JSON ({e})",
                                        "write a JSON array of objects, or JSON lines") from None
                    docs = self._records_to_docs(src, records, lambda i: f"{src.path} item {i + 1}")
                    for start in range(0, len(docs), DEFAULT_BATCH_DOCUMENTS):
                        yield Batch(docs[start:start + DEFAULT_BATCH_DOCUMENTS],
                                    f.advanced() if start == 0 else 0)
                    if not docs:
                        yield Batch([], f.advanced())
                    return
                head = chunk
            line_no = 0
            first = True
            for data in _lines(f, batch_bytes, head):
                self.stats.bytes += len(data)
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
                    self._skip(src, bad)
                docs = self._records_to_docs(src, [r for _, r in records],
                                             lambda i: f"{src.path} line {records[i][0]}")
                yield Batch(docs, f.advanced())

    def _csv_batches(self, src: Source, batch_documents: int) -> Iterator[Batch]:
        csv.field_size_limit(2**31 - 1)
        with _Opened(src) as f:
            text = io.TextIOWrapper(f.stream, encoding="utf-8-sig", errors="surrogateescape",
                                    newline="")
            reader = csv.DictReader(text)
            fields = reader.fieldnames or []
            if self.text_column not in fields:
                raise self._missing_column(src, fields)
            col = self.text_column
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
                    self.stats.bytes += len(value)
                    if len(docs) >= batch_documents:
                        yield Batch(docs, f.advanced())
                        docs = []
            except csv.Error as e:
                raise DataError(f"{src.path} line {reader.line_num} is not valid CSV ({e})",
                                "check the quoting") from None
            if bad:
                self._skip(src, bad)
            yield Batch(docs, f.advanced())

    def _rows_progress(self, src: Source, done: int, total: int, reported: int) -> tuple[int, int]:
        target = src.size if total == 0 or done >= total else src.size * done // total
        return target - reported, target

    def _parquet_batches(self, src: Source, batch_documents: int) -> Iterator[Batch]:
        try:
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - pyarrow comes with datasets
            raise DataError("parquet input needs pyarrow", "pip install pyarrow") from None
        try:
            pf = pq.ParquetFile(src.path)
        except Exception as e:
            raise DataError(f"cannot read {src.path} as parquet ({e})", "check the file") from None
        names = pf.schema_arrow.names
        if self.text_column not in names:
            raise self._missing_column(src, names)
        total = pf.metadata.num_rows
        done = reported = 0
        for rb in pf.iter_batches(batch_size=batch_documents, columns=[self.text_column]):
            values = rb.column(0).to_pylist()
            done += len(values)
            docs = self._filter_values(src, values)
            adv, reported = self._rows_progress(src, done, total, reported)
            yield Batch(docs, adv)
        if reported < src.size:
            yield Batch([], src.size - reported)

    def _filter_values(self, src, values: list) -> list[str]:
        docs = []
        for v in values:
            if v is None:
                continue
            if not isinstance(v, str):
                self._text_value(src, v, str(getattr(src, "path", src)))
            if v and not v.isspace():
                docs.append(v)
                self.stats.bytes += len(v)
        return docs

    def _saved_dataset_batches(self, src: Source, batch_documents: int) -> Iterator[Batch]:
        import datasets

        try:
            ds = datasets.load_from_disk(str(src.path))
        except Exception as e:
            raise DataError(f"cannot load the dataset in {src.path} ({e.__class__.__name__}: {e})",
                            "pass a directory written by datasets' save_to_disk") from None
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise DataError(f"dataset {src.path} has no split {self.split!r} "
                                f"(its splits: {', '.join(ds)})", "choose one with --split")
            ds = ds[self.split]
        if self.text_column not in ds.column_names:
            raise self._missing_column(src, ds.column_names)
        total = len(ds)
        done = reported = 0
        for batch in ds.select_columns([self.text_column]).iter(batch_size=batch_documents):
            values = batch[self.text_column]
            done += len(values)
            docs = self._filter_values(src, values)
            adv, reported = self._rows_progress(src, done, total, reported)
            yield Batch(docs, adv)
        if reported < src.size:
            yield Batch([], src.size - reported)

    def _hub_batches(self, batch_documents: int) -> Iterator[Batch]:
        import datasets

        hub = self.hub
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
        if columns is not None and self.text_column not in columns:
            raise self._missing_column(f"dataset {hub.name}", columns)
        where = f"dataset {hub.name}"
        for batch in ds.iter(batch_size=batch_documents):
            if self.text_column not in batch:
                raise self._missing_column(where, batch.keys())
            values = batch[self.text_column]
            docs = self._filter_values(where, values)
            yield Batch(docs, len(values))
