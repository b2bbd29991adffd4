"""Generated request bodies thrown at every route: the server answers each with a 2xx or a 4xx
JSON error, never a 5xx, and keeps serving (hypothesis against the live server)."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROUTES = [
    "/generate",
    "/generate_stream",
    "/",
    "/tokens",
    "/v1/chat/completions",
    "/v1/completions",
    "/tokenize",
    "/detokenize",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
# Bodies that look like real requests with wrong or extreme values, plus arbitrary JSON.
parameters = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": st.one_of(st.integers(-5, 6), json_values),
        "temperature": st.one_of(st.floats(-2, 3), json_values),
        "top_p": st.one_of(st.floats(-1, 2), json_values),
        "top_k": st.one_of(st.integers(-3, 50), json_values),
        "n": st.one_of(st.integers(-1, 3), json_values),
        "stop_sequences": json_values,
        "seed": st.one_of(st.integers(-(2**65), 2**65), json_values),
        "do_sample": json_values,
        "return_details": json_values,
        "input_penalty": json_values,
        "print_eos_token": json_values,
        "allowed_token_ids": st.one_of(st.lists(st.integers(-2, 700), max_size=4), json_values),
        "exponential_decay_length_penalty": json_values,
        "image_max_patch_num": st.one_of(st.integers(-3, 70), json_values),
    },
)
lightllm_bodies = st.fixed_dictionaries(
    {"inputs": st.one_of(st.text(max_size=40), st.lists(st.integers(-3, 10**6), max_size=6))},
    optional={"parameters": parameters, "multimodal_params": json_values},
)
openai_bodies = st.fixed_dictionaries(
    {},
    optional={
        "messages": st.one_of(
            json_values,
            st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"])},
                    optional={
                        "content": json_values,
                        "tool_calls": json_values,
                        "tool_call_id": json_values,
                    },
                ),
                max_size=3,
            ),
        ),
        "prompt": st.one_of(json_values, st.text(max_size=30)),
        "max_tokens": st.one_of(st.integers(-3, 6), json_values),
        "temperature": json_values,
        "n": st.one_of(st.integers(-1, 3), json_values),
        "stream": json_values,
        "logprobs": json_values,
        "stop": json_values,
        "model": json_values,
        "echo": json_values,
        "prompt_logprobs": st.one_of(st.integers(-1, 21), json_values),
        "allowed_token_ids": json_values,
        "tools": json_values,
        "tool_choice": json_values,
        "tokens": st.one_of(st.lists(st.integers(-2, 10**6), max_size=5), json_values),
    },
)
bodies = st.one_of(json_values, lightllm_bodies, openai_bodies)


@pytest.mark.parametrize("route", ROUTES)
def test_generated_bodies_never_get_a_server_error(server, route) -> None:
    client = httpx.Client(base_url=server.url, timeout=60)

    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        body=st.one_of(bodies.map(lambda b: json.dumps(b, allow_nan=True).encode()), st.binary())
    )
    def check(body: bytes) -> None:
        response = client.post(route, content=body)
        assert response.status_code < 500, (route, body, response.text)
        if response.status_code >= 400:
            assert "error" in response.json(), (route, body, response.text)

    check()
    assert client.get("/health").status_code == 200
    client.close()
