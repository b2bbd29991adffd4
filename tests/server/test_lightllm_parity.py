"""LightLLM's `/generate` parameters as its current release reads them, on the real server: the
room-filling `max_new_tokens`, `min_new_tokens` counting the ending token, `seed: -1`,
`logit_bias` keys as bans, `disable_prompt_cache`, the keys LightLLM sends for its own routing,
`multimodal_params.audios`, LightLLM's tuning flags, the error body's top-level message and
LightLLM's Prometheus series."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ocula.sampling.params import SamplingParams
from ocula.server.async_engine import RequestError
from ocula.server.lightllm_sampling import DEFAULT_MAX_NEW_TOKENS, to_sampling_params
from ocula.server.protocol_lightllm import GenerateParameters
from tests.helpers.server import RunningServer, start_server
from tests.server.test_generate_api import PROMPT, generate, offline

LIMIT = 64  # --max_req_total_len of this module's server: a room-filling answer stays short


# LightLLM's tuning flags, accepted without effect (server/lightllm_flags.py).
TUNING_FLAGS = (
    "--router_max_wait_tokens",
    "4",
    "--visual_gpu_ids",
    "0",
    "1",
    "--llm_decode_att_backend",
    "fa3",
    "--disable_custom_allreduce",
    "--zmq_mode",
    "tcp://",
    "--graph_split_batch_size",
    "32",  # LightLLM's default: not named in the log
    "--run_mode",
    "normal",  # the one value accepted: not named either
    "--metric_gateway",
    "127.0.0.1:9091",
    "--grouping_key",
    "team=vision",
    "--grouping_key",
    "zone=a",
)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory) -> Iterator[RunningServer]:
    flags = ("--max_total_token_num", "2048", "--max_req_total_len", str(LIMIT), *TUNING_FLAGS)
    running = start_server(tiny_checkpoint("llama"), tmp_path_factory.mktemp("logs"), *flags)
    yield running
    assert running.stop() == 0, running.log()


def test_lightllm_tuning_flags_are_named_in_the_log(server) -> None:
    line = next(line for line in server.log().splitlines() if "without effect" in line)
    named = "--router_max_wait_tokens, --llm_decode_att_backend, --disable_custom_allreduce"
    assert named in line and "--visual_gpu_ids" in line and "--zmq_mode" in line
    assert "--graph_split_batch_size" not in line and "--run_mode" not in line
    assert "--metric_gateway" in line and "--grouping_key" in line


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/generate", json=body, timeout=120)


def mapped(**parameters) -> SamplingParams:
    body = GenerateParameters.model_validate(parameters)
    return to_sampling_params(body, None, 601, {}, want_logprobs=False)


def test_max_new_tokens_fills_the_room_the_prompt_leaves(server, llm) -> None:
    prompt_len = len(llm.tokenizer.encode(PROMPT))
    room = LIMIT - prompt_len
    unset = generate(server, PROMPT, do_sample=False, ignore_eos=True)
    assert unset["count_output_tokens"] == room and unset["finish_reason"] == "length"
    # Past the room: lowered to it, as LightLLM does, not refused.
    over = generate(server, PROMPT, do_sample=False, ignore_eos=True, max_new_tokens=10**6)
    assert over["count_output_tokens"] == room
    assert over["generated_text"] == unset["generated_text"]
    reference = offline(llm, PROMPT, temperature=0, max_new_tokens=room, ignore_eos=True)[0]
    assert unset["generated_text"] == [reference.text]
    # A prompt that leaves no room is refused, naming the limit.
    full = post(server, {"inputs": list(range(1, LIMIT + 1))})
    assert full.status_code == 400
    assert "--max_req_total_len" in full.json()["error"]["message"]
    assert mapped().max_new_tokens == DEFAULT_MAX_NEW_TOKENS  # lowered once the prompt is known


def test_min_new_tokens_counts_the_token_that_ends_the_output(server) -> None:
    # From the second token on, the decay penalty makes EOS the greedy choice...
    eager = [0, 1e9]
    early = generate(server, PROMPT, do_sample=False, exponential_decay_length_penalty=eager)
    assert early["count_output_tokens"] == 2 and early["finish_reason"] == "stop"
    # ...and min_new_tokens=N lets EOS be the N-th token (LightLLM's count includes it).
    held = generate(
        server, PROMPT, do_sample=False, exponential_decay_length_penalty=eager, min_new_tokens=5
    )
    assert held["count_output_tokens"] == 5 and held["finish_reason"] == "stop"
    assert mapped(min_new_tokens=5).min_new_tokens == 4
    assert mapped(min_new_tokens=1).min_new_tokens == 0 == mapped(min_new_tokens=0).min_new_tokens
    with pytest.raises(RequestError, match="min_new_tokens"):
        mapped(min_new_tokens=20, max_new_tokens=10)


def test_seed_minus_one_is_a_random_seed(server) -> None:
    assert mapped(seed=-1).seed is None and mapped(seed=7).seed == 7
    sampled = [
        generate(server, PROMPT, do_sample=True, temperature=5.0, seed=-1, max_new_tokens=12)
        for _ in range(3)
    ]
    assert len({result["generated_text"][0] for result in sampled}) > 1
    seeded = [
        generate(server, PROMPT, do_sample=True, temperature=5.0, seed=3, max_new_tokens=12)
        for _ in range(2)
    ]
    assert seeded[0]["generated_text"] == seeded[1]["generated_text"]


def test_logit_bias_keys_are_never_sampled(server) -> None:
    reference = generate(server, PROMPT, do_sample=False, max_new_tokens=8, return_details=True)
    first = reference["tokens"][0]["id"]
    # The value does not matter (LightLLM bans every key), even a positive one.
    banned = generate(
        server,
        PROMPT,
        do_sample=False,
        max_new_tokens=8,
        return_details=True,
        logit_bias={str(first): 5.0},
    )
    assert first not in [token["id"] for token in banned["tokens"]]
    assert mapped(logit_bias={"5": 1, " 7": -100}).banned_token_ids == [5, 7]
    bad_keys = [({"x": 1}, "token ids"), ({"601": 1}, "outside"), ({"²": 1}, "ids")]
    bad_keys += [({"-5": 1}, "token ids"), ({"1" * 5000: 1}, "token ids")]  # int() refuses 5,000
    for bias, fragment in bad_keys:
        response = post(server, {"inputs": PROMPT, "parameters": {"logit_bias": bias}})
        message = response.json()["error"]["message"]
        assert response.status_code == 400 and fragment in message and "logit_bias" in message


def test_logit_bias_that_bans_every_allowed_token_is_refused(server) -> None:
    parameters = {"allowed_token_ids": [5, 6], "logit_bias": {"5": 0, "6": 0}}
    response = post(server, {"inputs": PROMPT, "parameters": parameters})
    assert response.status_code == 400
    assert "every token of allowed_token_ids" in response.json()["error"]["message"]


def test_disable_prompt_cache_computes_the_whole_prompt(server) -> None:
    prompt = "a prompt for the prefix cache " * 2

    def cached_tokens(**parameters) -> int:
        result = generate(server, prompt, max_new_tokens=2, return_details=True, **parameters)
        return result["tokens"][0]["prompt_cache_len"]

    cached_tokens()
    assert cached_tokens() > 0
    assert cached_tokens(disable_prompt_cache=True) == 0


def test_lightllm_routing_keys_and_empty_audios_are_accepted(server) -> None:
    body = {
        "inputs": PROMPT,
        "parameters": {"max_new_tokens": 2, "group_request_id": 7, "suggested_dp_index": -1},
        "multimodal_params": {"images": [], "audios": [], "skip_image_cache": False},
    }
    assert post(server, body).status_code == 200
    body["multimodal_params"]["audios"] = [{"type": "base64", "data": "AAAA"}]
    response = post(server, body)
    assert response.status_code == 400 and "audios" in response.json()["error"]["message"]
    # LightLLM's clients read the message at the top level.
    assert response.json()["message"] == response.json()["error"]["message"]


def lightllm_series(server) -> dict[str, float]:
    """LightLLM's series of /metrics, by name (each has the one model_name label)."""
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("lightllm_") and "le" not in sample.labels:
                assert set(sample.labels) == {"model_name"}
                values[sample.name] = sample.value
    return values


def test_lightllm_metrics_count_requests_tokens_and_latencies(server) -> None:
    before = lightllm_series(server)
    result = generate(server, PROMPT, do_sample=False, max_new_tokens=5, ignore_eos=True)
    after = lightllm_series(server)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grew("lightllm_request_count_total") == grew("lightllm_request_success_total") == 1
    assert grew("lightllm_request_failure_total") == 0
    assert grew("lightllm_generation_tokens_total") == 5
    assert grew("lightllm_request_generated_tokens_sum") == 5
    assert grew("lightllm_prompt_tokens_total") == result["prompt_tokens"]
    assert grew("lightllm_request_input_length_sum") == result["prompt_tokens"]
    for name in ("first_token_duration", "duration", "mean_time_per_token_duration"):
        assert grew(f"lightllm_request_{name}_count") == 1
    assert (
        0
        < grew("lightllm_request_first_token_duration_sum")
        <= grew("lightllm_request_duration_sum")
    )
    for gauge in ("num_running_reqs", "batch_current_size", "queue_size", "cache_hit_rate"):
        assert f"lightllm_{gauge}" in after
