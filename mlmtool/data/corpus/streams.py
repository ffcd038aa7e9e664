"""Opening a corpus file: a decompressing byte stream, binary sniffing, and whole-line blocks.

Decompressors are looked up by name in :data:`DECOMPRESSORS` (the names
:data:`mlmtool.data.corpus.sources.COMPRESSIONS` gives file suffixes).  Errors of a damaged
compressed file become one :class:`DataError` line naming the file.  ``zstandard`` is
imported only when a ``.zst`` file is read.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from typing import TYPE_CHECKING, Callable, Iterator

from mlmtool.data.corpus.remote import open_url
from mlmtool.errors import DataError

if TYPE_CHECKING:
    from mlmtool.data.corpus.sources import Source

#: Bytes read to recognise a binary file (and to tell a JSON array from JSON lines).
SNIFF_BYTES = 1024


def zstd():
    """The ``zstandard`` module, or a DataError saying how to get it."""
    try:
        import zstandard
    except ImportError:
        raise DataError(".zst input needs the zstandard package",
                        "pip install zstandard, or decompress the file first") from None
    return zstandard


class ZstdStream:
    """The frames of a .zst file, decompressed one after another.  A file that ends inside a
    frame is an error, as gzip, lzma and bz2 make it (zstandard's ``stream_reader`` reads it
    as a shorter file: a truncated download would go unnoticed)."""

    CHUNK = 1 << 16

    def __init__(self, raw):
        self.raw = raw
        self._decompressor = zstd().ZstdDecompressor()
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


#: compression name -> a function wrapping the raw file in a decompressing reader.
DECOMPRESSORS: dict[str, Callable] = {
    "gzip": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    "xz": lambda raw: lzma.LZMAFile(raw, mode="rb"),
    "bz2": lambda raw: bz2.BZ2File(raw, mode="rb"),
    "zstd": ZstdStream,
}


class Opened:
    """A decompressing binary stream plus the raw file underneath (for on-disk progress)."""

    def __init__(self, src: Source):
        if src.url is not None:
            self.raw = open_url(src.url)
        else:
            self.raw = open(src.path, "rb")
        try:
            self.stream = self.raw if src.compression is None else DECOMPRESSORS[src.compression](self.raw)
            self._end = None
            if src.start or src.end is not None:  # a piece: the lines that start in [start, end)
                self._seek_line(src.start)
                self._end = src.size if src.end is None else src.end
        except BaseException:
            self.raw.close()
            raise
        self.src = src
        self._pos = src.start
        self._last = b"\n"

    def _seek_line(self, start: int) -> None:
        """Go to the first line that starts at or after ``start``."""
        if start <= 0:
            return
        self.raw.seek(start - 1)
        if self.raw.read(1) != b"\n":
            self.raw.readline()  # the rest of a line that started before ``start``: the piece before owns it

    def _read_piece(self, n: int) -> bytes:
        pos = self.raw.tell()
        if pos < self._end:
            data = self.raw.read(min(n, self._end - pos))
            if data:
                self._last = data[-1:]
            return data
        if self._last == b"\n":
            return b""
        self._last = b"\n"
        return self.raw.readline()  # the end of the last line that starts in the piece

    def read(self, n: int) -> bytes:
        if self._end is not None:
            return self._read_piece(n)
        if self.stream is self.raw:
            return self.raw.read(n)
        try:
            return self.stream.read(n)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise DataError(f"cannot decompress {self.src.name} ({e})",
                            "the file is damaged or not really " + str(self.src.compression)) from None
        except Exception as e:  # zstandard.ZstdError
            if type(e).__name__ == "ZstdError":
                raise DataError(f"cannot decompress {self.src.name} ({e})",
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


def sniff(src: Source) -> None:
    """Refuse binary files (NUL bytes in the first KB) by name, before any work starts."""
    with Opened(src) as f:
        head = f.read(SNIFF_BYTES)
    if b"\x00" in head:
        raise DataError(f"{src.name} looks binary (NUL bytes in its first KB), not "
                        f"{'UTF-8 text' if src.format == 'txt' else src.format}",
                        "pass UTF-8 text files (UTF-16 is not supported), or name the "
                        "right file")


def lines(f: Opened, batch_bytes: int, head: bytes = b"") -> Iterator[bytes]:
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
