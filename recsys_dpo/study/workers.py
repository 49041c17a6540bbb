"""A study's training runs N at a time in worker processes (`study.jobs`).

Each worker is a fresh interpreter (spawn context) limited to one intra-op thread before torch
is imported: on a box with as many cores as jobs, jobs that each take every core mostly contend
(README, "GPU and several GPUs": a step took 0.79 s with 2 threads, 0.08 s with 1). A job is
one `Pipeline.train` call, with the pipeline's own skip rule and stage lock; the runner hands a
run directory to one job at most (`Study.train_all` dedupes the plan by run directory first).

A worker's DataError is re-raised in the study's process (one line, exit 2); a worker that dies
(kill -9, out of memory) breaks the pool, which ends the study with one message instead of a
wait. On any error the other workers are killed: their runs resume or restart on the next
invocation (checkpoints and run directories are written atomically; stale locks are cleared).
The study's own process killed (SIGTERM, SIGKILL: no Python cleanup runs) takes its workers
with it: on Linux each asks the kernel for SIGKILL when its parent dies (`_die_with_parent`),
so none trains on as an orphan holding a run's lock and a core.

Nothing heavy is imported at the top: a spawned worker imports this module to find its
initializer before the thread limit is set.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any

from recsys_dpo.errors import DataError


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG), and exit now
    if the parent `parent` is already gone (it may die before the request is made). Elsewhere
    nothing: there a killed study's workers end with their current run."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _one_thread(parent: int) -> None:
    """Worker initializer: dies with the study's process `parent`; one OpenMP/MKL thread (read
    when torch starts) and one torch intra-op thread; third-party noise off as in the study's
    own process."""
    _die_with_parent(parent)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    from recsys_dpo.quiet import quiet_output

    quiet_output()
    import torch

    torch.set_num_threads(1)


def train_job(template: dict[str, Any], parent_run: str | None, stage: str, cfg: dict[str, Any],
              name: str) -> tuple[dict[str, Any], bool]:  # fmt: skip
    """One `Pipeline.train` in a worker, its MLflow child run under the study's `parent_run`
    (open in the study's process): (the run's result.json, whether it was trained here)."""
    from omegaconf import OmegaConf
    from rich.console import Console

    from recsys_dpo.pipeline import Pipeline
    from recsys_dpo.tracking.mlflow_utils import Tracker

    root = OmegaConf.create(template)
    pipe = Pipeline(root, Tracker(root.tracking, parent_id=parent_run),
                    Console(quiet=not root.progress))  # fmt: skip
    result = pipe.train(stage, OmegaConf.create(cfg), name)
    return result, stage in pipe.ran


@contextmanager
def job_pool(jobs: int) -> Iterator[ProcessPoolExecutor | None]:
    """`jobs` single-threaded spawned workers, or None for one job (runs train in this
    process, on its threads). On any error the workers still running are killed."""
    if jobs == 1:
        yield None
        return
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_one_thread, initargs=(os.getpid(),))  # fmt: skip
    try:
        yield pool
    except BaseException:
        # ProcessPoolExecutor.kill_workers() only exists from Python 3.14; its table before.
        for process in list((pool._processes or {}).values()):
            process.kill()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_jobs(pool: ProcessPoolExecutor | None, fn: Callable[..., Any],
             calls: Sequence[tuple[Any, ...]],
             then: Callable[[int, Any], list[tuple[Any, ...]]] | None = None) -> list[Any]:  # fmt: skip
    """fn(*call) for every call, on the pool (None: one after the other, here); `then(i,
    result)` gives further calls that can start once call i is done, numbered after the others
    (queued behind what is waiting, so a worker never idles while work is left). Results in
    the calls' order; the first failure is raised as soon as it happens (a dead worker as a
    DataError)."""
    calls = list(calls)
    results: dict[int, Any] = {}
    if pool is None:
        while len(results) < len(calls):
            i = len(results)
            results[i] = fn(*calls[i])
            calls += then(i, results[i]) if then else []
        return [results[i] for i in range(len(calls))]
    running: dict[Future[Any], int] = {pool.submit(fn, *c): i for i, c in enumerate(calls)}
    try:
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                i = running.pop(future)
                results[i] = future.result()
                for call in then(i, results[i]) if then else []:
                    running[pool.submit(fn, *call)] = len(calls)
                    calls.append(call)
    except BrokenProcessPool as err:
        raise DataError(
            "study.jobs: a training worker process died (killed, or out of memory) and the "
            "study stopped; finished runs are cached: run it again, with fewer study.jobs if "
            "memory ran out"
        ) from err
    return [results[i] for i in range(len(calls))]
