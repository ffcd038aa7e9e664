"""Helpers shared by the ``scripts/bench_*.py`` benchmarks: machine description, timing, peak.

Benchmarks here are scripts, not tests: each prints a short human table and, last, ONE
JSON line (``print_json``) that CI or a notebook can parse.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any, Callable


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cores() -> int:
    """CPUs this process may run on (affinity), which is what the thread pools use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """CPU model, cores, the SIMD level and library versions, for the report header."""
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": cores(), "python": platform.python_version()}
    flags = cpu_flags()
    info["simd"] = ("avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other") + (
        "+bf16" if "avx512_bf16" in flags else "")
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    try:
        import jax

        info["jax_backend"] = jax.default_backend()
        info["jax_devices"] = len(jax.devices())
    except ImportError:
        pass
    info["loadavg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return info


def format_machine(info: dict[str, Any]) -> str:
    libs = ", ".join(f"{k} {info[k]}" for k in ("jax", "flax", "optax", "torch", "transformers") if info.get(k))
    return (f"machine: {info['cpu']}, {info['cores']} cores ({info['simd']}), python {info['python']}\n"
            f"libs:    {libs}\n"
            f"load:    {info['loadavg_1m']:.2f} (1-min load average at the start)")


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children (the torch worker)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class OtherLoad:
    """How many cores OTHER processes kept busy while the benchmark ran (from /proc/stat
    minus this process and its children).  Near 0 on an idle machine; timings taken while it
    is high are pessimistic, so benchmarks report it."""

    def __enter__(self) -> "OtherLoad":
        self.t0, self.busy0, self.own0 = time.perf_counter(), _machine_busy_seconds(), _own_cpu_seconds()
        self.cores: float | None = None
        return self

    def __exit__(self, *exc) -> None:
        busy = _machine_busy_seconds()
        if busy is None or self.busy0 is None:
            return
        wall = max(time.perf_counter() - self.t0, 1e-9)
        self.cores = max(0.0, (busy - self.busy0) - (_own_cpu_seconds() - self.own0)) / wall


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    ``fn`` must itself wait for its result (``jax.block_until_ready``) so each timing is
    one fully synchronised call.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def matmul_peak(n: int = 2048, repeats: int = 7, dtype: str = "float32") -> dict[str, float]:
    """This machine's dense-matmul rate through XLA: ``jnp.dot`` of two n x n matrices.

    Returns FLOP/s (2 n^3 per product) for the median and the best run.  This is the
    practical ceiling that model-FLOPs utilisation is measured against here (the
    vendor's theoretical peak is not reachable from XLA's Eigen/oneDNN GEMMs anyway).
    """
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dt)
    dot = jax.jit(jnp.dot)
    times = time_calls(lambda: dot(a, b).block_until_ready(), repeats=repeats, warmup=2)
    flops = 2.0 * n ** 3
    return {"n": n, "flops_median": flops / median(times), "flops_best": flops / min(times)}


def print_json(record: dict[str, Any]) -> None:
    """The one machine-readable line every benchmark ends with."""
    print(json.dumps(record, sort_keys=True, default=float), flush=True)


def si(x: float, unit: str = "") -> str:
    """1.23e11 -> '123 G' (three significant digits)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"
