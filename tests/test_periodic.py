"""The training loop's periodic actions (mlmtool.training.periodic), each alone: no model, no compile.
The loop that calls them is tested end to end in test_train.py (resume, --max-time),
test_reliability.py (signals, divergence) and test_stages.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from mlmtool.errors import TrainingError
from mlmtool.training.objectives import MaskedLM, ReplacedTokenDetection
from mlmtool.training.periodic import (MetricsLog, PeriodicEval, PeriodicSave, Report, StopRequest, Tick, TimeBudget,
                              check_window, every, format_eval, window_record)

PLAN = SimpleNamespace(tokens_per_step=256, steps_per_epoch=10, peak_flops=None, flops_per_token=0.0, devices=1)


def _metrics(loss_sum=6.0, denominator=3.0, accuracy_sum=1.5, lr=1e-3, grad_norm=0.5, finite=True, **extra) -> dict:
    return {"loss_sum": np.float32(loss_sum), "denominator": np.float32(denominator),
            "accuracy_sum": np.float32(accuracy_sum), "learning_rate": np.float32(lr),
            "grad_norm": np.float32(grad_norm), "finite": np.bool_(finite), **extra}


class Clock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Recorder:
    """A MetricsWriter and a TrainProgress that remember what they were given."""

    def __init__(self):
        self.records, self.calls = [], []

    def write(self, record):
        self.records.append(record)

    def __getattr__(self, name):  # progress.started/step/log/message/time_budget
        return lambda *a: self.calls.append((name, *a))


def _log(clock=None, report=None, logging_steps=2, save_steps=4, objective=MaskedLM(), plan=PLAN) -> MetricsLog:
    return MetricsLog(plan, objective, report or Report(Recorder()), logging_steps=logging_steps,
                      save_steps=save_steps, tokens_seen=lambda done: 1000 + done * plan.tokens_per_step,
                      max_grad_norm=1.0, mlm_probability=0.15, prepare_command="mlmtool prepare DIR --force",
                      clock=clock or Clock())


def test_every():
    assert [s for s in range(1, 13) if every(4, s)] == [4, 8, 12]
    assert not any(every(n, s) for n in (None, 0, -3) for s in range(1, 13))
    assert not every(4, 0)


@pytest.mark.parametrize("done, last, stop, due", [
    (2, False, False, True),    # a logging step
    (3, False, False, False),
    (4, False, False, True),    # a save (and logging) step
    (5, True, False, True),     # the last step
    (5, False, True, True),     # a stop: the checkpoint it writes is checked first
])
def test_metrics_log_is_due_at_logging_saves_last_and_stop(done, last, stop, due):
    log = _log(logging_steps=2, save_steps=4)
    assert log.due(Tick(done, last, stop)) is due
    assert _log(logging_steps=3, save_steps=4).due(Tick(4, False, False))  # saves log, whatever the logging steps


def test_metrics_log_window_record_and_throughput():
    clock, writer, progress = Clock(), Recorder(), Recorder()
    log = _log(clock, Report(writer, progress))
    log.add(_metrics(loss_sum=6.0, denominator=3.0, accuracy_sum=1.5))
    clock.t = 5.0
    assert log.first_step({}) == 5.0  # compilation: out of the throughput, its metrics kept
    log.add(_metrics(loss_sum=2.0, denominator=1.0, accuracy_sum=1.0, lr=2e-3, grad_norm=0.25))
    clock.t = 6.0
    with log.paused():  # an evaluation: not training time
        clock.t = 16.0
    clock.t = 17.0
    assert log(Tick(1, False, False), lambda: None) is None  # not due: the window grows
    record = log(Tick(2, False, False), lambda: None)
    assert record is log.last and writer.records == [record] and ("log", record) in progress.calls
    assert record["step"] == 2 and record["epoch"] == 0.2
    assert record["loss"] == pytest.approx(8.0 / 4.0) and record["accuracy"] == pytest.approx(2.5 / 4.0)
    assert record["masked_tokens"] == 4
    assert record["learning_rate"] == pytest.approx(2e-3) and record["grad_norm"] == 0.25  # the last step's
    assert record["tokens_per_second"] == pytest.approx(256 / 2.0)  # 1 step in 17 - 5 - 10 s
    assert record["tokens_seen"] == 1000 + 2 * 256 and "mfu" not in record
    assert log.window == [] and log(Tick(4, False, False), lambda: None) is None  # nothing left to log
    log.add(_metrics())
    clock.t = 21.0
    assert log(Tick(3, True, False), lambda: None)["tokens_per_second"] == pytest.approx(256 / 4.0)


def test_window_record_mfu_rate_and_objective_fields():
    plan = SimpleNamespace(**{**vars(PLAN), "peak_flops": 1e9, "flops_per_token": 1e6, "devices": 2})
    got = [_metrics(mlm_probability=np.float32(0.2), rtd_loss_sum=np.float32(3.0), rtd_accuracy_sum=np.float32(9.0),
                    replaced_sum=np.float32(1.0), rtd_denominator=np.float32(10.0))]
    r = window_record(got, 5, 2.0, 1, plan, ReplacedTokenDetection(50.0), tokens_seen=1280)
    assert r["mfu"] == pytest.approx(128 * 1e6 / (1e9 * 2))
    assert r["mlm_probability"] == pytest.approx(0.2)
    assert (r["rtd_loss"], r["rtd_accuracy"], r["replaced_fraction"]) == pytest.approx((0.3, 0.9, 0.1))
    assert window_record(got, 5, 2.0, 0, plan, MaskedLM(), 0)["tokens_per_second"] == 0.0  # only the compiled step


def _check(got, last_good=lambda: None, max_grad_norm=1.0):
    check_window(got, 6, last_good, max_grad_norm=max_grad_norm, mlm_probability=0.15,
                 prepare_command="mlmtool prepare DIR --force")


def test_check_window_names_the_diverged_step_and_the_cause():
    _check([_metrics(), _metrics()])  # finite: nothing said
    with pytest.raises(TrainingError) as e:
        _check([_metrics(), _metrics(loss_sum=math.nan), _metrics()], last_good=lambda: 4)
    assert "diverged at step 5: the loss became nan" in e.value.message
    assert "1.00e-03" in e.value.hint and "last good checkpoint (step 4) is kept" in e.value.hint
    assert "--max-grad-norm" not in e.value.hint  # clipping is on
    with pytest.raises(TrainingError) as e:
        _check([_metrics(finite=False)], max_grad_norm=0.0)
    assert "diverged at step 6: the weights became inf/nan" in e.value.message
    assert "no checkpoint was written" in e.value.hint and "--max-grad-norm 1.0" in e.value.hint


def test_check_window_refuses_a_window_that_predicted_nothing():
    with pytest.raises(TrainingError) as e:
        _check([_metrics(loss_sum=0.0, denominator=0.0)] * 2)
    assert "no token was chosen for prediction in steps 5..6" in e.value.message
    assert "--mlm-probability (0.15)" in e.value.hint and "mlmtool prepare DIR --force" in e.value.hint


def test_metrics_log_checks_before_it_reports():
    writer = Recorder()
    log = _log(report=Report(writer))
    log.add(_metrics(loss_sum=math.inf))
    with pytest.raises(TrainingError, match="diverged at step 2"):
        log(Tick(2, False, False), lambda: 0)
    assert writer.records == [] and log.last is None


def test_time_budget_clock_position_and_resume():
    clock = Clock(100.0)
    budget = TimeBudget(10.0, now=clock)
    budget.before = 4.0  # resumed: 4 s were spent before
    assert budget.on and not budget.spent and budget.left == 6.0
    budget.start()
    assert float(budget.position(20)[0]) == pytest.approx(4.0 / 10.0 * 20)
    clock.t = 103.0
    assert not budget.after_step(1) and budget.elapsed() == 7.0
    assert float(budget.position(20)[0]) == pytest.approx(0.7 * 20)
    clock.t = 106.0
    assert budget.after_step(2)  # 10 s: spent
    clock.t = 200.0
    assert float(budget.position(20)[0]) == 20.0  # never past the schedule's end
    budget.pause()
    assert budget.before == 104.0 and budget.spent and budget.elapsed() == 104.0  # the clock stopped
    off = TimeBudget(0.0, now=clock)
    assert not off.on and not off.spent and off.position(20) == () and not off.after_step(1)


def test_time_budget_agrees_every_check_steps_with_several_processes():
    clock, asked = Clock(0.0), []

    def agree(seconds):
        asked.append(seconds)
        return 99.0  # process 0's reading wins

    budget = TimeBudget(50.0, now=clock, multi=True, agree=agree, check_every=10)
    budget.start()
    clock.t = 60.0
    assert not budget.after_step(9) and asked == []  # between checks: the agreed reading stands
    assert budget.after_step(10) and asked == [60.0]


def test_stop_request_alone_and_across_processes():
    flags = iter([False, True])
    stop = StopRequest(lambda: next(flags), logging_steps=5)
    assert not stop(1, False) and stop(2, False)
    asked = []

    def any_process(flag):
        asked.append(flag)
        return True  # another process was signalled

    multi = StopRequest(lambda: False, logging_steps=5, multi=True, any_process=any_process, check_every=10)
    assert not multi(3, False) and asked == []  # no collective between checks
    assert multi(5, False) and multi(10, False) and asked == [False, False]  # at logging steps and check steps
    assert not multi(20, True) and len(asked) == 2  # the last step saves anyway: no collective


def test_periodic_save_at_multiples_last_and_stop():
    saved = []
    save = PeriodicSave(4, lambda done, state: saved.append((done, state)))
    for tick in (Tick(3, False, False), Tick(4, False, False), Tick(5, False, True), Tick(7, True, False),
                 Tick(6, False, False)):
        save(tick, "state")
    assert saved == [(4, "state"), (5, "state"), (7, "state")]


def test_periodic_eval_at_multiples_but_the_last_and_out_of_the_throughput():
    clock, writer, progress = Clock(), Recorder(), Recorder()
    report = Report(writer, progress)
    log = _log(clock, report)
    results = {"eval_loss": 2.0, "eval_accuracy": 0.5, "perplexity": math.exp(2.0), "eval_tokens": 1234,
               "eval_unigram_baseline_accuracy": 0.1}

    def evaluate(params):
        clock.t += 30.0
        return {**results, "params": params}

    ev = PeriodicEval(3, evaluate, report, log)
    assert ev(Tick(2, False, False), "p") is None and ev(Tick(6, True, False), "p") is None
    assert ev(Tick(3, False, False), "p") == {**results, "params": "p"}
    assert writer.records == [{"step": 3, **results, "params": "p"}]
    assert ("message", format_eval(3, {**results, "params": "p"})) in progress.calls
    assert log.t0 == 30.0  # the 30 s of evaluation do not count as training
    assert PeriodicEval(3, None, report, log)(Tick(3, False, False), "p") is None  # no validation blocks
    assert PeriodicEval(None, evaluate, report, log)(Tick(3, False, False), "p") is None  # at the end only


def test_format_eval_and_report_without_a_display():
    ev = {"eval_loss": 2.0, "eval_accuracy": 0.5, "perplexity": 7.389, "eval_tokens": 1234,
          "eval_unigram_baseline_accuracy": 0.1, "eval_rtd_accuracy": 0.9, "minimal_pairs_accuracy": 0.75}
    text = format_eval(1200, ev)
    assert text.startswith("eval @ step 1,200: loss 2.0000 | accuracy 0.5000 | perplexity 7.39 | 1,234 predicted")
    assert "replaced-token accuracy 0.9000" in text and "minimal pairs 0.7500" in text
    writer = Recorder()
    report = Report(writer)  # no progress: records still written, nothing displayed
    for call in (lambda: report.started(0), lambda: report.compiled(1.0, 1), lambda: report.step(1),
                 lambda: report.time_budget(5.0)):
        call()
    report.log({"step": 1})
    report.evaluation(1, {"eval_loss": 1.0})
    assert writer.records == [{"step": 1}, {"step": 1, "eval_loss": 1.0}]
