"""Resolving the command line's corpus inputs into checked :class:`Source` objects, and
their fingerprints.

Everything is checked here, before any document is read, so that a wrong path, an
unsupported suffix or a binary file fails in a second, not an hour into ``prepare``: files
by suffix (format, compression), directories walked recursively in sorted order (hidden
entries and files of other types skipped), globs expanded here too (so quoted globs work),
``save_to_disk`` dataset directories recognised by their marker files, and FIFOs or devices
refused (a corpus is read more than once).

A fingerprint is path + size + mtime per file: cheap, and what ``prepare`` and
``tokenizer`` record and compare for "up to date".
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mlmtool.data.corpus.remote import expand_url
from mlmtool.data.corpus.streams import sniff, zstd
from mlmtool.errors import DataError

TEXT_FORMATS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl",
                ".json": "json", ".csv": "csv"}
FORMATS = {**TEXT_FORMATS, ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".xz": "xz", ".zst": "zstd", ".bz2": "bz2"}
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
SUPPORTED_HELP = ".txt, .jsonl, .json, .csv, .parquet (text formats also as .gz/.xz/.zst/.bz2)"
#: datasets' packaged builders that read --data-files (no hub needed).
PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "webdataset", "xml")


@dataclass(frozen=True)
class Source:
    """One local input: a file, or a ``save_to_disk`` dataset directory."""

    path: Path
    format: str                 # txt | jsonl | json | csv | parquet | saved_dataset
    compression: str | None     # gzip | xz | zstd | bz2 | None
    size: int                   # bytes on disk (all files, for a dataset directory)
    mtime_ns: int               # latest modification time (ns)
    url: str | None = None      # an fsspec URL (s3://, gs://, hf://...): read through fsspec (corpus.remote)
    version: str | None = None  # the object's ETag / version of a URL, for the fingerprint
    start: int = 0              # a piece of the file: the lines that start in [start, end) (prepare's shards)
    end: int | None = None

    @property
    def name(self) -> str:
        """The source as the user named it: its URL, or its path."""
        return self.url or str(self.path)

    @property
    def splittable(self) -> bool:
        """Whether it can be cut by byte range at line boundaries (uncompressed .txt, .jsonl)."""
        return self.compression is None and self.format in ("txt", "jsonl")

    def piece(self, start: int, end: int) -> "Source":
        """The lines of this file that start in bytes [start, end)."""
        import dataclasses

        return dataclasses.replace(self, start=start, end=end)

    def fingerprint(self) -> dict:
        if self.url is not None:
            return {"url": self.url, "size": self.size, "version": self.version}
        return {"path": str(self.path.resolve()), "size": self.size, "mtime_ns": self.mtime_ns}


@dataclass(frozen=True)
class HubDataset:
    name: str
    config: str | None
    split: str
    streaming: bool
    revision: str | None
    data_files: tuple[str, ...] = ()


def _file_fingerprint(name: str) -> dict | str:
    """Path, size and mtime of a local file (a URL or a path in a hub repository as it is)."""
    if "://" in name or not os.path.isfile(name):
        return name
    st = os.stat(name)
    return {"path": str(Path(name).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint(sources: list[Source], hub: HubDataset | None, text_column: str, split: str) -> dict:
    """What identifies the input, cheaply (path + size + mtime; hub name/config/split).

    ``digest`` is a short hash of the rest, for comparisons.
    """
    if hub is not None:
        fp: dict[str, Any] = {"dataset": hub.name, "config": hub.config, "split": hub.split,
                              "text_column": text_column}
        if hub.revision:
            fp["revision"] = hub.revision
        if hub.data_files:
            fp["data_files"] = [_file_fingerprint(f) for f in hub.data_files]
    else:
        fp = {"files": [s.fingerprint() for s in sources], "text_column": text_column}
        if any(s.format == "saved_dataset" for s in sources):
            fp["split"] = split
    fp["digest"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return fp


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
        zstd()
    st = path.stat()
    src = Source(path, fmt, compression, st.st_size, st.st_mtime_ns)
    if fmt != "parquet":
        sniff(src)
    return src


def _checked(src: Source) -> Source:
    """A remote file's checks, as :func:`_file_source` makes them for a local one."""
    if src.compression == "zstd":
        zstd()
    if src.format != "parquet":
        sniff(src)
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
    if "://" in arg:
        return [_checked(Source(f.path, f.format, f.compression, f.size, 0, url=f.url, version=f.version))
                for f in expand_url(arg, _split_suffix, SUPPORTED_HELP)]
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


def resolve(files: Sequence[str]) -> list[Source]:
    """The sources of ``files`` (paths, directories, globs), in order; a file named twice
    is read once."""
    sources: list[Source] = []
    seen: set[Path] = set()
    for arg in files:
        for src in _expand(arg):
            key = src.url or src.path.resolve()
            if key not in seen:
                seen.add(key)
                sources.append(src)
    return sources


def expand_data_files(patterns: list[str]) -> tuple[str, ...]:
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
