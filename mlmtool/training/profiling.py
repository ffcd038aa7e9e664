"""Where a training step's device time goes: a ``jax.profiler`` trace summarised by kind of
kernel (matmuls, cuDNN attention, XLA fusions, copies) with the device's idle share.

One summary for both users of it: ``mlmtool train --profile-steps N`` (:class:`StepProfiler`:
skip the first step, which compiles, trace the next N into ``DIR/profile/``, as MaxText's
``skip_first_n_steps_for_profiler``/``profiler_steps`` and lm1b's ``periodic_actions.Profile``
do) and ``scripts/bench_accel.py --profile`` (:func:`trace_steps`).  The trace itself opens in
TensorBoard's profile plugin or XProf (``xprof DIR/profile``).

On a GPU or TPU the kernels are the events of the device planes' streams.  On the CPU there
is no device plane: the summary counts the XLA operations the host threads ran (their names
are the HLO instructions': ``fusion.12``, ``dot.3``, ``copy.4``, ...), summed over threads, so
its "busy" share can exceed 100% on several cores.
"""

from __future__ import annotations

import collections
import glob
import os
import time
from pathlib import Path
from typing import Callable

KERNEL_KINDS = (  # (kind, substrings of a kernel's or an XLA operation's name), first match wins
    ("matmuls with their fused operations (XLA:CPU's YNNPACK)", ("ynn_fusion",)),
    ("attention (cuDNN)", ("cudnn", "fmha", "flash", "sdpa")),
    ("matmuls (cuBLAS, CUTLASS; dot on the CPU)",
     ("gemm", "xmma", "cutlass", "cublas", "matmul", "sm90_", "sm80_", "dot")),
    ("copies and memset", ("memcpy", "memset", "copy", "transpose")),
    ("XLA fusions (elementwise, norms, softmax, dropout, optimizer)", ("fusion", "loop_", "input_", "reduce")),
)
#: XLA:CPU operation names (HLO instruction names) that the host trace records.
_CPU_OPS = ("fusion", "ynn_fusion", "dot", "copy", "transpose", "reduce", "sort", "while", "convolution",
            "custom-call", "scatter", "gather", "dynamic-slice", "dynamic-update-slice", "broadcast", "select")


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def latest_trace(trace_dir: str | os.PathLike) -> str:
    found = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"jax.profiler wrote no .xplane.pb under {trace_dir}")
    return found[-1]


def summarize(xplane: str, n_steps: int, step_s: float) -> dict:
    """Per-step time by kind of kernel from the trace file ``xplane`` of ``n_steps`` steps of
    ``step_s`` seconds each (wall): ``by_kind_ms``, ``top_kernels_ms``, ``device_busy_ms``."""
    import jax

    planes = list(jax.profiler.ProfileData.from_file(xplane).planes)
    device = [p for p in planes if "/device:" in p.name][:1]  # the first accelerator
    by_kind, by_name = collections.Counter(), collections.Counter()
    if device:
        source = "device"
        events = [ev for ln in device[0].lines if "stream" in ln.name.lower()  # kernels run on streams
                  for ev in ln.events]
    else:  # XLA:CPU: the operations the host threads ran
        source = "host"
        events = [ev for p in planes if p.name.startswith("/host") for ln in p.lines for ev in ln.events
                  if ev.name.split(".")[0] in _CPU_OPS]
    for ev in events:
        by_kind[kind_of(ev.name)] += ev.duration_ns / 1e6 / n_steps
        by_name[ev.name[:80]] += ev.duration_ns / 1e6 / n_steps
    lines = sorted({f"{p.name}: {ln.name}" for p in (device or planes[:1]) for ln in p.lines})
    return {"trace": xplane, "source": source, "lines": lines, "steps": n_steps, "step_ms": 1e3 * step_s,
            "device_busy_ms": sum(by_kind.values()), "by_kind_ms": dict(by_kind.most_common()),
            "top_kernels_ms": dict(by_name.most_common(12))}


def trace_steps(trace_dir: str | os.PathLike, one_step: Callable[[], None], n: int = 3,
                step_s: float | None = None) -> dict:
    """Trace ``n`` calls of ``one_step`` (each waits for its result) and summarise them;
    ``step_s``: the step's time measured untraced (default: the traced steps' own)."""
    import jax

    with jax.profiler.trace(str(trace_dir)):
        t0 = time.perf_counter()
        for _ in range(n):
            one_step()
        traced = (time.perf_counter() - t0) / n
    return summarize(latest_trace(trace_dir), n, traced if step_s is None else step_s)


def format_summary(p: dict, title: str) -> list[str]:
    """The summary as printed lines (bench_accel's report and ``train --profile-steps``)."""
    busy, step = p["device_busy_ms"], max(p["step_ms"], 1e-9)
    what = "device busy" if p["source"] == "device" else "XLA op time on the host threads"
    out = [f"{title} ({p['trace']}): step {step:.1f} ms, {what} {busy:.1f} ms ({100 * busy / step:.0f}%)"]
    out += [f"  {ms:8.2f} ms  {100 * ms / max(busy, 1e-9):5.1f}%  {kind}" for kind, ms in p["by_kind_ms"].items()]
    out.append("  top kernels:")
    out += [f"  {ms:8.2f} ms  {name}" for name, ms in p["top_kernels_ms"].items()]
    return out


class StepProfiler:
    """``train --profile-steps N``: called after every step of the loop with its metrics;
    starts a trace once ``skip`` steps have run (the first compiles), stops it ``steps``
    steps later and prints the summary."""

    def __init__(self, trace_dir: Path, steps: int, say: Callable[[str], None], skip: int = 1):
        self.trace_dir, self.steps, self.skip, self.say = Path(trace_dir), steps, skip, say
        self.seen, self.t0, self.summary = 0, None, None

    def __call__(self, metrics) -> None:
        import jax

        self.seen += 1
        if self.seen == self.skip and self.steps > 0:
            jax.block_until_ready(metrics)
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.trace_dir))
            self.t0 = time.perf_counter()
        elif self.t0 is not None and self.seen == self.skip + self.steps:
            self.finish(metrics)

    def finish(self, metrics=None) -> None:
        """Stop the trace (also when the run ends before its N steps) and print the summary."""
        import jax

        if self.t0 is None:
            return
        jax.block_until_ready(metrics)
        n = max(self.seen - self.skip, 1)
        step_s = (time.perf_counter() - self.t0) / n
        jax.profiler.stop_trace()
        self.t0 = None
        self.summary = summarize(latest_trace(self.trace_dir), n, step_s)
        for line in format_summary(self.summary, f"profile of {n} step{'s' if n > 1 else ''}"):
            self.say(line)
