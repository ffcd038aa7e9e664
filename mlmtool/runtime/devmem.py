"""Device memory of a compiled training step: what it needs, what the device has, and the
largest batch that fits, from compile-only programs (nothing is allocated to find out).

Shared by ``mlmtool train --dry-run`` (mlmtool.training.dryrun) and ``scripts/bench_accel.py``, which
skips batch sizes whose program cannot fit instead of spending accelerator minutes compiling
and failing them.
"""

from __future__ import annotations

from typing import Callable

#: Plan for at most this share of the device's memory: XLA's allocator needs some room besides
#: the program's buffers (fragmentation, cuDNN/cuBLAS workspaces, the runtime itself).
HEADROOM = 0.92


def program_bytes(compiled) -> int | None:
    """Device bytes a compiled program needs while it runs (XLA's buffer assignment:
    arguments + outputs + temporaries - the donated arguments it writes its outputs into)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes)


def memory_limit(device=None) -> tuple[int | None, str]:
    """(bytes the program may use, where that figure is from): the accelerator's allocator
    limit, or on the CPU the host's available memory now (MemAvailable)."""
    import jax

    device = device or jax.devices()[0]
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "host memory available now"
    except OSError:
        pass
    return None, "unknown"


def peak_in_use(device=None) -> int | None:
    """The allocator's peak bytes in use on ``device`` (None on the CPU, which keeps no count)."""
    import jax

    device = device or jax.devices()[0]
    return (device.memory_stats() or {}).get("peak_bytes_in_use")


def fits(need: int | None, limit: int | None) -> bool | None:
    if need is None or limit is None:
        return None
    return need <= HEADROOM * limit


def linear_estimate(points: dict[int, int], batch: int) -> int | None:
    """Program bytes at ``batch`` from those measured at other batch sizes ({batch: bytes}):
    a line through the two largest (fixed state + per-row activations), or with one point a
    line through it and nothing at batch 0 (an overestimate for small batches: the state is
    counted per row too)."""
    if not points:
        return None
    (b2, m2), *rest = sorted(points.items(), reverse=True)
    if not rest:
        return int(m2 * batch / b2)
    b1, m1 = rest[0]
    per_row = max((m2 - m1) / (b2 - b1), 0.0)
    return int(m2 + per_row * (batch - b2))


def largest_batch(need_at: Callable[[int], int | None], start: int, limit: int, *, multiple: int = 8,
                  cap: int = 1 << 20, tries: int = 4) -> tuple[int | None, dict[int, int]]:
    """The largest batch whose program fits ``limit`` (with :data:`HEADROOM`), from compiled
    programs: ``need_at(b)`` compiles at batch ``b`` and returns its bytes (None: it failed to
    compile).  Two programs (``start`` and twice it) give the line; then its prediction is
    compiled and checked, lowered by 10% until one fits.  Returns (batch or None, the bytes
    measured at each batch tried)."""
    seen: dict[int, int] = {}

    def need(b: int) -> int | None:
        if b not in seen:
            got = need_at(b)
            if got is None:
                return None
            seen[b] = got
        return seen[b]

    budget = HEADROOM * limit
    if (need(start) or budget + 1) > budget:  # even the first does not fit: halve down
        b = start // 2
        while b >= 1 and (need(b) or budget + 1) > budget:
            b //= 2
        return (b if b >= 1 else None), seen
    if need(2 * start) is None:
        return start, seen
    per_row = (seen[2 * start] - seen[start]) / start
    if per_row <= 0:
        return None, seen
    fixed = seen[start] - per_row * start
    guess = min(int((budget - fixed) / per_row), cap)
    best = max(b for b, m in seen.items() if m <= budget)
    for _ in range(tries):
        if guess >= multiple:
            guess -= guess % multiple
        if guess <= best:
            break
        got = need(guess)
        if got is not None and got <= budget:
            return guess, seen
        guess = int(guess * 0.9)
    return best, seen
