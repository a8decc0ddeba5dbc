"""Fair admission across tenants: one tenant's backlog does not hold back another tenant's requests; and request
priorities (vLLM's: lower first) ahead of it."""
from __future__ import annotations

import asyncio

import pytest

from adapters_store.disk import DiskStore
from service.engine import Engine, EngineConfig, QueueFull, SamplingParams


def engine(tiny_base, tiny_factors, tmp_path, **cfg) -> Engine:
    eng = Engine(tiny_base, tiny_factors, DiskStore(tmp_path / "store"),
                 EngineConfig(max_rank=8, max_seq_len=64, core_slots=2, lr_slots=2, prefix_cache_tokens=0, **cfg))
    eng.accepting = True  # takes requests; no engine thread: these tests run admission themselves
    return eng


@pytest.mark.parametrize("fair", [True, False], ids=["fair-share", "fifo"])
def test_a_backlogged_tenant_takes_turns_with_the_others(tiny_base, tiny_factors, tmp_path, fair):
    eng = engine(tiny_base, tiny_factors, tmp_path, max_batch=4, fair_share=fair)
    prompt = eng.encode_prompt("Hi", raw=True)

    async def submit(tenant: str, n: int):
        return [eng._submit(prompt, None, SamplingParams(max_tokens=4, tenant=tenant)) for _ in range(n)]

    async def scenario():
        a = await submit("acme", 6)  # acme's backlog first
        b = await submit("bolt", 2)
        c = await submit("core", 1)
        first = eng._admit()
        eng._active.extend(first)  # they hold rows now (as _prefill would have put them)
        eng._active.remove(first[1])  # one finishes: one row is free
        second = eng._admit()
        return a, b, c, first, second

    try:
        a, b, c, first, second = asyncio.run(scenario())
        if fair:
            # one row each in turn (ties to the earliest arrival): acme, bolt, core, then the tenant holding fewest
            assert first == [a[0], b[0], c[0], a[1]]
            # bolt's finished: acme holds 2 rows, core 1, bolt none, so bolt's next request takes the free row
            assert second == [b[1]]
        else:
            assert first == a[:4] and second == [a[4]]  # first come, first served: acme's whole backlog first
    finally:
        eng.shutdown(drain=False)


def test_one_tenant_alone_and_unknown_tenants_stay_first_come_first_served(tiny_base, tiny_factors, tmp_path):
    eng = engine(tiny_base, tiny_factors, tmp_path, max_batch=8)
    prompt = eng.encode_prompt("Hi", raw=True)

    async def scenario():
        reqs = [eng._submit(prompt, None, SamplingParams(max_tokens=4, tenant=t)) for t in ("x", "x", "x")]
        return reqs, eng._admission_order()

    try:
        reqs, order = asyncio.run(scenario())
        assert order == reqs
    finally:
        eng.shutdown(drain=False)


def test_the_other_tenant_is_answered_while_the_backlog_runs(tiny_base, tiny_factors, tmp_path):
    """Through the running engine: two rows, acme queues eight long requests, then bolt asks one short question.
    With fair share bolt's answer comes at the first free row, long before acme's backlog is through; with FIFO
    it comes after acme's sixth request at the earliest."""
    for fair in (True, False):
        eng = engine(tiny_base, tiny_factors, tmp_path, max_batch=2, fair_share=fair)
        eng.start()
        prompt = eng.encode_prompt("Hello there", raw=True)
        finished: list[str] = []

        async def one(name: str, tenant: str, max_tokens: int):
            await eng.generate(prompt, None, SamplingParams(max_tokens=max_tokens, ignore_eos=True, tenant=tenant))
            finished.append(name)

        async def scenario():
            backlog = [asyncio.ensure_future(one(f"acme-{i}", "acme", 30)) for i in range(8)]
            await asyncio.sleep(0)  # they are queued first
            await one("bolt", "bolt", 2)
            await asyncio.gather(*backlog)

        try:
            asyncio.run(scenario())
        finally:
            eng.shutdown(drain=False)
        done_before_bolt = finished.index("bolt")
        if fair:
            assert done_before_bolt <= 2, finished  # at most the two acme requests that held the rows
        else:
            assert done_before_bolt >= 6, finished


@pytest.mark.parametrize("fair", [True, False], ids=["fair-share", "fifo"])
def test_a_full_queue_makes_room_for_another_tenant_by_refusing_the_heaviest_tenants_newest(
        tiny_base, tiny_factors, tmp_path, fair):
    eng = engine(tiny_base, tiny_factors, tmp_path, max_batch=2, max_waiting=4, fair_share=fair)
    prompt = eng.encode_prompt("Hi", raw=True)
    params = lambda tenant: SamplingParams(max_tokens=2, tenant=tenant)  # noqa: E731

    async def scenario():
        acme = [asyncio.ensure_future(eng.generate(prompt, None, params("acme"))) for _ in range(4)]
        await asyncio.sleep(0)  # all four queued: the queue is full
        with pytest.raises(QueueFull, match="already waiting"):  # acme's own fifth: refused as before
            await eng.generate(prompt, None, params("acme"))
        bolt = []
        for _ in range(3):
            try:
                bolt.append(eng._submit(prompt, None, params("bolt")))
            except QueueFull:
                bolt.append(None)
        await asyncio.sleep(0.01)  # refused waiters hear about it
        refused = [t for t in acme if t.done()]
        if fair:
            # bolt's first two take the places of acme's two newest (acme 4 against bolt 0, then 3 against 1);
            # its third is refused (2 against 2: even)
            assert bolt[0] is not None and bolt[1] is not None and bolt[2] is None
            assert refused == acme[2:]
            for t in refused:
                with pytest.raises(QueueFull, match="largest share"):  # the API answers it 429 queue_full
                    t.result()
            assert [r.params.tenant for r in eng._waiting] == ["acme", "acme", "bolt", "bolt"]
        else:
            assert bolt == [None, None, None] and not refused
        assert eng.counters["rejected_queue_full"] == (1 + 2 + 1 if fair else 1 + 3)
        for t in acme:
            t.cancel()

    try:
        asyncio.run(scenario())
    finally:
        eng.shutdown(drain=False)


