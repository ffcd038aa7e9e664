"""Helpers for the benchmarks that time whole commands in subprocesses (prepare, tokenizer, CLI).

The machine these run on is usually shared, so every measurement records CPU time as well
as wall time: ``os.wait4`` gives the child's user + system time, its own and that of every
descendant it waited for (worker pools are joined, so they count), and the largest resident
set of any one of those processes.  A sampling thread (psutil) adds the peak of the summed
RSS of the whole process tree (it counts pages that forked workers share with their parent
once per process, so it is an upper bound).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import cores, cpu_model, median, print_json  # noqa: E402,F401  (re-exported)


DEFAULT_CORPUS = "/work/shared/corpora/en_linux_kernel_docs.txt.xz"


def add_corpus_argument(p) -> None:
    """The ``--corpus`` option of the benchmarks that read a text corpus."""
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="text file, one document per line "
                   "(.xz/.gz/.bz2 are decompressed first) (default: the Linux kernel docs corpus)")


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def versions(*names: str) -> dict[str, str | None]:
    """Installed versions without importing the packages (importing transformers costs seconds)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info(*packages: str) -> dict[str, Any]:
    return {"cpu": cpu_model(), "cores": cores(), "python": platform.python_version(),
            "loadavg_before": loadavg(), "versions": versions("mlmtool", *packages),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def format_machine(info: dict[str, Any]) -> str:
    libs = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    la = " / ".join(f"{x:.2f}" for x in info["loadavg_before"])
    return (f"machine: {info['cpu']}, {info['cores']} cores, python {info['python']}, {info['date']}\n"
            f"libs:    {libs}\n"
            f"load:    {la} (1/5/15-min load average before the run; other work skews wall times, "
            "CPU times much less)")


def mlmtool_exe() -> str:
    """The installed console script of this interpreter's environment."""
    here = Path(sys.executable).parent / "mlmtool"
    if here.exists():
        return str(here)
    found = shutil.which("mlmtool")
    if not found:
        raise SystemExit("the mlmtool console script is not installed (pip install -e .)")
    return found


@dataclass
class Measured:
    cmd: list[str]
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_mb: float        # largest single process (the child or a descendant it waited for)
    tree_peak_rss_mb: float  # sampled peak of the summed RSS of the process tree
    tree_cpu_s: float        # sampled CPU seconds of every process seen in the tree (cross-check)
    returncode: int
    stdout: str = field(repr=False, default="")
    stderr: str = field(repr=False, default="")

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def summary(self) -> dict[str, float]:
        return {"wall_s": round(self.wall_s, 3), "cpu_s": round(self.cpu_s, 3),
                "user_s": round(self.user_s, 3), "sys_s": round(self.sys_s, 3),
                "maxrss_mb": round(self.maxrss_mb, 1), "tree_peak_rss_mb": round(self.tree_peak_rss_mb, 1),
                "tree_cpu_s_sampled": round(self.tree_cpu_s, 3)}

    def json_tail(self) -> Any:
        """The last JSON document on stdout (a --json command's pretty-printed object, or a line)."""
        text = self.stdout.strip()
        if not text:
            raise ValueError("no output")
        lines = text.splitlines()
        try:
            return json.loads(lines[-1])
        except ValueError:
            pass
        for i in range(len(lines) - 1, -1, -1):  # a pretty-printed object: from its opening line on
            if lines[i].startswith("{"):
                return json.loads("\n".join(lines[i:]))
        raise ValueError(f"no JSON in the output: {text[-300:]}")


def _sample_tree(proc, cpu: dict) -> int:
    """Summed RSS of ``proc`` and its descendants; records each one's CPU seconds in ``cpu``."""
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            with p.oneshot():
                total += p.memory_info().rss
                t = p.cpu_times()
                cpu[(p.pid, p.create_time())] = t.user + t.system
        except psutil.Error:
            pass
    return total


def run_measured(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                 sample_s: float = 0.1, check: bool = True) -> Measured:
    """Run ``cmd`` to completion; wall, CPU (own + waited-for descendants) and memory."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with the test dependencies
        psutil = None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env, cwd=cwd, text=True)
        peak = [0]
        cpu: dict = {}
        stop = threading.Event()

        def poll() -> None:
            try:
                proc = psutil.Process(p.pid)
            except psutil.Error:
                return
            while not stop.is_set():
                peak[0] = max(peak[0], _sample_tree(proc, cpu))
                stop.wait(sample_s)

        sampler = threading.Thread(target=poll, daemon=True) if psutil else None
        if sampler:
            sampler.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        stop.set()
        if sampler:
            sampler.join()
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        m = Measured(cmd=list(cmd), wall_s=wall, user_s=ru.ru_utime, sys_s=ru.ru_stime,
                     maxrss_mb=ru.ru_maxrss / 1024, tree_peak_rss_mb=peak[0] / 2**20,
                     tree_cpu_s=sum(cpu.values()),
                     returncode=p.returncode, stdout=out.read(), stderr=err.read())
    if check and m.returncode != 0:
        raise SystemExit(f"command failed ({m.returncode}): {' '.join(map(str, cmd))}\n"
                         f"{m.stderr[-3000:]}")
    return m


def disk_usage(path: str | os.PathLike) -> int:
    """Bytes allocated on disk under ``path`` (like du)."""
    total = 0
    path = Path(path)
    if path.is_file():
        return path.stat().st_blocks * 512
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def decompress(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dest``, decompressing .xz / .gz / .bz2."""
    import bz2
    import gzip
    import lzma

    src, dest = Path(src), Path(dest)
    opener = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}.get(src.suffix, open)
    with opener(src, "rb") as f, open(dest, "wb") as g:
        shutil.copyfileobj(f, g, 1 << 20)
    return dest
