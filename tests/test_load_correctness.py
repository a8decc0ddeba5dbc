"""A smaller run of bench/load_correctness.py (issue #5): a real uvicorn, 20 adapters of every method, 16 clients,
a queue small enough to answer 429s, clients hanging up mid-stream and bad uploads mixed in, prompts prefilled in
8-token chunks beside decoding rows, request-time merges of two adapters among the requests, speculative decoding
on every decode step that has a draft, a quarter of the requests carrying a predicted output. Every answer must
equal its adapter's solo merged-weights reference; no 5xx; the queue stays bounded; the engine ends idle."""
from __future__ import annotations

import json

from _reliability import tiny_factors_dir
from bench.load_correctness import run

__all__ = ["tiny_factors_dir"]  # a fixture


def test_load_with_correctness_small(tmp_path, tiny_factors_dir):
    r = run(factors_dir=tiny_factors_dir or tmp_path, base_spec="tiny", n_requests=200, n_adapters=20, clients=16, max_tokens=8, prompts_per_adapter=2,
            max_batch=8, max_waiting=4, core_slots=6, lr_slots=3, disconnects=8, n_bad_uploads=20, server="thread",
            prefill_chunk_tokens=8, merges=4, merge_share=0.15, speculative_tokens=4, speculative_max_batch=8,
            prediction_share=0.25, log=lambda m: None)
    summary = json.dumps({k: r[k] for k in ("mismatches", "http_5xx", "status_counts", "checks", "examples")}, default=str)
    assert r["passed"], summary
    assert r["answered_ok"] == 200 and r["mismatches"] == 0 and r["http_5xx"] == 0, summary
    assert r["retries_429"] > 0 and r["max_waiting_seen"] <= 4, summary  # backpressure really happened, bounded
    assert r["engine_after"]["cache_evictions"] > 0, summary  # slots were reused across tenants
    # prompts repeated on an adapter took their prefix from the prefix cache, while slots were rewritten under it
    assert r["engine_after"]["prefix_cache_hits"] > 0, summary
    # evicted adapters came back from host memory (no store fetch) and their answers still matched
    assert r["engine_after"]["host_cache_hits"] > 0, summary
    # prompts longer than 8 tokens arriving while others decoded were prefilled in chunks, and still matched
    assert r["engine_after"]["prefill_chunks"] > 0, summary
    # request-time merges (one TIES where a pair allows it, linear otherwise) answered as their references too
    assert len(r["merges"]) == 4 and r["merged_requests"] >= 20 and "linear" in r["merges"].values(), summary
    # decode steps speculated (every running row, up to max_batch), drafts kept, and every answer still matched
    assert r["engine_after"]["spec_accepted_tokens"] > 0, summary
    # requests carrying predicted outputs (their answers exactly, or edited) drafted from them, kept some, and
    # still answered exactly their references (counted in answered_ok above)
    assert r["predicted"] >= 30 and r["prediction_tokens_kept"] > 0, summary
    assert r["faults_injected"]["client_disconnects"] == 8 and r["bad_uploads_accepted"] == 0, summary
