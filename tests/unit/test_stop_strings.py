"""StopStringMatcher: cuts at the first stop string, never streams part of one."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocula.engine.detokenizer import IncrementalDetokenizer
from ocula.engine.output_processor import SequenceStream
from ocula.engine.outputs import TokenUpdate
from ocula.engine.stop_strings import StopStringMatcher
from ocula.sampling.params import SamplingParams

# Session fixtures `qwen_tokenizer` and `qwen_tokenizer_dir`, defined once for all modules.


def reference_cut(text: str, stop: list[str], include_stop_str: bool) -> tuple[str, str | None]:
    """The contract, written the slow way: scan end positions left to right; the first position at
    which some stop string ends wins (the longest one if several end there)."""
    for end in range(1, len(text) + 1):
        ending_here = [s for s in stop if s and text[:end].endswith(s)]
        if ending_here:
            stop_string = max(ending_here, key=len)
            return (text[:end] if include_stop_str else text[: end - len(stop_string)]), stop_string
    return text, None


def run_pieces(
    matcher: StopStringMatcher, pieces: list[str]
) -> tuple[str, list[str], int | None, bool]:
    """Feed pieces until stopped; return (all emitted text, emitted chunks, index of the stopping
    piece, stopped)."""
    chunks: list[str] = []
    for index, piece in enumerate(pieces):
        emitted, stopped = matcher.feed(piece)
        chunks.append(emitted)
        if stopped:
            return "".join(chunks), chunks, index, True
    chunks.append(matcher.flush())
    return "".join(chunks), chunks, None, False


def test_stop_spanning_pieces_is_held_back() -> None:
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.feed("The answer is 42<") == ("The answer is 42", False)
    assert matcher.held_text == "<"
    assert matcher.feed("/ans") == ("", False)
    assert matcher.feed("wer> and more") == ("", True)
    assert matcher.matched_stop == "</answer>"
    assert matcher.feed("ignored") == ("", True)
    assert matcher.flush() == ""


def test_partial_stop_that_does_not_complete_is_released() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("go ST") == ("go ", False)
    assert matcher.feed("OP") == ("", True)
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("go ST") == ("go ", False)
    assert matcher.feed("AY") == ("STAY", False)
    assert matcher.feed("S") == ("", False)
    assert matcher.flush() == "S"  # finish by EOS/length: the held tail is real output
    assert not matcher.stopped


def test_stop_inside_one_piece_and_at_the_very_start() -> None:
    assert StopStringMatcher(["\n\n"]).feed("line one\n\nline two") == ("line one", True)
    assert StopStringMatcher(["Q:"]).feed("Q: next question") == ("", True)
    included = StopStringMatcher(["\n\n"], include_stop_str_in_output=True)
    assert included.feed("line one\n\nline two") == ("line one\n\n", True)


def test_overlapping_candidates_first_to_complete_wins() -> None:
    # "ab" completes before "abc" could.
    assert StopStringMatcher(["abc", "ab"]).feed("xabcx") == ("x", True)
    assert StopStringMatcher(["abc", "ab"], True).feed("xabcx") == ("xab", True)
    # "bc" ends before "abcd", although "abcd" starts first.
    assert StopStringMatcher(["abcd", "bc"]).feed("abcd") == ("a", True)
    # Two stop strings ending at the same place: the longer one is cut.
    matcher = StopStringMatcher(["c", "abc"])
    assert matcher.feed("xabc") == ("x", True)
    assert matcher.matched_stop == "abc"


def test_repeated_prefix() -> None:
    """Stop "aab" in "aaab": the first "a" is output, and each "a" is released only once it can no
    longer start the stop string."""
    matcher = StopStringMatcher(["aab"])
    assert matcher.feed("a") == ("", False)
    assert matcher.feed("a") == ("", False)
    assert matcher.feed("a") == ("a", False)
    assert matcher.held_text == "aa"
    assert matcher.feed("b") == ("", True)
    included = StopStringMatcher(["aab"], include_stop_str_in_output=True)
    assert run_pieces(included, list("aaab"))[0] == "aaab"


def test_a_stop_string_that_ends_after_min_new_tokens_counts_from_before() -> None:
    """Text fed before min_new_tokens cannot stop the output, but a stop string that starts in
    it and ends later does; text that may start one is held back meanwhile."""
    matcher = StopStringMatcher(["world. Good"])
    assert matcher.feed(" Hello", may_stop=False) == (" Hello", False)
    assert matcher.feed(" world", may_stop=False) == (" ", False)  # "world" may start it
    assert matcher.feed(". Good", may_stop=True) == ("", True)
    early = StopStringMatcher(["ab"])
    assert early.feed("xab", may_stop=False) == ("xab", False)  # ended too early: passed over
    assert early.feed("cab", may_stop=True) == ("c", True)


def test_no_stop_strings_passes_text_through() -> None:
    matcher = StopStringMatcher(["", ""])
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_long_stop_strings_keep_linear_tables() -> None:
    """The matcher's memory is linear in the stop strings' length: a 16,384-character stop
    string (the most a request may send) once meant ~134 M characters of stored prefixes."""
    stop = "ab" * 8192
    matcher = StopStringMatcher([stop, "b" * 5000])
    assert [len(table) for table in matcher._tables] == [16384, 5000]
    text = "xx" + "ab" * 8191 + "a"  # the stop string but for its last character
    assert matcher.feed(text) == ("xx", False)
    assert matcher.held_text == text[2:]
    assert matcher.feed("b and more") == ("", True)  # "xx" went out before
    assert matcher.matched_stop == stop


def test_flush_forgets_the_partial_match() -> None:
    matcher = StopStringMatcher(["abc"])
    assert matcher.feed("ab") == ("", False)
    assert matcher.flush() == "ab"
    assert matcher.feed("cxyz") == ("cxyz", False)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc ", max_size=40),
    stop=st.lists(st.text(alphabet="abc ", min_size=1, max_size=4), min_size=1, max_size=3),
    cut_points=st.lists(st.integers(min_value=0, max_value=40), max_size=12),
    include_stop_str=st.booleans(),
)
def test_matches_reference_for_any_split(
    text: str, stop: list[str], cut_points: list[int], include_stop_str: bool
) -> None:
    bounds = sorted({0, len(text), *(min(cut, len(text)) for cut in cut_points)})
    pieces = [text[start:end] for start, end in itertools.pairwise(bounds)]
    expected, expected_stop = reference_cut(text, stop, include_stop_str)
    matcher = StopStringMatcher(stop, include_stop_str)
    emitted, chunks, stop_index, stopped = run_pieces(matcher, pieces)
    assert emitted == expected
    assert matcher.matched_stop == expected_stop
    assert stopped == (expected_stop is not None)
    if stopped:
        # No chunk before the stopping one contains any character of the stop string's occurrence.
        occurrence_start = len(expected) - (len(expected_stop) if include_stop_str else 0)
        assert len("".join(chunks[:stop_index])) <= occurrence_start


@pytest.mark.parametrize(
    ("stop", "include_stop_str", "expected"),
    [
        (["世界"], False, "Hello world! 你好，"),  # CJK stop, multi-byte tokens
        (["orld! 你"], False, "Hello w"),  # spans several tokens, starts inside one
        (["🎉"], True, "Hello world! 你好，世界。🎉"),  # one character over three tokens
        (["lo w"], False, "Hel"),
        (["Hello"], False, ""),  # at the very start of the output
        (["<|im_end|>"], False, "Hello world! 你好，世界。🎉 done"),  # special: skipped, no match
    ],
)
def test_with_detokenized_qwen_stream(
    qwen_tokenizer,
    stop: list[str],
    include_stop_str: bool,
    expected: str,
) -> None:
    """Detokenizer and matcher together, token by token, with the real Qwen2 vocabulary. The
    prompt ends with the stop string and is never matched."""
    prompt_ids = qwen_tokenizer.encode("Repeat after me: " + stop[0])
    output_ids = qwen_tokenizer.encode("Hello world! 你好，世界。🎉 done<|im_end|>")
    detokenizer = IncrementalDetokenizer(qwen_tokenizer, prompt_ids)
    matcher = StopStringMatcher(stop, include_stop_str)
    streamed = []
    for token_id in output_ids:
        emitted, stopped = matcher.feed(detokenizer.push([token_id]))
        assert "\ufffd" not in emitted
        streamed.append(emitted)
        if stopped:
            break
    else:
        streamed.append(matcher.feed(detokenizer.flush())[0] + matcher.flush())
    assert "".join(streamed) == expected


@pytest.mark.parametrize(("min_new_tokens", "tokens"), [(0, 4), (2, 4), (3, 4), (4, 8)])
def test_a_sequence_stops_on_a_string_that_straddles_min_new_tokens(
    qwen_tokenizer, min_new_tokens: int, tokens: int
) -> None:
    """` Hello| world|.| Good|bye|...`: "world. Good" ends on the fourth token, so it stops
    there unless min_new_tokens holds the stop strings off past it (then no later one ends)."""
    ids = qwen_tokenizer.encode(" Hello world. Goodbye now, friend")
    params = SamplingParams(
        max_new_tokens=len(ids), min_new_tokens=min_new_tokens, stop=["world. Good"]
    )
    stream = SequenceStream(0, qwen_tokenizer, [], params)
    for position, token_id in enumerate(ids):
        last = position == len(ids) - 1
        stream.apply(
            TokenUpdate("r", token_id, None, None, finish_reason="length" if last else None)
        )
        if stream.finished:
            break
    assert len(stream.token_ids) == tokens
    if tokens == 4:
        assert (stream.text, stream.finish_reason) == (" Hello ", "stop")
    else:
        assert stream.text == " Hello world. Goodbye now, friend"
