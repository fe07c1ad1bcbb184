"""Where a build's per-shape work runs: threads on this machine, or Ray tasks on a cluster.

A build computes the learngene once (in the driver), then hands out one *shape job* per distinct
descendant shape: fine-tune that shape, then measure and export it for every profile that chose
it (:func:`factory.pipeline.build.build_shape`). Jobs are independent given the learngene and share
nothing but the content-addressed cache in ``--out``, so they can run anywhere that sees ``--out``.

- :class:`LocalExecutor` (``--executor local``, default): a thread pool of ``--jobs`` workers in
  this process. Ctrl-C sets a stop flag the fine-tunes poll between steps.
- :class:`RayExecutor` (``--executor ray``, extra ``peg-factory[ray]``): one Ray task per shape
  job with ``task_cpus`` CPUs and ``task_gpus`` GPUs. ``address=None`` starts a local Ray
  instance (all this machine's CPUs unless ``num_cpus`` is given); ``"auto"`` or
  ``ray://host:10001`` joins an existing cluster, whose nodes must have peg-factory installed and
  see ``--out`` at the same path (a shared filesystem). A task whose worker dies (a killed
  process, a lost node) is retried ``max_retries`` times by Ray; the retry resumes the fine-tune
  from its last checkpoint in the shared cache. Each task loads the ancestry, data and learngene
  itself (by spec and path: nothing large travels through Ray's object store).

Fine-tunes run with a pinned intra-op thread count (``cpus // jobs`` here, ``task_cpus`` on Ray;
:func:`factory.training.train.intra_op_threads`): CPU results depend on it, so ``--jobs 2`` here and Ray
tasks of 1 CPU write the same model bytes for the same seeds.

Both return, per job, ``[(device name, entry update)]``; a :class:`~factory.errors.FactoryError`
inside a job becomes that device's ``status: failed`` there, anything else is a bug and propagates.
"""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from factory.errors import FactoryError

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ShapeJob:
    """One distinct shape and the devices that chose it: ``devices`` is ``[(profile, entry, searched)]``."""

    shape: Any
    devices: list[tuple[Any, dict[str, Any], Any]]

    @property
    def names(self) -> list[str]:
        return [entry["name"] for _, entry, _ in self.devices]

    def failed(self, reason: str) -> list[tuple[str, dict[str, Any]]]:
        """Every device of the job failed with ``reason`` (the manifest entry updates)."""
        return [(name, {"status": "failed", "error": reason}) for name in self.names]


def available_cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class LocalExecutor:
    jobs: int = 1

    @property
    def threads(self) -> int:
        """Intra-op threads per fine-tune: the threads torch may use here (this machine's CPUs, or fewer
        if the user limited them, e.g. ``OMP_NUM_THREADS``) shared by the ``jobs`` running at once."""
        import torch

        return max(1, min(available_cpus(), torch.get_num_threads()) // max(1, self.jobs))

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "jobs": self.jobs, "threads_per_finetune": self.threads}

    def run(self, builder, anc, lg, lg_dir: Path, ds, jobs: list[ShapeJob]) -> list[list[tuple[str, dict[str, Any]]]]:
        from factory.pipeline.build import build_shape

        stop = threading.Event()  # Ctrl-C reaches the main thread only; the workers poll this between steps
        with ThreadPoolExecutor(max_workers=max(1, self.jobs)) as pool:
            serial, threads = threading.Lock(), self.threads
            futures = [pool.submit(build_shape, builder, anc, lg, ds, job, stop.is_set, threads, serial) for job in jobs]
            try:
                return [f.result() for f in futures]
            except KeyboardInterrupt:
                stop.set()
                for f in futures:
                    f.cancel()
                raise  # leaving the pool waits for the running fine-tunes, which checkpoint and stop at their next step


