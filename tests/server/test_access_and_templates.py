"""vLLM's serving options on the real server: an API key on the OpenAI routes, CORS for the
origins allowed, and a chat template given at start-up."""

from __future__ import annotations

import httpx
import pytest
from transformers import AutoTokenizer

from ocula.config import resolve_chat_template
from tests.helpers.server import start_server

KEY = "sk-test-key"
ORIGIN = "http://app.example"
TEMPLATE = "CUSTOM{% for m in messages %} [{{ m.role }}] {{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("guarded")
    template_file = folder / "template.jinja"
    template_file.write_text(TEMPLATE)
    flags = ("--api_key", KEY, "--allowed_origins", ORIGIN, "--chat_template", str(template_file))
    running = start_server(tiny_checkpoint("llama"), folder, *flags)
    yield running
    assert running.stop() == 0, running.log()


def test_the_openai_routes_need_the_key_and_the_others_do_not(guarded) -> None:
    missing = httpx.get(guarded.url + "/v1/models")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "authentication_error"
    wrong = httpx.get(guarded.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    good = httpx.get(guarded.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert good.status_code == 200
    body = {"inputs": "fox", "parameters": {"max_new_tokens": 1}}
    assert httpx.post(guarded.url + "/generate", json=body, timeout=60).status_code == 200
    assert httpx.get(guarded.url + "/health").status_code == 200


def test_cors_answers_the_allowed_origin_only(guarded) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    allowed = httpx.options(guarded.url + "/v1/chat/completions", headers=preflight)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(
        guarded.url + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"}
    )
    assert "access-control-allow-origin" not in other.headers


def test_the_chat_template_given_at_start_up_formats_the_messages(guarded, tiny_checkpoint) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint("llama")))
    expected = tokenizer.encode("CUSTOM [user] fox", add_special_tokens=False)
    reply = httpx.post(
        guarded.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "fox"}], "max_tokens": 1},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens"] == len(expected)


def test_an_inline_template_of_any_length_is_taken_as_it_is(tmp_path) -> None:
    long_template = "{% for m in messages %}" + "x" * 5000 + "{{ m.content }}{% endfor %}"
    assert resolve_chat_template(long_template) == long_template
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    assert resolve_chat_template(str(tmp_path / "t.jinja")) == TEMPLATE
    with pytest.raises(ValueError, match="--chat_template: cannot read"):
        resolve_chat_template("x" * 300)  # neither a template nor a readable file
