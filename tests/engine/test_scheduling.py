"""Chunked prefill, prefix-cache hits and preemption change how tokens are computed, never which."""

from __future__ import annotations

import logging

import pytest

from ocula import LLM, SamplingParams
from ocula.engine import engine_core
from ocula.engine.engine_core import EngineCore
from ocula.engine.request import Request
from tests.engine.conftest import PROMPTS, reference_continuations

GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
SHARED_PREFIX = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
PREFIXED_PROMPTS = [SHARED_PREFIX + tail for tail in ("boxing", "matches", "the old library")]


def assert_kv_idle(core: EngineCore) -> None:
    """Every slot is free or held, unreferenced, by the prefix cache; evicting frees them all."""
    cache = core.prefix_cache
    assert cache.protected_size == 0
    assert core.allocator.num_free + cache.evictable_size == core.allocator.capacity
    cache.evict(cache.evictable_size)
    assert core.allocator.num_free == core.allocator.capacity


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def expected(llama):
    return reference_continuations(llama, [*PROMPTS, *PREFIXED_PROMPTS], GREEDY.max_new_tokens)


@pytest.mark.parametrize(
    "engine_args",
    [
        {"disable_chunked_prefill": True, "disable_dynamic_prompt_cache": True},
        {"chunked_prefill_size": 3, "disable_dynamic_prompt_cache": True},
        {"chunked_prefill_size": 3, "batch_max_tokens": 5},
        {"chunked_prefill_size": 7},
    ],
    ids=["whole-prompts", "chunks-of-3", "chunks-of-3-budget-5", "chunks-with-cache"],
)
def test_chunked_prefill_gives_the_same_tokens(llama, expected, engine_args) -> None:
    llm = LLM(str(llama), max_total_token_num=1024, **engine_args)
    outputs = llm.generate([*PROMPTS, *PREFIXED_PROMPTS], GREEDY)
    assert [out.token_ids for out in outputs] == expected
    assert_kv_idle(llm.engine.core)


def test_prefix_cache_hits_give_the_same_tokens(llama, expected) -> None:
    llm = LLM(str(llama), max_total_token_num=1024, chunked_prefill_size=16)
    prompts = [*PROMPTS, *PREFIXED_PROMPTS]
    first = llm.generate(prompts, GREEDY)
    assert [out.token_ids for out in first] == expected
    # The same prompts again: everything but the last prompt token comes from the cache.
    second = llm.generate(prompts, GREEDY)
    assert [out.token_ids for out in second] == expected
    for out in second:
        assert out.num_cached_tokens == out.prompt_tokens - 1
    # Prompts sharing only a prefix, one after the other: the shared part is reused.
    fresh = LLM(str(llama), max_total_token_num=1024)
    fresh.generate(PREFIXED_PROMPTS[0], GREEDY)
    out = fresh.generate(PREFIXED_PROMPTS[1], GREEDY)[0]
    shared = len(fresh.tokenizer.encode(SHARED_PREFIX)) - 1
    assert out.num_cached_tokens >= shared
    assert out.token_ids == expected[len(PROMPTS) + 1]
    assert fresh.engine.stats().prefix_cache_hit_rate > 0
    assert_kv_idle(fresh.engine.core)


def test_concurrent_requests_share_a_prompt_once_its_prefill_is_done(llama, expected) -> None:
    llm = LLM(str(llama), max_total_token_num=1024)
    engine = llm.engine
    engine.add_request("first", PREFIXED_PROMPTS[0], GREEDY)
    # The step that applies the first token (one step after the prefill with overlap
    # scheduling) sends it before caching the prompt; the next plan caches it before it admits
    # anything, so a request added right after that token still shares the whole prompt.
    (first,) = engine.core.scheduler.requests.values()
    while first.num_computed_tokens < first.num_prompt_tokens:
        engine.step()
    assert engine.core.prefix_cache.total_size == 0
    engine.add_request("second", PREFIXED_PROMPTS[0], GREEDY)
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            done[output.request_id] = output
    assert done["second"].num_cached_tokens == done["second"].prompt_tokens - 1
    assert done["first"].token_ids == done["second"].token_ids == expected[len(PROMPTS)]
    assert_kv_idle(engine.core)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_preemption_recomputes_without_losing_requests(llama, expected, prefix_cache) -> None:
    # 7 requests of ~20-30 tokens each can never all be resident in 80 slots.
    llm = LLM(
        str(llama),
        max_total_token_num=80,
        chunked_prefill_size=8,
        disable_dynamic_prompt_cache=not prefix_cache,
    )
    outputs = llm.generate([*PROMPTS, *PREFIXED_PROMPTS], GREEDY)
    assert [out.token_ids for out in outputs] == expected
    assert llm.engine.stats().num_preemptions > 0
    assert_kv_idle(llm.engine.core)


def test_abort_releases_kv_of_running_and_waiting_requests(llama) -> None:
    llm = LLM(str(llama), max_total_token_num=256, running_max_req_size=2)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_new_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert len(engine.core.scheduler.running) == 2 and len(engine.core.scheduler.waiting) == 2
    for i in range(len(PROMPTS)):
        engine.abort_request(f"r{i}")
    assert not engine.has_unfinished_requests()
    assert not engine.core.has_unfinished()
    engine.step()  # lets the runner drop the aborted requests' sampling state
    assert not engine.core.runner.sampling._states
    assert_kv_idle(engine.core)


def test_requests_that_can_never_fit_are_refused_with_a_reason(llama) -> None:
    llm = LLM(str(llama), max_total_token_num=64, max_req_total_len=40)
    long_prompt = " ".join(["fox"] * 45)
    with pytest.raises(ValueError, match="max_req_total_len"):
        llm.generate(long_prompt, GREEDY)
    with pytest.raises(ValueError, match="max_req_total_len"):
        llm.generate("fox", SamplingParams(max_new_tokens=40))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm.generate("fox", SamplingParams(max_new_tokens=0))
    small_pool = LLM(str(llama), max_total_token_num=16)
    with pytest.raises(ValueError, match="KV cache"):
        small_pool.generate("fox", SamplingParams(max_new_tokens=20))
    assert not llm.engine.has_unfinished_requests()


def test_request_counters_after_a_run(llama) -> None:
    llm = LLM(str(llama), max_total_token_num=256)
    core = llm.engine.core
    request = Request("solo", llm.tokenizer.encode(PROMPTS[1]), GREEDY, frozenset())
    core.add_request(request)
    while core.has_unfinished():
        core.step()
    assert request.num_output_tokens == GREEDY.max_new_tokens
    assert request.finish_reason.value == "length"
    # The step that finished it keeps its KV until its outputs are sent (the engine loop's
    # call), so that releasing it does not delay the last token.
    assert request.table_row is not None
    core.release_finished()
    assert request.table_row is None and request.prefix_node is None


def test_slow_steps_are_logged(llama, caplog, monkeypatch) -> None:
    monkeypatch.setattr(engine_core, "SLOW_STEP_SECONDS", 0.0)  # every step counts as slow
    llm = LLM(str(llama), max_total_token_num=1024)
    with caplog.at_level(logging.WARNING, logger=engine_core.__name__):
        llm.generate(PROMPTS[0], GREEDY)
    messages = [r.getMessage() for r in caplog.records if r.name == engine_core.__name__]
    prompt_tokens = len(llm.tokenizer.encode(PROMPTS[0]))
    assert any(f"1 sequence(s), {prompt_tokens} new token(s)" in m for m in messages), messages
