"""Reading back the TensorBoard event files mlmtool writes (mlmtool.runtime.tensorboard), for the tests:
TFRecord framing and masked CRC32C checked record by record, events decoded with tensorboardX's
protobufs."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterator


def read_events(path: os.PathLike | str) -> Iterator:
    """The ``Event`` protobufs of one event file, every CRC checked (ValueError if one is wrong)."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    data = Path(path).read_bytes()
    pos = 0
    while pos < len(data):
        header = data[pos:pos + 8]
        if len(header) < 8:
            raise ValueError(f"{path}: truncated record header at byte {pos}")
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if header_crc != masked_crc32c(header):
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        body = data[pos + 12:pos + 12 + length]
        (body_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        if len(body) < length or body_crc != masked_crc32c(body):
            raise ValueError(f"{path}: bad data CRC at byte {pos}")
        yield event_pb2.Event.FromString(body)
        pos += 16 + length


def read_scalars(log_dir: os.PathLike | str) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from every event file in ``log_dir``, in file order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for event in read_events(path):
            if event.HasField("summary"):
                for value in event.summary.value:
                    out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return out
