"""Overlap scheduling (step n+1 planned and launched before step n's tokens reach the host) gives
exactly what the step-by-step engine gives, and leaves nothing behind.

The workload mixes every sampling feature whose state crosses steps: seeded sampling, penalties
(which make the sampler wait for the previous tokens), min_new_tokens bans, stop tokens that end
a request while its next step is already running, logprobs and several samples per request; the
KV pool is small enough to force preemptions and the prompts are chunked and share prefixes.
"""

from __future__ import annotations

import pytest

from ocula import LLM, SamplingParams
from ocula.engine.request import PLACEHOLDER_TOKEN, Request
from tests.engine.conftest import PROMPTS
from tests.engine.test_scheduling import PREFIXED_PROMPTS, assert_kv_idle

NEW_TOKENS = 10
KV_SLOTS = 48  # the requests need far more at once: preemptions
STOPPED_PROMPTS = [PROMPTS[3], PREFIXED_PROMPTS[0]]  # those of options 3 and 4 in `workload`


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    return tiny_checkpoint("llama")


def workload(stop_tokens: list[int]) -> list[tuple[str, SamplingParams]]:
    greedy = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = [*PROMPTS, *PREFIXED_PROMPTS]
    options = [
        greedy,
        SamplingParams(temperature=0.9, top_k=20, top_p=0.8, seed=7, max_new_tokens=NEW_TOKENS),
        SamplingParams(
            temperature=0.7,
            repetition_penalty=1.3,
            frequency_penalty=0.4,
            seed=3,
            max_new_tokens=NEW_TOKENS,
        ),
        SamplingParams(temperature=0, stop_token_ids=stop_tokens, max_new_tokens=NEW_TOKENS),
        SamplingParams(
            temperature=0,
            stop_token_ids=stop_tokens,
            min_new_tokens=6,
            max_new_tokens=NEW_TOKENS,
        ),
        SamplingParams(temperature=0, logprobs=3, presence_penalty=0.5, max_new_tokens=4),
        SamplingParams(temperature=1.0, n=2, seed=11, max_new_tokens=NEW_TOKENS),
    ]
    return [(prompt, options[i % len(options)]) for i, prompt in enumerate(prompts * 2)]


def run(llama, overlap: bool, stop_tokens: list[int]) -> tuple[list, list, LLM]:
    llm = LLM(
        str(llama),
        max_total_token_num=KV_SLOTS,
        chunked_prefill_size=8,
        disable_overlap_schedule=not overlap,
        seed=5,
    )
    work = workload(stop_tokens)
    ids = [f"r{i}" for i in range(len(work))]
    for request_id, (prompt, params) in zip(ids, work, strict=True):
        llm.engine.add_request(request_id, prompt, params)
    done = {}
    while llm.engine.has_unfinished_requests():
        for output in llm.engine.step():
            done[output.request_id] = output
    tokens = [[(o.token_ids, o.finish_reason) for o in done[r].outputs] for r in ids]
    logprobs = [[lp.logprob for o in done[r].outputs for lp in (o.logprobs or [])] for r in ids]
    return tokens, logprobs, llm


def test_overlap_gives_the_step_by_step_results(llama) -> None:
    probe = LLM(str(llama), max_total_token_num=256)
    greedy = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    # The 4th greedy token of the prompts that get the stop-token options ends them early.
    stop_tokens = [out.token_ids[3] for out in probe.generate(STOPPED_PROMPTS, greedy)]
    plain, plain_logprobs, plain_llm = run(llama, overlap=False, stop_tokens=stop_tokens)
    overlapped, logprobs, llm = run(llama, overlap=True, stop_tokens=stop_tokens)
    assert overlapped == plain
    # The steps batch the sequences differently (a stopped request's extra step, other
    # preemptions), and fp32 matmuls round differently with the batch: equal up to that.
    assert logprobs == [pytest.approx(row, abs=1e-5) for row in plain_logprobs]
    reasons = {reason for outputs in plain for _, reason in outputs}
    assert reasons == {"stop", "length"}  # some stopped on a token while the next step ran
    assert llm.engine.stats().num_preemptions > 0
    for engine_llm in (plain_llm, llm):
        engine_llm.engine.step()  # applies the last step in flight, drops the runner's state
        assert not engine_llm.engine.core.has_work()
        assert not engine_llm.engine.core.runner.sampling._states
        assert_kv_idle(engine_llm.engine.core)


def test_the_next_step_runs_before_the_previous_tokens_are_read(llama) -> None:
    llm = LLM(str(llama), max_total_token_num=256)
    core = llm.engine.core
    launched = []
    launch = core.runner.launch
    core.runner.launch = lambda plan: launched.append(plan) or launch(plan)
    params = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)
    request = Request("solo", llm.tokenizer.encode(PROMPTS[1]), params, frozenset())
    core.add_request(request)
    assert core.step() == []  # the prefill is launched; its token is not read yet
    first = core.step()  # the first decode is launched, then the prefill's token is read
    assert [update.request_id for update in first] == ["solo"]
    decode = launched[1].sequences[0]
    assert decode.token_ids == [PLACEHOLDER_TOKEN]  # fed from the device, not the host
    updates = [*first]
    while core.has_work():
        updates += core.step()
    assert [u.token_id for u in updates] == request.output_token_ids
    assert len(updates) == 3 and updates[-1].finish_reason == "length"
    # Prefill + 2 decodes: no step is planned past the last token the length limit allows.
    assert sum(not plan.is_empty for plan in launched) == 3
    assert_kv_idle(core)


def test_without_overlap_each_step_returns_its_own_tokens(llama) -> None:
    llm = LLM(str(llama), max_total_token_num=256, disable_overlap_schedule=True)
    core = llm.engine.core
    params = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)
    core.add_request(Request("solo", llm.tokenizer.encode(PROMPTS[0]), params, frozenset()))
    assert len(core.step()) == 1
    assert core.step()[0].finish_reason == "length"
    assert core.step() == []  # tells the runner to drop the request's state
    assert not core.has_work()


def test_abort_while_a_step_is_in_flight_frees_everything(llama) -> None:
    llm = LLM(str(llama), max_total_token_num=256)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(4):
        engine.step()
    assert engine.core.has_work()
    for i in range(len(PROMPTS)):
        engine.abort_request(f"r{i}")
    while engine.core.has_work():
        assert engine.step() == []
    assert not engine.core.runner.sampling._states
    assert_kv_idle(engine.core)


def test_an_id_reused_while_a_step_is_in_flight_gets_only_its_own_tokens(llama) -> None:
    """The aborted request's sequence in the step already launched must not reach the new
    request that took its id (whose prompt is shorter, then longer)."""
    results = {}
    for overlap in (False, True):
        llm = LLM(str(llama), max_total_token_num=256, disable_overlap_schedule=not overlap)
        core = llm.engine.core
        outputs = []
        for prompt in (PROMPTS[0], PROMPTS[2]):
            long = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
            core.add_request(Request("a", llm.tokenizer.encode(PROMPTS[1]), long, frozenset()))
            for _ in range(4):
                core.step()
            core.abort_request("a")
            params = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)
            new = Request("a", llm.tokenizer.encode(prompt), params, frozenset())
            core.add_request(new)
            updates = []
            while core.has_work():
                updates += core.step()
            assert [u.token_id for u in updates] == new.output_token_ids
            assert new.token_ids[: new.num_prompt_tokens] == llm.tokenizer.encode(prompt)
            outputs.append(new.output_token_ids)
        assert_kv_idle(core)
        results[overlap] = outputs
    assert results[True] == results[False]
    assert all(len(tokens) == 3 for tokens in results[True])
