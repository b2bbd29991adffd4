"""LightLLM's /generate parameters beyond the basics, on the real server and in their mapping:
stop sequences (strings on the text, id lists on the ids), the sampler's options, and the
perplexity mode of --return_all_prompt_logprobs."""

from __future__ import annotations

import itertools

import pytest

from ocula.sampling.params import SamplingParams
from ocula.server.async_engine import RequestError
from ocula.server.lightllm_sampling import stop_conditions, to_sampling_params
from ocula.server.protocol_lightllm import GenerateParameters
from tests.helpers.server import start_server
from tests.server.test_generate_api import (
    CLIENT_STOP_SEQUENCES,
    PROMPT,
    SPECIAL_TEXTS,
    generate,
    offline,
)


def test_stop_sequences_are_strings_on_the_text_and_ids_on_the_ids(llm) -> None:
    tokenizer = llm.tokenizer
    im_end, im_start, eot = tokenizer.convert_tokens_to_ids(list(SPECIAL_TEXTS[::-1]))
    # Strings are matched on the text (LightLLM today)...
    assert stop_conditions(tokenizer, [" the quick brown", "\n"], 601) == (
        [" the quick brown", "\n"],
        [],
    )
    # ...except a special token, which never reaches the text: its id, whitespace before it
    # aside (the documented client sends " <|im_end|>").
    assert stop_conditions(tokenizer, "<|im_end|>", 601) == ([], [[im_end]])
    assert stop_conditions(tokenizer, CLIENT_STOP_SEQUENCES, 601) == (
        [],
        [[eot], [im_start], [im_end]],
    )
    # Token ids are used as given; empty sequences stop nothing.
    assert stop_conditions(tokenizer, [[im_end], [5, 6], [], ""], 601) == ([], [[im_end], [5, 6]])
    assert stop_conditions(tokenizer, [7], 601) == ([], [[7]])  # a bare list is one sequence
    with pytest.raises(RequestError, match="stop_sequences"):
        stop_conditions(tokenizer, [[601]], 601)


def test_stop_sequences_match_token_ids_and_keep_their_text(server, llm) -> None:
    """LightLLM's semantics: the output stops once it ends with a stop run of ids, and that
    run's text stays in `generated_text`."""
    reference = offline(llm, PROMPT, temperature=0, max_new_tokens=16)[0]
    ids = reference.token_ids
    # The first pair of tokens that did not occur before: the output first ends with it there.
    end = next(i for i in range(2, 16) if (ids[i - 1], ids[i]) not in itertools.pairwise(ids[:i]))
    run = ids[end - 1 : end + 1]
    result = generate(server, PROMPT, do_sample=False, max_new_tokens=16, stop_sequences=[run])
    assert result["count_output_tokens"] == end + 1
    assert result["finish_reason"] == "stop"
    head = offline(llm, PROMPT, temperature=0, max_new_tokens=end + 1)[0]
    assert result["generated_text"] == [head.text]
    assert llm.tokenizer.decode(run) in head.text
    # The same tokens' text as a string: matched on the text, which ends before it.
    stop_text = llm.tokenizer.decode(run)
    by_text = generate(
        server, PROMPT, do_sample=False, max_new_tokens=16, stop_sequences=[stop_text]
    )
    assert by_text["finish_reason"] == "stop"
    assert by_text["generated_text"][0] == head.text[: head.text.index(stop_text)]
    kept = generate(
        server,
        PROMPT,
        do_sample=False,
        max_new_tokens=16,
        stop_sequences=stop_text,
        include_stop_str_in_output=True,
    )
    assert kept["generated_text"][0].endswith(stop_text)
    # One id short of a run the output holds: it runs to its length.
    assert 600 not in ids
    result = generate(
        server, PROMPT, do_sample=False, max_new_tokens=16, stop_sequences=[[*run, 600]]
    )
    assert result["count_output_tokens"] == 16 and result["finish_reason"] == "length"


def test_lightllm_sampling_options_reach_the_sampler(server, llm) -> None:
    # allowed_token_ids: only those come out.
    allowed = generate(
        server,
        PROMPT,
        do_sample=False,
        allowed_token_ids=[11, 12],
        ignore_eos=True,
        max_new_tokens=8,
    )
    ids = llm.tokenizer.encode(allowed["generated_text"][0], add_special_tokens=False)
    assert set(ids) <= {11, 12}
    # exponential_decay_length_penalty: from the second token on EOS takes over (the gain is
    # capped, never an overflow).
    decayed = generate(
        server,
        PROMPT,
        do_sample=False,
        max_new_tokens=16,
        exponential_decay_length_penalty=[0, 1e9],
    )
    assert decayed["count_output_tokens"] == 2 and decayed["finish_reason"] == "stop"


def test_lightllm_parameters_map_onto_sampling_params(llm) -> None:
    def mapped(**parameters) -> SamplingParams:
        body = GenerateParameters.model_validate(parameters)
        return to_sampling_params(body, llm.tokenizer, 601, {}, want_logprobs=False)

    # The penalties count the output only (LightLLM), the prompt too with input_penalty.
    assert mapped().penalty_scope == "output"
    assert mapped(input_penalty=True).penalty_scope == "prompt_and_output"
    # EOS's text only with print_eos_token, a stop string's with include_stop_str_in_output (a
    # stop run's text is always kept).
    assert not mapped().print_eos_token and not mapped().include_stop_str_in_output
    assert mapped(print_eos_token=True).print_eos_token
    assert mapped(include_stop_str_in_output=True).include_stop_str_in_output
    assert mapped(allowed_token_ids=[3, 4]).allowed_token_ids == [3, 4]
    assert mapped(exponential_decay_length_penalty=[2, 1.5]).exponential_decay_length_penalty == (
        2,
        1.5,
    )
    with pytest.raises(RequestError, match="start >= 0"):
        mapped(exponential_decay_length_penalty=[-5, 1])


def test_return_all_prompt_logprobs_scores_every_prompt_token(tiny_checkpoint, tmp_path, llm):
    """LightLLM's perplexity mode: /generate adds the prompt's ids and, for each position but
    the last, [token, {next token: its logprob}]."""
    flags = ("--max_total_token_num", "2048", "--return_all_prompt_logprobs")
    scoring = start_server(tiny_checkpoint("llama"), tmp_path, *flags)
    try:
        result = generate(scoring, PROMPT, max_new_tokens=1)
    finally:
        assert scoring.stop() == 0, scoring.log()
    params = SamplingParams(temperature=0, max_new_tokens=1, prompt_logprobs=0)
    expected = llm.generate(PROMPT, params)[0]
    ids = expected.prompt_token_ids
    assert result["prompt_token_ids"] == ids
    assert len(result["prompt_logprobs"]) == len(ids) - 1
    for position, (token, scores) in enumerate(result["prompt_logprobs"]):
        assert token == ids[position]
        [(following, logprob)] = scores.items()
        assert int(following) == ids[position + 1]
        assert logprob == pytest.approx(expected.prompt_logprobs[position + 1].logprob, abs=1e-5)
