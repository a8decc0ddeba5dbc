"""Per-thread core counts in a server process (svd_adapters/threads.py): the engine thread computes on several
cores, loader and helper threads on one, and svdserve's kernels never reset a thread's count."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from adapters_store.disk import DiskStore
from adapters_store.format import adapter_to_bytes
from adapters_store.records import record_for
from service.engine import Engine, EngineConfig, SamplingParams
from svd_adapters import cpu_kernels
from svd_adapters.threads import COMPUTE_THREADS, compute_threads, in_fresh_thread, single_core
from test_engine import adapters  # noqa: F401  (the shared fixture)


def in_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.update(value=fn()))
    t.start()
    t.join()
    return out["value"]


def test_kernels_keep_the_calling_threads_core_count():
    """A thread set to 2 cores stays on 2 through its first kernel call after another thread went single-core
    (the process-wide default is then 1: at::parallel_for compiled into the kernels re-initialised from it)."""
    assert cpu_kernels.available()

    def run() -> tuple[int, int]:
        compute_threads(2)
        in_thread(lambda: single_core())  # the process-wide default is now 1
        x, W = torch.randn(8, 64), torch.randn(96, 64)
        cpu_kernels.skinny_linear(x, W)  # this thread's first call into the kernels
        after_kernel = torch.get_num_threads()
        y = torch.zeros(8, 96)
        cpu_kernels.lowrank_delta(y, x, torch.zeros(2, 4, 64), [torch.zeros(2, 4, 96)], [0, 96],
                                  torch.ones(8, dtype=torch.long), torch.tensor([0, 4]))
        return after_kernel, torch.get_num_threads()

    try:
        assert in_thread(run) == (2, 2)
    finally:
        compute_threads()  # the default for threads started later


def test_in_fresh_thread_returns_raises_and_uses_all_cores():
    single_core()  # even from a single-core caller
    try:
        seen = in_fresh_thread(lambda a, b=0: (a + b, torch.get_num_threads(), threading.current_thread().name), 2, b=3)
        assert seen[:2] == (5, COMPUTE_THREADS)
        assert seen[2].startswith("init-") and seen[2] != threading.current_thread().name
        with pytest.raises(ValueError, match="boom"):
            in_fresh_thread(lambda: (_ for _ in ()).throw(ValueError("boom")))
    finally:
        compute_threads()


def test_engine_computes_on_its_cores_and_loads_adapters_on_one(tiny_base, tiny_factors, adapters, tmp_path):
    """Decode steps run on the engine thread with the count its creator had (2 here); a cold adapter is loaded on
    a loader thread on one core."""
    store = DiskStore(tmp_path / "store")
    aid, a = next((k, v) for k, v in adapters.items() if v.method == "osora")
    blob = adapter_to_bytes(a)
    store.put(record_for(a, blob, aid), blob)

    def build() -> Engine:
        compute_threads(2)
        return Engine(tiny_base, tiny_factors, store, EngineConfig(max_batch=2, max_rank=8, max_seq_len=64,
                                                                     core_slots=2, lr_slots=2))

    eng = in_thread(build)
    seen: dict[str, set[int]] = {"decode": set(), "load": set()}
    decode, load = eng.runner.decode, eng._load
    eng.runner.decode = lambda *a, **kw: (seen["decode"].add(torch.get_num_threads()), decode(*a, **kw))[1]
    eng._load = lambda *a, **kw: (seen["load"].add(torch.get_num_threads()), load(*a, **kw))[1]
    eng.start()
    try:
        result = asyncio.run(eng.generate([5, 6, 7], aid, SamplingParams(max_tokens=4)))
        assert result.completion_tokens > 1  # at least one decode step ran
    finally:
        eng.shutdown(drain=False)
        compute_threads()
    assert seen == {"decode": {2}, "load": {1}}