@dataclass(frozen=True)
class RayExecutor:
    address: str | None = None
    task_cpus: float = 1.0
    task_gpus: float = 0.0
    max_retries: int = 3
    num_cpus: int | None = None  # for a local instance only: CPUs it may use

    @property
    def threads(self) -> int:
        """Intra-op threads per fine-tune: the task's CPUs."""
        return max(1, int(self.task_cpus))

    def run(self, builder, anc, lg, lg_dir: Path, ds, jobs: list[ShapeJob]) -> list[list[tuple[str, dict[str, Any]]]]:
        ray = require_ray()
        started = self.connect(ray, builder.log)
        remote = ray.remote(_ray_shape_job).options(num_cpus=self.task_cpus, num_gpus=self.task_gpus,
                                                    max_retries=self.max_retries, retry_exceptions=False)
        refs = [remote.remote(str(Path(builder.out).resolve()), builder.cfg, lg.sha256, str(Path(lg_dir).resolve()), job, self.threads)
                for job in jobs]
        results = []
        try:
            for job, ref in zip(jobs, refs):
                try:
                    results.append(ray.get(ref))
                except ray.exceptions.WorkerCrashedError as exc:
                    reason = f"its Ray task died {self.max_retries + 1} times ({type(exc).__name__}); see the Ray logs"
                    results.append(job.failed(reason))
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.as_instanceof_cause()
                    if isinstance(cause, FactoryError):
                        results.append(job.failed(str(cause)))
                    else:
                        raise
        except KeyboardInterrupt:
            for ref in refs:
                ray.cancel(ref)
            raise
        finally:
            if started:
                ray.shutdown()
        return results

    def describe(self) -> dict[str, Any]:
        return {"kind": "ray", "address": self.address or "local instance", "task_cpus": self.task_cpus,
                "task_gpus": self.task_gpus, "max_retries": self.max_retries, "threads_per_finetune": self.threads}

    def connect(self, ray, log: Callable[[str], None]) -> bool:
        """Join (or start) Ray; true when this call started it (and so shuts it down after)."""
        if ray.is_initialized():
            return False
        t0 = time.perf_counter()
        kwargs: dict[str, Any] = {"address": self.address, "log_to_driver": True, "include_dashboard": False}
        if self.address is None and self.num_cpus is not None:
            kwargs["num_cpus"] = self.num_cpus
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise FactoryError(f"cannot reach the Ray cluster at {self.address!r} ({exc}); check --ray-address or start it "
                               "with `ray start --head`") from exc
        log(f"ray: {'joined ' + self.address if self.address else 'started a local instance'} with "
            f"{ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs "
            f"in {time.perf_counter() - t0:.1f}s")
        return True


def require_ray():
    try:
        import ray
    except ImportError as exc:
        raise FactoryError("--executor ray needs Ray: pip install 'peg-factory[ray]' (or use --executor local)") from exc
    return ray


@functools.lru_cache(maxsize=2)
def _worker_inputs(ancestry: str, data: str, lg_dir: str, lg_sha: str):
    """Ancestry, data and learngene of a build, loaded once per Ray worker process. Ray gives each
    driver (each ``peg-factory build``) its own worker processes, so this never outlives a build."""
    from factory.core.ancestry import load_ancestry
    from factory.training.data import load_dataset
    from factory.core.learngene import Learngene

    anc = load_ancestry(ancestry)
    ds = load_dataset(data, img_size=anc.arch.img_size, in_chans=anc.arch.in_chans)
    lg = Learngene.load(lg_dir)
    if lg.sha256 != lg_sha:
        raise FactoryError(f"the learngene at {lg_dir} is not the one the build made ({lg_sha[:12]}); is --out shared?")
    return anc, ds, lg


def _ray_shape_job(out: str, cfg, lg_sha: str, lg_dir: str, job: ShapeJob, threads: int):
    """A Ray task: load what the job needs by spec and path (once per worker), then
    :func:`factory.pipeline.build.build_shape`."""
    from factory.pipeline.build import Builder, build_shape

    anc, ds, lg = _worker_inputs(cfg.ancestry, cfg.data, lg_dir, lg_sha)
    builder = Builder(Path(out), cfg, log=lambda line: print(line, flush=True))
    return build_shape(builder, anc, lg, ds, job, None, threads)


def make_executor(kind: str, *, jobs: int = 1, address: str | None = None, task_cpus: float = 1.0,
                  task_gpus: float = 0.0, num_cpus: int | None = None):
    if kind == "local":
        return LocalExecutor(jobs)
    if kind == "ray":
        require_ray()
        return RayExecutor(address=address, task_cpus=task_cpus, task_gpus=task_gpus, num_cpus=num_cpus)
    raise FactoryError(f"unknown executor {kind!r}; use one of {', '.join(EXECUTORS)}")
