"""Corpus inputs on object storage: any fsspec URL (``s3://``, ``gs://``, ``hf://``, ...).

A URL names a file, a "directory" (a prefix: every usable file under it, sorted) or a glob;
each becomes a :class:`RemoteFile` (its URL, format, size, and ETag or modification time for
the fingerprint), which :mod:`~mlmtool.data.corpus.sources` turns into a ``Source`` with ``url``
set.  Files are streamed through fsspec's buffered reader (:func:`open_url`), never copied
whole to local disk.  ``s3fs`` / ``gcsfs`` come with ``pip install 'mlmtool[cloud]'``;
``hf://`` with ``huggingface_hub``.  S3 endpoints other than AWS' (MinIO, moto, R2) come
from ``AWS_ENDPOINT_URL`` as boto reads it.  Imports no corpus module (sources imports it)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

from mlmtool.errors import DataError

#: fsspec's read-ahead per open file: big reads, few requests, bounded memory.
BLOCK_SIZE = 8 << 20


def _filesystem(url: str):
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with datasets
        raise DataError(f"{url}: reading URLs needs fsspec", "pip install 'mlmtool[cloud]'") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise DataError(f"{url}: no file system for this URL ({e})",
                        "pip install 'mlmtool[cloud]' (s3fs, gcsfs), or huggingface_hub for hf://") from None
    except ValueError as e:
        raise DataError(f"{url}: {e}", "check the URL") from None


def _protocol(url: str) -> str:
    return url.split("://", 1)[0]


def _version(info: dict) -> str | None:
    for key in ("ETag", "etag", "md5Hash", "crc32c", "LastModified", "mtime", "last_modified", "updated"):
        if info.get(key) is not None:
            return str(info[key])
    return None


class RemoteFile(NamedTuple):
    path: Path              # the path inside the file system (the URL without its protocol)
    format: str
    compression: str | None
    size: int
    url: str
    version: str | None     # ETag, else the modification time


def expand_url(url: str, split_suffix: Callable, supported: str) -> list[RemoteFile]:
    """The files a URL names (a file, a prefix or a glob), in sorted order; ``split_suffix``
    tells a path's (format, compression), ``supported`` names the usable kinds for errors."""
    fs, path = _filesystem(url)
    proto = _protocol(url)
    try:
        if any(c in path for c in "*?["):
            paths = sorted(fs.glob(path))
            if not paths:
                raise DataError(f"no files match {url!r}", "check the pattern")
        elif fs.isdir(path):
            paths = sorted(p for p in fs.find(path) if split_suffix(Path(p))[0] is not None)
            if not paths:
                raise DataError(f"{url} has no usable files", f"put {supported} files under it")
        elif fs.exists(path):
            paths = [path]
        else:
            raise DataError(f"input {url} does not exist", "check the URL (and the credentials)")
    except DataError:
        raise
    except Exception as e:  # network, permissions
        raise DataError(f"cannot list {url} ({e.__class__.__name__}: {e})",
                        "check the URL, the credentials and AWS_ENDPOINT_URL (for S3-compatible servers)") from None
    out = []
    for p in paths:
        name = Path(p).name
        if name.startswith("."):
            continue
        fmt, compression = split_suffix(Path(p))
        full = p if "://" in p else f"{proto}://{p}"
        if fmt is None:
            raise DataError(f"unsupported input file type: {full}", f"pass {supported} files")
        info = fs.info(p)
        out.append(RemoteFile(Path(p), fmt, compression, int(info.get("size") or 0), full, _version(info)))
    return out


def open_url(url: str):
    """A buffered binary file object reading ``url`` (seekable, streamed)."""
    fs, path = _filesystem(url)
    try:
        return fs.open(path, "rb", block_size=BLOCK_SIZE)
    except Exception as e:
        raise DataError(f"cannot open {url} ({e.__class__.__name__}: {e})",
                        "check the URL and the credentials") from None
