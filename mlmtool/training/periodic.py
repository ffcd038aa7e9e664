"""The training loop's periodic actions, as google/flax ``examples/lm1b``'s
``periodic_actions``: after every step the loop (``Trainer.run``) hands each action a ``Tick``
(the steps done, whether it is the run's last, whether a stop was requested) and the action
decides whether it is due.  Each holds its own state and is tested without compiling a step
(tests/test_periodic.py):

* ``TimeBudget``: ``--max-time``'s clock, the schedule's position and when the budget is spent;
* ``StopRequest``: a signal to any process stops every process at the same step;
* ``MetricsLog``: the window of step metrics, fetched, checked (divergence) and logged;
* ``PeriodicEval``: ``--eval-steps``; ``PeriodicSave``: ``--save-steps``;
* ``Report``: where records go (metrics.jsonl, TensorBoard, the display).

``--profile-steps`` is the loop's ``on_step`` hook (``mlmtool.training.profiling.StepProfiler``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp

from mlmtool.errors import TrainingError

STOP_CHECK_EVERY = 10  # multi-process: steps between agreeing on a stop request (a host sync)


def every(n: int | None, step: int) -> bool:
    """``step`` is a positive multiple of ``n`` (never, for n None or 0)."""
    return bool(n) and n > 0 and step > 0 and step % n == 0


@dataclasses.dataclass(frozen=True)
class Tick:
    """Where the loop stands after a step."""

    done: int    # steps taken (the checkpoint's step)
    last: bool   # the run's final step: the plan's last, or the time budget spent
    stop: bool   # a stop was requested (agreed by every process): save, then leave


class TimeBudget:
    """``--max-time``: seconds trained (the run's resumed parts included), the learning-rate
    schedule's position (the elapsed share of the budget times its steps), and when it is
    spent.  ``now`` is the clock (tests give a fake one).  With several processes, every
    ``check_every`` steps they take process 0's reading (``agree``, a collective): the rate
    and the stop must be the same everywhere."""

    def __init__(self, seconds: float, *, now: Callable[[], float] = time.perf_counter, multi: bool = False,
                 agree: Callable[[float], float] | None = None, check_every: int = STOP_CHECK_EVERY):
        self.seconds, self.now, self.multi, self.check_every = seconds, now, multi, check_every
        self._agree = agree
        self.before = 0.0    # seconds trained before this run (a resume sets it from the checkpoint)
        self.agreed = 0.0    # the elapsed seconds every process uses
        self._start: float | None = None

    @property
    def on(self) -> bool:
        return self.seconds > 0

    @property
    def spent(self) -> bool:
        """The budget was spent before this run started."""
        return self.on and self.before >= self.seconds

    @property
    def left(self) -> float:
        return self.seconds - self.before

    def elapsed(self) -> float:
        return self.before + (0.0 if self._start is None else self.now() - self._start)

    def start(self) -> None:
        self._start, self.agreed = self.now(), self.before

    def pause(self) -> None:
        """The loop ended: the clock stops (a later ``run`` continues from here)."""
        self.before, self._start = self.elapsed(), None

    def position(self, total_steps: int) -> tuple:
        """The step's extra argument: () without a budget, else the schedule's position."""
        if not self.on:
            return ()
        return (jnp.float32(min(self.agreed / self.seconds, 1.0) * total_steps),)

    def after_step(self, done: int) -> bool:
        """Read the clock after step ``done``; True once the budget is spent."""
        if not self.on:
            return False
        if not self.multi:
            self.agreed = self.elapsed()
        elif done % self.check_every == 0:
            self.agreed = self._agree(self.elapsed())
        return self.agreed >= self.seconds


class StopRequest:
    """A stop requested (``requested()``: a signal) on any process stops them all at the same
    step: alone, at the step it arrives; with several processes at the next multiple of
    ``check_every`` or of the logging steps (``any_process``, a collective), never at the
    run's last step (which saves anyway)."""

    def __init__(self, requested: Callable[[], bool], *, logging_steps: int, multi: bool = False,
                 any_process: Callable[[bool], bool] | None = None, check_every: int = STOP_CHECK_EVERY):
        self.requested, self.logging_steps, self.multi = requested, logging_steps, multi
        self.any_process, self.check_every = any_process, check_every

    def __call__(self, done: int, last: bool) -> bool:
        stop = self.requested()
        if self.multi:
            stop = not last and (done % self.check_every == 0 or done % self.logging_steps == 0) \
                and self.any_process(stop)
        return stop


class Report:
    """Where the loop's records go: ``writer`` (metrics.jsonl and TensorBoard,
    ``progress.MetricsWriter``) and ``progress`` (the display, ``progress.TrainProgress``; None:
    none)."""

    def __init__(self, writer, progress=None):
        self.writer, self.progress = writer, progress

    def started(self, step: int) -> None:
        if self.progress is not None:
            self.progress.started(step)

    def time_budget(self, seconds: float) -> None:
        if self.progress is not None:
            self.progress.time_budget(seconds)

    def compiled(self, seconds: float, done: int) -> None:
        if self.progress is not None:
            self.progress.message(f"compiled and ran the first step in {seconds:.1f} s")
            self.progress.started(done)

    def step(self, done: int) -> None:
        if self.progress is not None:
            self.progress.step(done)

    def log(self, record: dict) -> None:
        self.writer.write(record)
        if self.progress is not None:
            self.progress.log(record)

    def evaluation(self, step: int, results: dict) -> None:
        self.writer.write({"step": step, **results})
        if self.progress is not None:
            self.progress.message(format_eval(step, results))


def format_eval(step: int, ev: dict) -> str:
    return (f"eval @ step {step:,}: loss {ev['eval_loss']:.4f} | accuracy {ev['eval_accuracy']:.4f} | "
            f"perplexity {ev['perplexity']:.2f} | {ev['eval_tokens']:,} predicted tokens "
            f"(unigram baseline accuracy {ev['eval_unigram_baseline_accuracy']:.4f})"
            + (f" | replaced-token accuracy {ev['eval_rtd_accuracy']:.4f}" if "eval_rtd_accuracy" in ev else "")
            + (f" | minimal pairs {ev['minimal_pairs_accuracy']:.4f}" if "minimal_pairs_accuracy" in ev else ""))


class MetricsLog:
    """The training log.  ``add`` keeps each step's metrics (device arrays: nothing is
    fetched); at a logging step, a save, the last step or a stop, ``__call__`` fetches the
    window, checks it (``check_window``: before any checkpoint of those steps is written),
    reports its record (``window_record``) and starts a new window.  The throughput leaves
    out the first step (``first_step``: compilation) and evaluations (``paused``)."""

    def __init__(self, plan, objective, report: Report, *, logging_steps: int, save_steps: int,
                 tokens_seen: Callable[[int], int], max_grad_norm: float, mlm_probability: float,
                 prepare_command: str, clock: Callable[[], float] = time.perf_counter):
        self.plan, self.objective, self.report = plan, objective, report
        self.logging_steps, self.save_steps, self.tokens_seen = logging_steps, save_steps, tokens_seen
        self.hints = dict(max_grad_norm=max_grad_norm, mlm_probability=mlm_probability,
                          prepare_command=prepare_command)
        self.clock = clock
        self.window: list[dict] = []
        self.steps = 0  # the window's steps that count for throughput
        self.t0 = clock()
        self.last: dict | None = None  # the last record

    def add(self, metrics: dict) -> None:
        self.window.append(metrics)
        self.steps += 1

    def first_step(self, metrics: dict) -> float:
        """Wait for the run's first step; its seconds (compilation) leave the throughput."""
        jax.block_until_ready(metrics)
        seconds = self.clock() - self.t0
        self.t0, self.steps = self.clock(), 0
        return seconds

    @contextlib.contextmanager
    def paused(self):
        """What runs inside (an evaluation) does not count as training time."""
        t = self.clock()
        try:
            yield
        finally:
            self.t0 += self.clock() - t

    def due(self, tick: Tick) -> bool:
        return every(self.logging_steps, tick.done) or every(self.save_steps, tick.done) or tick.last or tick.stop

    def __call__(self, tick: Tick, last_good: Callable[[], int | None]) -> dict | None:
        """The window's record when due (None otherwise); ``last_good()``: the newest
        checkpoint's step, named when the window diverged."""
        if not self.window or not self.due(tick):
            return None
        got = jax.device_get(self.window)
        check_window(got, tick.done, last_good, **self.hints)
        record = window_record(got, tick.done, self.clock() - self.t0, self.steps, self.plan, self.objective,
                               self.tokens_seen(tick.done))
        self.window, self.steps, self.t0 = [], 0, self.clock()
        self.report.log(record)
        self.last = record
        return record


def _loss(m: dict) -> float:
    return float(m["loss_sum"]) / max(float(m["denominator"]), 1.0)


def check_window(got: list[dict], done: int, last_good: Callable[[], int | None], *, max_grad_norm: float,
                 mlm_probability: float, prepare_command: str) -> None:
    """TrainingError when the window of steps ending at ``done`` predicted nothing (a loss of 0
    over nothing is not a perfect model) or diverged (inf/nan loss or weights: the step and
    the likely cause)."""
    first = done - len(got) + 1
    if sum(float(m["denominator"]) for m in got) == 0:
        raise TrainingError(
            f"no token was chosen for prediction in steps {first}..{done}: the loss would read 0",
            f"the blocks hold only special tokens, or --mlm-probability ({mlm_probability}) is too "
            f"small: prepare with a larger --max-seq-length ('{prepare_command}')")
    for i, m in enumerate(got):
        loss = _loss(m)
        if not (math.isfinite(loss) and bool(m.get("finite", True))):
            good = last_good()
            keep = (f"the last good checkpoint (step {good}) is kept and training resumes from it"
                    if good is not None else "no checkpoint was written; training starts over")
            what = f"the loss became {loss}" if not math.isfinite(loss) else "the weights became inf/nan"
            clip = ", clip gradients with --max-grad-norm 1.0" if not max_grad_norm > 0 else ""
            raise TrainingError(
                f"training diverged at step {first + i}: {what}",
                f"the learning rate ({float(m['learning_rate']):.2e} at that step) is probably too high: lower "
                f"--learning-rate, raise --warmup-steps{clip}; {keep}")


def window_record(got: list[dict], done: int, seconds: float, steps: int, plan, objective, tokens_seen: int) -> dict:
    """The log line of a window of fetched step metrics ending at step ``done``: token-weighted
    loss and accuracy, the last step's rate and gradient norm, throughput over ``steps`` steps
    in ``seconds`` (and the MFU when the device's peak is known)."""
    denom = sum(float(m["denominator"]) for m in got)
    tokens_per_second = steps * plan.tokens_per_step / max(seconds, 1e-9) if steps else 0.0
    mfu = {}
    if plan.peak_flops:  # model-FLOPs utilisation of the devices (mlmtool.training.flops)
        mfu["mfu"] = tokens_per_second * plan.flops_per_token / (plan.peak_flops * plan.devices)
    return {
        "step": done,
        "epoch": done / plan.steps_per_epoch,
        "loss": sum(float(m["loss_sum"]) for m in got) / max(denom, 1.0),
        "accuracy": sum(float(m["accuracy_sum"]) for m in got) / max(denom, 1.0),
        "learning_rate": float(got[-1]["learning_rate"]),
        "grad_norm": float(got[-1]["grad_norm"]),
        "tokens_per_second": tokens_per_second,
        **mfu,
        "masked_tokens": int(denom),
        **({"mlm_probability": float(got[-1]["mlm_probability"])} if "mlm_probability" in got[-1] else {}),
        **objective.record(got),
        "tokens_seen": tokens_seen,
        "time": time.time(),
    }


class PeriodicEval:
    """``--eval-steps``: evaluate at each multiple but the last step (the final evaluation
    follows it); its time leaves the throughput.  ``evaluate`` None: no validation blocks."""

    def __init__(self, every_steps: int | None, evaluate: Callable[[object], dict] | None, report: Report,
                 log: MetricsLog):
        self.every_steps, self.evaluate, self.report, self.log = every_steps, evaluate, report, log

    def __call__(self, tick: Tick, params) -> dict | None:
        if self.evaluate is None or tick.last or not every(self.every_steps, tick.done):
            return None
        with self.log.paused():
            results = self.evaluate(params)
            self.report.evaluation(tick.done, results)
        return results


class PeriodicSave:
    """``--save-steps``: a checkpoint at each multiple, at the last step and at a stop."""

    def __init__(self, every_steps: int, save: Callable[[int, object], None]):
        self.every_steps, self.save = every_steps, save

    def __call__(self, tick: Tick, state) -> bool:
        if every(self.every_steps, tick.done) or tick.last or tick.stop:
            self.save(tick.done, state)
            return True
        return False
