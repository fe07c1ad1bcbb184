"""Where a build's per-shape tasks run: threads on this machine, or Ray tasks on a cluster.

An executor maps a function over small picklable tasks, ``fn(task, env) -> result``, and knows
nothing of the build: the build hands it :func:`factory.pipeline.shape_task.run_shape_task` and one
:class:`~factory.pipeline.shape_task.ShapeTask` per distinct shape (specs and paths, nothing large).
``env`` (:class:`TaskEnv`) is what the executor provides: intra-op threads, a log, a stop flag and a
lock for process-global work. A :class:`~factory.errors.FactoryError` inside a task is the task's
to report (it returns failed devices); a task lost with its worker becomes ``failed(task, reason)``.

- :class:`LocalExecutor` (``--executor local``, default): a thread pool of ``--jobs`` workers in
  this process. Ctrl-C sets the stop flag the fine-tunes poll between steps.
- :class:`RayExecutor` (``--executor ray``, extra ``peg-factory[ray]``): one Ray task per item
  with ``task_cpus`` CPUs and ``task_gpus`` GPUs. ``address=None`` starts a local Ray instance (all
  this machine's CPUs unless ``num_cpus`` is given); ``"auto"`` or ``ray://host:10001`` joins an
  existing cluster, whose nodes must have peg-factory installed and see ``--out`` at the same path.
  A task whose worker dies is retried ``max_retries`` times by Ray; the retry resumes the fine-tune
  from its last checkpoint in the shared cache.

Fine-tunes run with a pinned intra-op thread count (``cpus // jobs`` here, ``task_cpus`` on Ray):
CPU results depend on it, so ``--jobs 2`` here and Ray tasks of 1 CPU write the same model bytes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from factory.errors import FactoryError

EXECUTORS = ("local", "ray")  # the names of EXECUTOR_FACTORIES (below; a test keeps them equal)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class TaskEnv:
    """What a task gets from the executor that runs it."""

    threads: int  # intra-op threads for its torch work
    log: Callable[[str], None]
    should_stop: Callable[[], bool] | None = None  # polled between training steps (Ctrl-C)
    serial: Any = None  # a lock shared by the tasks of one process, for work that is not thread-safe


def available_cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class LocalExecutor:
    jobs: int = 1

    @property
    def threads(self) -> int:
        """Intra-op threads per task: the threads torch may use here (this machine's CPUs, or fewer
        if the user limited them, e.g. ``OMP_NUM_THREADS``) shared by the ``jobs`` running at once."""
        import torch

        return max(1, min(available_cpus(), torch.get_num_threads()) // max(1, self.jobs))

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "jobs": self.jobs, "threads_per_finetune": self.threads}

    def session(self, log: Callable[[str], None]):
        """Nothing to start or check for threads here."""
        return contextlib.nullcontext()

    def map(
        self,
        fn: Callable[[T, TaskEnv], R],
        tasks: Sequence[T],
        *,
        log: Callable[[str], None],
        failed: Callable[[T, str], R],
    ) -> list[R]:
        stop = threading.Event()  # Ctrl-C reaches the main thread only; the workers poll this between steps
        env = TaskEnv(self.threads, log, stop.is_set, threading.Lock())
        with ThreadPoolExecutor(max_workers=max(1, self.jobs)) as pool:
            futures = [pool.submit(fn, task, env) for task in tasks]
            try:
                return [f.result() for f in futures]
            except KeyboardInterrupt:
                stop.set()
                for f in futures:
                    f.cancel()
                raise  # leaving the pool waits for the running fine-tunes, which checkpoint and stop at their next step


def _ray_task(fn: Callable[[Any, TaskEnv], Any], task: Any, threads: int) -> Any:
    """A Ray task: ``fn(task)`` in a worker, logging to the worker's stdout (Ray forwards it)."""
    return fn(task, TaskEnv(threads, lambda line: print(line, flush=True)))


