"""Progress display and console output shared by every command.

On a terminal a rich progress bar is shown; when stdout is not a terminal (Makefiles,
CI, log files) plain log lines are printed instead, at most every few seconds, so
logs stay readable.  ``MLMTOOL_QUIET=1`` (or ``--quiet``) silences both.
"""

from __future__ import annotations

import json
import os
import time

from rich.console import Console

from mlmtool.runtime import env
from mlmtool.runtime.tensorboard import TensorBoardWriter

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def quiet() -> bool:
    return env.flag(env.QUIET)


def set_quiet(value: bool) -> None:
    if value:
        os.environ[env.QUIET] = "1"


def say(*args, **kwargs) -> None:
    """Human-readable output (suppressed by --quiet)."""
    if not quiet():
        console.print(*args, **kwargs)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class StageProgress:
    """Progress of one long stage (reading a corpus, tokenizing, ...).

    ``total`` and ``advance`` are in ``unit`` ("bytes" shows MB and MB/s); extra
    counters passed as keyword arguments to :meth:`advance` (e.g. ``documents=1000``)
    are summed and shown beside the bar.
    """

    def __init__(self, description: str, total: float | None = None, unit: str = "bytes",
                 log_every: float = 10.0):
        self.description = description
        self.total = total
        self.unit = unit
        self.log_every = log_every
        self.done = 0.0
        self.counters: dict[str, int] = {}
        self._progress = None
        self._task = None
        self._start = 0.0
        self._last_log = 0.0

    def _fields(self) -> str:
        parts = [f"{v:,} {k}" for k, v in self.counters.items()]
        return ", ".join(parts)

    def __enter__(self) -> "StageProgress":
        self._start = self._last_log = time.perf_counter()
        if quiet():
            return self
        if console.is_terminal:
            from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            columns = [TextColumn("[bold]{task.description}"), BarColumn()]
            if self.unit == "bytes":
                columns += [DownloadColumn(), TransferSpeedColumn()]
            else:
                columns += [MofNCompleteColumn()]
            columns += [TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
            self._progress = Progress(*columns, console=console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, info="")
        return self

    def advance(self, n: float = 0, **counters: int) -> None:
        self.done += n
        for k, v in counters.items():
            self.counters[k] = self.counters.get(k, 0) + v
        if self._progress is not None:
            self._progress.update(self._task, advance=n, info=self._fields())
        elif not quiet():
            now = time.perf_counter()
            if now - self._last_log >= self.log_every:
                self._last_log = now
                self._log(now)

    def _log(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        if self.unit == "bytes":
            amount = human_bytes(self.done) + (f" / {human_bytes(self.total)}" if self.total else "")
            rate = f"{self.done / elapsed / 1e6:.1f} MB/s"
        else:
            amount = f"{self.done:,.0f}" + (f" / {self.total:,.0f}" if self.total else "") + f" {self.unit}"
            rate = f"{self.done / elapsed:,.1f} {self.unit}/s"
        extra = self._fields()
        console.print(f"{self.description}: {amount} ({rate}{', ' + extra if extra else ''})", soft_wrap=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._progress is not None:
            if exc_type is None and self.total is None:
                self._progress.update(self._task, total=self.done)
            self._progress.stop()
        elif not quiet() and exc_type is None:
            self._log(time.perf_counter())


def human_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class MetricsWriter:
    """Appends one JSON object per event to ``metrics.jsonl`` (process 0 only).

    With ``tensorboard_dir``, each record also goes into a TensorBoard event file there
    (:mod:`mlmtool.runtime.tensorboard`).
    """

    def __init__(self, path, enabled: bool = True, tensorboard_dir=None):
        self.path = path
        self.enabled = enabled
        self.tensorboard = None
        if enabled and tensorboard_dir is not None:
            self.tensorboard = TensorBoardWriter(tensorboard_dir)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)


class TrainProgress:
    """Training display: a live bar on a terminal, plain lines every logging step otherwise.

    The bar shows step/total, epoch, loss, learning rate, tokens/s and ETA; it advances
    every step without reading anything from the device (no synchronisation); the
    numbers change at logging steps, when the trainer fetches them anyway.
    """

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
        self.total = total_steps
        self.start = start_step
        self.enabled = enabled and not quiet()
        self._progress = None
        self._task = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> "TrainProgress":
        if self.enabled and console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(),
                TextColumn("step {task.completed:,.0f}/{task.total:,.0f}"),
                TextColumn("{task.fields[info]}"), TextColumn("eta"), TimeRemainingColumn(),
                console=console, transient=False, refresh_per_second=4)
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, completed=self.start,
                                                 info="compiling...")
        return self

    def started(self, step: int) -> None:
        """Training (re)starts timing at ``step``: after a resume, and once the first step has
        compiled, so that the ETA counts only steps this process ran at full speed."""
        self.start, self._t0 = step, time.perf_counter()
        if self._progress is not None:
            self._progress.reset(self._task, completed=step)  # drops rich's speed samples too

    def time_budget(self, seconds: float) -> None:
        """Training stops when ``seconds`` more have passed (``--max-time``): the ETA is at most that."""
        self._deadline = time.perf_counter() + seconds

    def eta(self, step: int) -> float:
        """Seconds left at ``step``, at the speed since :meth:`started` (or to the time budget)."""
        done = step - self.start
        left = (time.perf_counter() - self._t0) / max(done, 1) * (self.total - step)
        deadline = getattr(self, "_deadline", None)
        return left if deadline is None else max(0.0, min(left, deadline - time.perf_counter()))

    def step(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def log(self, record: dict) -> None:
        info = (f"epoch {record['epoch']:.2f} | loss {record['loss']:.4f} | acc {record['accuracy']:.3f} | "
                f"lr {record['learning_rate']:.2e} | {record['tokens_per_second']:,.0f} tok/s"
                + (f" | MFU {record['mfu']:.1%}" if "mfu" in record else "")
                + (f" | rtd acc {record['rtd_accuracy']:.3f}" if "rtd_accuracy" in record else ""))
        if self._progress is not None:
            self._progress.update(self._task, info=info)
        elif self.enabled:
            console.print(f"step {record['step']:,}/{self.total:,} | {info} | "
                          f"grad norm {record['grad_norm']:.3f} | eta {human_duration(self.eta(record['step']))}",
                          soft_wrap=True)

    def message(self, text: str) -> None:
        if self.enabled:
            console.print(text, soft_wrap=True)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