@pytest.mark.parametrize("fair", [True, False], ids=["fair-share", "fifo"])
def test_lower_priority_values_are_admitted_first_fair_share_within_one(tiny_base, tiny_factors, tmp_path, fair):
    eng = engine(tiny_base, tiny_factors, tmp_path, max_batch=8, fair_share=fair)
    prompt = eng.encode_prompt("Hi", raw=True)

    def submit(tenant: str, priority: int):
        return eng._submit(prompt, None, SamplingParams(max_tokens=2, tenant=tenant, priority=priority))

    async def scenario():
        a0, a1, a2 = (submit("acme", 0) for _ in range(3))
        late = submit("core", 5)
        b0 = submit("bolt", 0)
        u0, u1 = submit("acme", -1), submit("bolt", -1)
        return (a0, a1, a2, late, b0, u0, u1), eng._admission_order()

    try:
        (a0, a1, a2, late, b0, u0, u1), order = asyncio.run(scenario())
        if fair:  # -1 first (one per tenant), then the 0s one per tenant in turn (a0, b0, acme's rest), then 5
            assert order == [u0, u1, a0, b0, a1, a2, late]
        else:  # by priority, then arrival
            assert order == [u0, u1, a0, a1, a2, b0, late]
    finally:
        eng.shutdown(drain=False)


def test_a_full_queue_refuses_the_lowest_prioritys_newest_first(tiny_base, tiny_factors, tmp_path):
    eng = engine(tiny_base, tiny_factors, tmp_path, max_batch=2, max_waiting=3)
    prompt = eng.encode_prompt("Hi", raw=True)
    params = lambda priority: SamplingParams(max_tokens=2, tenant="acme", priority=priority)  # noqa: E731

    async def scenario():
        queued = [asyncio.ensure_future(eng.generate(prompt, None, params(p))) for p in (0, 2, 2)]
        await asyncio.sleep(0)  # the queue is full
        with pytest.raises(QueueFull, match="already waiting"):  # no better than the worst waiting: refused itself
            await eng.generate(prompt, None, params(2))
        urgent = eng._submit(prompt, None, params(1))  # better than 2: the newest 2 makes room
        await asyncio.sleep(0.01)
        assert [t.done() for t in queued] == [False, False, True]
        with pytest.raises(QueueFull, match=r"newest of the lowest priority \(2\), made room for one of priority 1"):
            queued[2].result()
        top = eng._submit(prompt, None, params(-5))  # the remaining 2 goes next
        await asyncio.sleep(0.01)
        assert [t.done() for t in queued] == [False, True, True]
        assert list(eng._waiting) == [eng._waiting[0], urgent, top] and eng._waiting[0].params.priority == 0
        with pytest.raises(QueueFull):  # 0, 1, -5 waiting: nothing worse than a 1 to make room
            eng._submit(prompt, None, params(1))
        for t in queued:
            t.cancel()

    try:
        asyncio.run(scenario())
    finally:
        eng.shutdown(drain=False)


def test_a_tenants_weight_is_its_share_of_the_rows_and_of_the_queue(tiny_base, tiny_factors, tmp_path):
    eng = engine(tiny_base, tiny_factors, tmp_path, max_batch=8, max_waiting=9)
    prompt = eng.encode_prompt("Hi", raw=True)

    def submit(tenant: str, weight: float):
        return eng._submit(prompt, None, SamplingParams(max_tokens=2, tenant=tenant, tenant_weight=weight))

    async def scenario():
        gold = [submit("gold", 2.0) for _ in range(6)]
        free = [submit("free", 1.0) for _ in range(3)]
        order = eng._admission_order()
        # the queue is full (9): free, holding 3 for weight 1, may not take gold's place (gold 6 - 1 = 5 for weight
        # 2 is 2.5 < free's 3 + 1 = 4); a third tenant with none waiting may (2.5 ≥ 1)
        with pytest.raises(QueueFull):
            submit("free", 1.0)
        newcomer = submit("new", 1.0)
        return gold, free, order, newcomer

    try:
        gold, free, order, newcomer = asyncio.run(scenario())
        # gold, of weight 2, gets two rows for each of free's: its rows / 2 against free's rows / 1
        assert [("g" if r in gold else "f") for r in order] == list("gfggfggfg")
        assert gold[-1] not in eng._waiting and newcomer in eng._waiting  # gold's newest made room
    finally:
        eng.shutdown(drain=False)
