"""TensorBoard event files of ``mlmtool train`` and ``eval`` (``DIR/tensorboard/``), by process 0.

Every record ``train`` and ``eval`` append to ``metrics.jsonl`` also goes into an event
file as scalars (``eval``'s at the training step of the weights it scored), named as
Hugging Face's Trainer names them: ``train/loss``, ``train/accuracy``,
``train/learning_rate``, ``train/grad_norm``, ``train/tokens_per_second``, ``train/epoch``,
``train/tokens_seen`` and ``eval/loss``, ``eval/accuracy``, ``eval/perplexity`` (and, from
minimal pairs, ``eval/minimal_pairs_accuracy`` and ``minimal_pairs/<set>``).

The events are encoded with tensorboardX's protobufs and CRC, but framed here (a TFRecord:
length, masked CRC32C of the length, data, masked CRC32C of the data: :func:`_frame`) and
appended synchronously, each record with the file closed again, as ``metrics.jsonl`` is.
Why not tensorboardX's ``SummaryWriter`` with a ``flush()`` after each record: in
tensorboardX 2.6.5 ``flush()`` flushes the file but does not wait for the queue its
background thread drains (five ``add_scalar`` then ``flush()``: the events were missing
from the file in 20 runs out of 20), so a killed run would lose its last points; and its
file name has no PID, so two writers started in the same second in one folder (two
``eval`` runs) share a file, which the second truncates.  The framing is five lines, the writer
about fifty, and the tests read every file back with its CRCs checked (``tests/tb_events.py``).

One run of ``train`` writes one event file; a resumed run adds a file to the same folder,
which TensorBoard reads as one run.

``tensorboard --logdir DIR/tensorboard`` (or a folder above several model directories)
shows the curves.  ``MLMTOOL_TENSORBOARD=0`` turns the event files off.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from pathlib import Path

from mlmtool.runtime import env

TRAIN_TAGS = ("loss", "accuracy", "learning_rate", "grad_norm", "tokens_per_second", "mfu", "epoch", "tokens_seen",
              "mlm_probability")
EVAL_TAGS = {"eval_loss": "eval/loss", "eval_accuracy": "eval/accuracy", "perplexity": "eval/perplexity"}


def enabled_by_env() -> bool:
    return env.flag(env.TENSORBOARD)


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
    out.update(minimal_pairs_scalars(record))
    return out


def minimal_pairs_scalars(record: dict) -> dict[str, float]:
    """The tags of a record's minimal-pair results (``mlmtool.minimal_pairs``):
    ``eval/minimal_pairs_accuracy`` and ``minimal_pairs/<set>`` (none when it has none)."""
    out = {}
    if isinstance(record.get("minimal_pairs_accuracy"), (int, float)) and not math.isnan(
            record["minimal_pairs_accuracy"]):
        out["eval/minimal_pairs_accuracy"] = float(record["minimal_pairs_accuracy"])
        for name, s in (record.get("minimal_pairs") or {}).items():
            out[f"minimal_pairs/{name}"] = float(s["accuracy"])
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
