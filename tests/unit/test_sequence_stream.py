"""SequenceStream's text: streamed token by token, or decoded once at the end (`final_only`, the
in-process engine's mode), which must give the same text, finish and stop reasons."""

from __future__ import annotations

import pytest

from ocula.engine.output_processor import SequenceStream
from ocula.engine.outputs import TokenUpdate
from ocula.engine.request import FinishReason
from ocula.sampling.params import SamplingParams

PROMPT = "<|im_start|>user\nWrite.<|im_end|>\n<|im_start|>assistant\n"
OUTPUT = "Servers stream 字节 tokens; caches remember prefixes. 🙂 Done"


def run(stream: SequenceStream, token_ids: list[int], last: TokenUpdate) -> list[str]:
    pieces = [stream.apply(TokenUpdate("r", t, None, None, None)) for t in token_ids]
    if not stream.finished:
        pieces.append(stream.apply(last))
    return pieces


@pytest.mark.parametrize(
    ("finish", "params"),
    [
        ("length", SamplingParams(max_new_tokens=64)),
        ("eos", SamplingParams(max_new_tokens=64)),
        ("eos", SamplingParams(max_new_tokens=64, print_eos_token=True)),
        ("stop_id", SamplingParams(max_new_tokens=64, stop_token_ids=[13])),
        (
            "stop_id",
            SamplingParams(max_new_tokens=64, stop_token_ids=[13], skip_special_tokens=False),
        ),
    ],
)
def test_text_decoded_at_the_end_equals_the_streamed_text(
    qwen_tokenizer, finish: str, params: SamplingParams
) -> None:
    prompt_ids = qwen_tokenizer.encode(PROMPT)
    output_ids = qwen_tokenizer.encode(OUTPUT)
    eos = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    last = {
        "length": TokenUpdate("r", output_ids[-1], None, None, FinishReason.LENGTH.value),
        "eos": TokenUpdate("r", eos, None, None, FinishReason.STOP.value),
        "stop_id": TokenUpdate("r", 13, None, None, FinishReason.STOP.value, stop_reason=13),
    }[finish]
    body = output_ids[:-1] if finish == "length" else output_ids
    streamed = SequenceStream(0, qwen_tokenizer, prompt_ids, params)
    pieces = run(streamed, body, last)
    at_end = SequenceStream(0, qwen_tokenizer, prompt_ids, params, final_only=True)
    end_pieces = run(at_end, body, last)
    assert all(piece == "" for piece in end_pieces[:-1])
    assert end_pieces[-1] == "".join(pieces) == streamed.text == at_end.text
    assert OUTPUT in at_end.text
    assert at_end.completion() == streamed.completion()


def test_stop_strings_keep_the_stream_token_by_token(qwen_tokenizer) -> None:
    params = SamplingParams(max_new_tokens=64, stop=["remember"])
    output_ids = qwen_tokenizer.encode(OUTPUT)
    stream = SequenceStream(0, qwen_tokenizer, [], params, final_only=True)
    pieces = []
    for token_id in output_ids:
        pieces.append(stream.apply(TokenUpdate("r", token_id, None, None, None)))
        if stream.finished:  # the engine then aborts the sequence in the core
            break
    assert stream.finished and stream.finish_reason == "stop" and stream.stop_reason == "remember"
    assert pieces[0] == "Servers" and stream.text == "Servers stream 字节 tokens; caches "
