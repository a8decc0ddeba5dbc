"""Which threads run PyTorch on several cores in a server process, and why only one does.

PyTorch's CPU builds parallelise with OpenMP (libgomp). libgomp keeps a team of worker threads for every thread
that ever ran a parallel region on more than one core, for as long as that thread lives. When such threads
outnumber the CPUs, libgomp stops letting idle workers spin and puts them to sleep at once, so every parallel
region pays a wake-up; a decode step is ~500 of them. Measured on 2 cores (SmolLM2-135M, one row, OSoRA): a
decode step on the engine thread took 49 ms when the main thread (which had loaded the model) or any other live
thread had once run a 2-thread op, 32 ms when none had; an idle helper that had only run 1-thread ops cost nothing.

A server has such threads: the main thread loads the model, anyio's worker threads validate uploads, the loader
pool builds adapters' slot terms. So the engine thread is the one thread that computes on several cores
(`compute_threads`); multi-core work elsewhere (loading the model, computing SVD factors, building the runner and
timing its kernels) runs in a thread of its own that exits afterwards and takes its team with it
(`in_fresh_thread`); every other thread that touches torch runs it on one core (`single_core`).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

# The process's thread count before anything here changes it (OMP_NUM_THREADS, or one per core): what the
# compute threads use. Read at import, in the importing thread.
COMPUTE_THREADS = torch.get_num_threads()


def _set(n: int) -> None:
    torch.get_num_threads()  # a thread's first query initialises its count from the process-wide one: do it
    torch.set_num_threads(n)  # first, so that it cannot undo this later


def compute_threads(n: int | None = None) -> None:
    """This thread computes on `n` cores (default: the process's count)."""
    _set(n or COMPUTE_THREADS)


def single_core() -> None:
    """Torch ops in this thread run on one core, so the thread never holds an OpenMP team (see the module doc)."""
    _set(1)


def in_fresh_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) on all the process's cores, in a new thread that ends when fn returns (its OpenMP team
    goes with it); fn's exception is raised here."""
    out: dict[str, object] = {}

    def run() -> None:
        compute_threads()
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller's thread
            out["error"] = exc

    worker = threading.Thread(target=run, name=f"init-{getattr(fn, '__name__', 'work')}")
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]  # type: ignore[return-value]