@dataclass(frozen=True)
class RayExecutor:
    address: str | None = None
    task_cpus: float = 1.0
    task_gpus: float = 0.0
    max_retries: int = 3
    num_cpus: int | None = None  # for a local instance only: CPUs it may use

    @property
    def threads(self) -> int:
        """Intra-op threads per task: the task's CPUs."""
        return max(1, int(self.task_cpus))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "ray",
            "address": self.address or "local instance",
            "task_cpus": self.task_cpus,
            "task_gpus": self.task_gpus,
            "max_retries": self.max_retries,
            "threads_per_finetune": self.threads,
        }

    def map(
        self,
        fn: Callable[[T, TaskEnv], R],
        tasks: Sequence[T],
        *,
        log: Callable[[str], None],
        failed: Callable[[T, str], R],
    ) -> list[R]:
        ray = require_ray()
        if not ray.is_initialized():
            raise RuntimeError("RayExecutor.map runs inside RayExecutor.session (build() opens it)")
        remote = ray.remote(_ray_task).options(
            num_cpus=self.task_cpus, num_gpus=self.task_gpus, max_retries=self.max_retries, retry_exceptions=False
        )
        refs = [remote.remote(fn, task, self.threads) for task in tasks]
        results = []
        try:
            for task, ref in zip(tasks, refs):
                try:
                    results.append(ray.get(ref))
                except ray.exceptions.WorkerCrashedError as exc:
                    results.append(
                        failed(
                            task,
                            f"its Ray task died {self.max_retries + 1} times ({type(exc).__name__}); see the Ray logs",
                        )
                    )
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.as_instanceof_cause()
                    if isinstance(cause, FactoryError):
                        results.append(failed(task, str(cause)))
                    else:
                        raise
        except KeyboardInterrupt:
            for ref in refs:
                ray.cancel(ref)
            raise
        return results

    @contextlib.contextmanager
    def session(self, log: Callable[[str], None]):
        """Join (or start) Ray and check that a task fits on some node, before the build writes
        anything; shut down on leaving what this call started. Every failure is one line."""
        ray = require_ray()
        started = self.connect(ray, log)
        try:
            self.check_resources(ray)
            yield
        finally:
            if started:
                ray.shutdown()

    def connect(self, ray, log: Callable[[str], None]) -> bool:
        """Join (or start) Ray; true when this call started it (and so shuts it down after). A local
        instance binds to 127.0.0.1; a cluster address is probed first (:func:`probe_address`)."""
        if ray.is_initialized():
            return False
        t0 = time.perf_counter()
        kwargs: dict[str, Any] = {"address": self.address, "log_to_driver": True, "include_dashboard": False}
        if self.address is None:
            kwargs["_node_ip_address"] = LOOPBACK
            if self.num_cpus is not None:
                kwargs["num_cpus"] = self.num_cpus
        else:
            probe_address(self.address)
        try:
            ray.init(**kwargs)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
            raise FactoryError(
                f"cannot reach the Ray cluster at {self.address!r} ({' '.join(str(exc).split())[:200]}); check "
                "it or start it with `ray start --head`",
                param="ray_address",
            ) from exc
        log(
            f"ray: {'joined ' + self.address if self.address else 'started a local instance on ' + LOOPBACK} with "
            f"{ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs "
            f"in {time.perf_counter() - t0:.1f}s"
        )
        return True

    def check_resources(self, ray) -> None:
        """Refuse (one line) a task no live node can run: Ray would otherwise wait for it forever."""
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        cpus = max((n.get("CPU", 0) for n in nodes), default=0)
        gpus = max((n.get("GPU", 0) for n in nodes), default=0)
        if self.task_cpus > cpus:
            raise FactoryError(
                f"{self.task_cpus:g}: no Ray node has that many CPUs (the largest has {cpus:g}); lower it",
                param="task_cpus",
            )
        if self.task_gpus > gpus:
            raise FactoryError(
                f"{self.task_gpus:g}: no Ray node has that many GPUs (the largest has {gpus:g}); lower it or add GPU nodes",
                param="task_gpus",
            )


LOOPBACK = "127.0.0.1"
PROBE_TIMEOUT_S = 5.0


def probe_address(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Refuse (one line) a Ray address that is malformed or has nothing listening, within ``timeout``
    seconds, instead of letting ``ray.init`` retry for minutes: ``auto``, ``HOST:PORT`` or
    ``ray://HOST:PORT``."""
    import socket

    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in hostport:
        raise FactoryError(f"{address!r} is not 'auto', HOST:PORT or ray://HOST:PORT; fix it", param="ray_address")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise FactoryError(
            f"cannot reach the Ray cluster at {address!r} ({exc.strerror or exc} within {timeout:g}s); check "
            "it or start it with `ray start --head`",
            param="ray_address",
        ) from exc


def require_ray():
    try:
        import ray
    except ImportError as exc:
        raise FactoryError(
            "ray needs Ray: pip install 'peg-factory[ray]' (or use the local executor)", param="executor_kind"
        ) from exc
    return ray


def _local(*, jobs: int = 1, **_: Any) -> LocalExecutor:
    return LocalExecutor(jobs)


def _ray(
    *, address: str | None = None, task_cpus: float = 1.0, task_gpus: float = 0.0, num_cpus: int | None = None, **_: Any
) -> RayExecutor:
    require_ray()
    return RayExecutor(address=address, task_cpus=task_cpus, task_gpus=task_gpus, num_cpus=num_cpus)


#: The executors, registered once: ``name -> factory(**settings)`` (each takes the settings it uses). The CLI's
#: ``--executor`` choices read it; a new executor is its class (``map``, ``session``, ``describe``) and one entry.
EXECUTOR_FACTORIES: dict[str, Callable[..., Any]] = {"local": _local, "ray": _ray}


def make_executor(
    kind: str,
    *,
    jobs: int = 1,
    address: str | None = None,
    task_cpus: float = 1.0,
    task_gpus: float = 0.0,
    num_cpus: int | None = None,
):
    """The registered executor ``kind`` (:data:`EXECUTOR_FACTORIES`) with the settings it takes."""
    if kind not in EXECUTOR_FACTORIES:
        raise FactoryError(f"unknown executor {kind!r}; use one of {', '.join(EXECUTORS)}")
    return EXECUTOR_FACTORIES[kind](
        jobs=jobs, address=address, task_cpus=task_cpus, task_gpus=task_gpus, num_cpus=num_cpus
    )
