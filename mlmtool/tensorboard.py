"""TensorBoard event files of ``mlmtool train`` and ``eval`` (``DIR/tensorboard/``), by process 0.

Every record ``train`` and ``eval`` append to ``metrics.jsonl`` also goes into an event
file as scalars (``eval``'s at the training step of the weights it scored), named as
Hugging Face's Trainer names them: ``train/loss``, ``train/accuracy``,
``train/learning_rate``, ``train/grad_norm``, ``train/tokens_per_second``, ``train/epoch``,
``train/tokens_seen`` and ``eval/loss``, ``eval/accuracy``, ``eval/perplexity``.

The events are encoded with tensorboardX's protobufs, but written synchronously (each
record appended and the file closed again, as ``metrics.jsonl`` is): tensorboardX's
``SummaryWriter`` queues events to a background thread that only a ``close()`` drains,
so a killed run would lose its last points.  One run of ``train`` writes one event file;
a resumed run adds a file to the same folder, which TensorBoard reads as one run.

``tensorboard --logdir DIR/tensorboard`` (or a folder above several model directories)
shows the curves.  ``MLMTOOL_TENSORBOARD=0`` turns the event files off.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Iterator

DIRNAME = "tensorboard"

TRAIN_TAGS = ("loss", "accuracy", "learning_rate", "grad_norm", "tokens_per_second", "mfu", "epoch", "tokens_seen",
              "mlm_probability")
EVAL_TAGS = {"eval_loss": "eval/loss", "eval_accuracy": "eval/accuracy", "perplexity": "eval/perplexity"}


def enabled_by_env() -> bool:
    return os.environ.get("MLMTOOL_TENSORBOARD", "1").lower() not in ("0", "false", "no", "off")


def scalars(record: dict) -> dict[str, float]:
    """The TensorBoard tags and values of one metrics.jsonl record (train or eval)."""
    out: dict[str, float] = {}
    if "eval_loss" in record:
        for key, tag in EVAL_TAGS.items():
            if isinstance(record.get(key), (int, float)):
                out[tag] = float(record[key])
    elif "loss" in record:
        for key in TRAIN_TAGS:
            if isinstance(record.get(key), (int, float)):
                out[f"train/{key}"] = float(record[key])
    return out


def _frame(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC32C of the length, data, masked CRC32C of the data."""
    from tensorboardX.record_writer import masked_crc32c

    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class TensorBoardWriter:
    """Appends scalar events for metrics records to one event file in ``log_dir``."""

    def __init__(self, log_dir: os.PathLike | str, enabled: bool = True):
        self.log_dir = Path(log_dir)
        self.enabled = enabled and enabled_by_env()
        self.path: Path | None = None
        if self.enabled:
            try:
                from tensorboardX.proto import event_pb2  # noqa: F401
            except ImportError:  # a declared dependency; without it, no event files
                self.enabled = False

    def _append(self, event) -> None:
        with open(self.path, "ab") as f:
            f.write(_frame(event.SerializeToString()))

    def _open(self) -> None:
        from tensorboardX.proto import event_pb2

        self.log_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self.path = self.log_dir / name
        self._append(event_pb2.Event(wall_time=now, file_version="brain.Event:2"))

    def write(self, record: dict) -> None:
        if not self.enabled or "step" not in record:
            return
        values = scalars(record)
        if not values:
            return
        from tensorboardX.proto import event_pb2
        from tensorboardX.proto.summary_pb2 import Summary

        try:
            if self.path is None:
                self._open()
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
            self._append(event_pb2.Event(wall_time=float(record.get("time", time.time())),
                                         step=int(record["step"]), summary=summary))
        except OSError:
            # TensorBoard output is a convenience: never stop a training run for it.
            self.enabled = False


def read_events(path: os.PathLike | str) -> Iterator:
    """The ``Event`` protobufs of one event file (CRCs checked); for tests and ``info``."""
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
