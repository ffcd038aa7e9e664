"""Joining a multi-process run and the collectives that keep its processes in step.

- :func:`initialize_distributed` is the one place that calls ``jax.distributed.initialize``
  (bounded by a timeout, with one error line instead of JAX's abort).
- :func:`agree` makes every process fail together, with the same message, when one of
  them hit an error or was started with different settings (a collective, and a barrier):
  ``multihost_utils.assert_equal`` could not say which setting differs on which process.
- :func:`allgather_json` and :func:`any_process` are the small collectives under it and
  under train's stop requests.

Every function here is a no-op (or a plain return) in a single-process run.  Devices, the
mesh and array shardings are :mod:`mlmtool.runtime.sharding`'s.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
from typing import Any

import jax
import numpy as np

from mlmtool.errors import TrainingError

DEFAULT_TIMEOUT = 300  # seconds to wait for every process to join (JAX's own default)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout: int | None = None) -> None:
    """Start JAX's multi-controller runtime when asked to, or when a cluster is detected.

    Explicit arguments win; otherwise the ``MLMTOOL_COORDINATOR_ADDRESS`` /
    ``MLMTOOL_NUM_PROCESSES`` / ``MLMTOOL_PROCESS_ID`` environment variables; otherwise
    JAX's own auto-detection (Cloud TPU pod slices, SLURM steps with several tasks, Open
    MPI).  A single process needs nothing, and ``--num-processes 1`` turns detection off.

    If the run has not started within ``timeout`` seconds (``MLMTOOL_DISTRIBUTED_TIMEOUT``,
    default 300) the process prints one error line and exits with status 1: JAX itself
    would abort with a C++ stack trace, which says nothing about which flag is wrong.
    """
    coordinator_address = coordinator_address or os.environ.get("MLMTOOL_COORDINATOR_ADDRESS") or None
    num_processes = _int_env(num_processes, "MLMTOOL_NUM_PROCESSES", "--num-processes")
    process_id = _int_env(process_id, "MLMTOOL_PROCESS_ID", "--process-id")
    timeout = _int_env(timeout, "MLMTOOL_DISTRIBUTED_TIMEOUT", "--distributed-timeout") or DEFAULT_TIMEOUT
    if num_processes == 1 and coordinator_address is None:
        return  # explicitly one process: no cluster detection
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    cluster = _detect_cluster()
    if not explicit and cluster is None:
        return
    if jax.distributed.is_initialized():
        return
    _check_arguments(coordinator_address, num_processes, process_id, cluster)
    if timeout <= 0:
        raise TrainingError(f"--distributed-timeout {timeout} must be positive", "e.g. --distributed-timeout 300")
    kwargs: dict[str, Any] = {"initialization_timeout": timeout + 60}  # the watchdog below speaks first
    if coordinator_address is not None:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    try:  # CPU collectives across processes (tests, CPU clusters); GPUs/TPUs use their own
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # pragma: no cover  (older/newer jax without the option)
        pass

    joined = threading.Event()

    def watchdog() -> None:  # jax.distributed.initialize blocks in C++ (GIL released)
        if joined.wait(timeout):
            return
        message = _join_failure(coordinator_address, num_processes, process_id, cluster, timeout)
        try:
            from mlmtool.runtime.progress import err_console

            err_console.print("[bold red]error:[/] " + message.replace("[", r"\["), markup=True,
                              highlight=False, soft_wrap=True)
        except Exception:  # pragma: no cover
            print(f"error: {message}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watchdog, name="mlmtool-distributed-watchdog", daemon=True).start()
    try:
        jax.distributed.initialize(**kwargs)
        jax.devices()  # the backend exchanges device topologies with every process: also bounded
    except Exception as e:  # surface one clear line instead of a gRPC stack
        raise TrainingError(f"could not join the distributed run ({e.__class__.__name__}: {e})",
                            "check --coordinator-address, --num-processes and --process-id on every process") from e
    finally:
        joined.set()


def _int_env(value: int | None, env: str, flag: str) -> int | None:
    if value is not None or not os.environ.get(env):
        return value
    try:
        return int(os.environ[env])
    except ValueError:
        raise TrainingError(f"{env}={os.environ[env]!r} is not an integer", f"set it like {flag}") from None


def _detect_cluster() -> str | None:
    """The name of the cluster JAX would bootstrap from ("slurm", "gcetpu", ...), if it has
    more than one process; None otherwise (no cluster, a one-task SLURM job, a single TPU VM)."""
    import warnings

    try:
        from jax._src import clusters  # JAX's own detection, so this agrees with initialize()

        with warnings.catch_warnings():  # e.g. "Kubernetes environment detected, but ..."
            warnings.simplefilter("ignore")
            for env in clusters.ClusterEnv._cluster_types:
                if getattr(env, "opt_in_only_method", False) or not env.is_env_present():
                    continue
                try:
                    count = int(env.get_process_count())
                except Exception:
                    count = None
                if count is not None and count <= 1:
                    return None
                return getattr(env, "name", None) or env.__name__
        return None
    except Exception:  # private API moved: fall back to the environment variables
        try:
            if int(os.environ.get("SLURM_NTASKS") or 1) > 1 and "SLURM_STEP_NODELIST" in os.environ:
                return "slurm"
        except ValueError:
            pass
        return "tpu" if "MEGASCALE_COORDINATOR_ADDRESS" in os.environ else None


def _check_arguments(coordinator_address, num_processes, process_id, cluster) -> None:
    """Reject incomplete or impossible flags before JAX turns them into an abort."""
    if cluster is None:
        missing = [flag for flag, v in (("--coordinator-address", coordinator_address),
                                        ("--num-processes", num_processes), ("--process-id", process_id)) if v is None]
        if missing:
            raise TrainingError(f"a multi-process run needs {', '.join(missing)} as well (no cluster was detected "
                                f"to supply {'it' if len(missing) == 1 else 'them'})",
                                "give --coordinator-address HOST:PORT --num-processes N --process-id I on every "
                                "process (or the MLMTOOL_* environment variables)")
    if num_processes is not None and num_processes < 1:
        raise TrainingError(f"--num-processes {num_processes} must be at least 1", "e.g. --num-processes 2")
    if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
        raise TrainingError(f"--process-id {process_id} is not in 0..{(num_processes or 1) - 1}",
                            "number the processes 0, 1, ..., num-processes - 1")
    if coordinator_address is not None:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise TrainingError(f"--coordinator-address {coordinator_address!r} is not HOST:PORT",
                                "e.g. --coordinator-address 10.0.0.1:12345 (process 0's host, a free port)")
        if process_id == 0 and not _port_free(int(port)):
            raise TrainingError(f"port {port} of --coordinator-address {coordinator_address} is already in use "
                                "on this host (process 0 serves the coordinator there)",
                                "choose another port, or stop the earlier run that still holds it")


def _port_free(port: int) -> bool:
    import socket

    for family, addr in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((addr, port))
            return True
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            continue  # no IPv6 here: try IPv4
    return True


def _reachable(address: str) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=3):
            return True
    except (OSError, ValueError):
        return False


def _join_failure(coordinator_address, num_processes, process_id, cluster, timeout) -> str:
    where = coordinator_address or f"the coordinator {cluster or 'JAX'} chose"
    n = f"{num_processes} processes" if num_processes else "all processes"
    if process_id not in (None, 0) and coordinator_address is not None and not _reachable(coordinator_address):
        return (f"cannot reach the coordinator at {coordinator_address} after {timeout} s (process {process_id}): "
                f"start process 0 with the same --coordinator-address, check the host, port and firewall, "
                f"or raise --distributed-timeout")
    return (f"the distributed run did not start within {timeout} s: waited at {where} for {n} to join"
            f"{f' (this is process {process_id})' if process_id is not None else ''}: start every process "
            "with the same --coordinator-address and --num-processes and a distinct --process-id, "
            "or raise --distributed-timeout")


# -- collective checks: every process calls these at the same point -------------------------

def agree(settings: dict | None = None, *, error: BaseException | None = None, what: str = "settings",
          hint: str | None = None) -> None:
    """Fail on every process together, with the same message, when any process failed
    (``error``) or its ``settings`` differ from process 0's.

    Every process must call this at the same point (it is a collective, and a barrier).
    Single-process: re-raises ``error``, nothing else.  The process that failed re-raises
    its own error; the others raise a TrainingError naming it.  A mismatch names each
    differing setting with process 0's value and the other process's.
    """
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    mine = {"error": _describe(error) if error is not None else None,
            "settings": _flatten(settings) if settings is not None else None}
    everyone = allgather_json(mine)
    failed = [(i, e["error"]) for i, e in enumerate(everyone) if e["error"]]
    if failed:
        if error is not None:
            raise error
        i, message = failed[0]
        more = f" (and {len(failed) - 1} more process{'es' if len(failed) > 2 else ''})" if len(failed) > 1 else ""
        raise TrainingError(f"process {i} failed{more}: {message}", "fix that process and start every process again")
    ref = everyone[0]["settings"] or {}
    diffs = []
    for i, e in enumerate(everyone[1:], start=1):
        other = e["settings"] or {}
        for key in sorted(set(ref) | set(other)):
            if ref.get(key, _MISSING) != other.get(key, _MISSING):
                diffs.append(f"{key} is {_show(ref.get(key, _MISSING))} on process 0 but "
                             f"{_show(other.get(key, _MISSING))} on process {i}")
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise TrainingError(f"the processes disagree on the {what}: {shown}",
                            hint or "start every process with the same options on the same model directory")


_MISSING = "<missing>"


def _show(value: Any) -> str:
    return "missing" if value == _MISSING else json.dumps(value)


def _describe(error: BaseException) -> str:
    from mlmtool.errors import MlmtoolError

    return str(error) if isinstance(error, MlmtoolError) else f"{error.__class__.__name__}: {error}"


def _flatten(tree: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.loads(json.dumps(v, default=str))  # what the other processes will see
    return out


def allgather_json(obj: Any) -> list:
    """Every process's ``obj`` (JSON-serialisable), in process order (a collective)."""
    from jax.experimental import multihost_utils

    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray(len(blob), np.int32))).reshape(-1)
    size = -(-int(lengths.max()) // 1024) * 1024  # a few padded sizes: few recompilations
    buf = np.zeros(size, np.uint8)
    buf[:len(blob)] = np.frombuffer(blob, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lengths), size)
    return [json.loads(every[i, :lengths[i]].tobytes()) for i in range(len(lengths))]


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (a collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(int(bool(flag)), np.int32))).any())
