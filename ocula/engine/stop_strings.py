"""Stop strings over streamed output text.

`StopStringMatcher` is fed the detokenized output text in pieces of any size (a piece may hold part
of a stop string, one, or several). It returns only text that can no longer become part of a stop
string, so a streaming client never sees part of a stop string, and it stops at the first one.

Contract ("first" stop string): generation stops at the earliest point of the text where some stop
string has just been completed, i.e. the occurrence with the smallest end position; among stop
strings that end there, the longest wins. The emitted text is cut at the start of that occurrence,
or after its end with `include_stop_str_in_output`. This does not depend on how the text is split
into pieces. Only the output is searched: the prompt is never fed, so it never matches.

Each stop string is followed by a Knuth-Morris-Pratt automaton whose state is the length of the
longest suffix of the text fed so far that is a prefix of the string: amortized O(1) work per
character and stop string, and O(length) memory per string (its failure table, shared by every
matcher through a cache), whatever the strings (a client's 100,000-character stop string once
took gigabytes when every prefix was kept).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence


@functools.lru_cache(maxsize=256)
def failure_table(pattern: str) -> tuple[int, ...]:
    """table[i]: length of the longest proper prefix of pattern[: i + 1] that is also its suffix."""
    table = [0] * len(pattern)
    matched = 0
    for i in range(1, len(pattern)):
        while matched and pattern[i] != pattern[matched]:
            matched = table[matched - 1]
        if pattern[i] == pattern[matched]:
            matched += 1
        table[i] = matched
    return tuple(table)


class StopStringMatcher:
    """Finds stop strings in streamed text and withholds text that may still start one.

    `feed(new_text)` returns `(emit_text, stopped)`. While not stopped, the held-back tail is the
    longest suffix of the text seen that is a proper prefix of some stop string, so it is shorter
    than the longest stop string. Once stopped, feed returns ("", True) and flush returns "".
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        # Empty stop strings are ignored: they would match before any output.
        self._stop_strings = tuple(dict.fromkeys(s for s in stop if s))
        self._tables = [failure_table(s) for s in self._stop_strings]
        self._states = [0] * len(self._stop_strings)  # matched prefix length per stop string
        self._include_stop_str = include_stop_str_in_output
        self._held_text = ""
        self._matched_stop: str | None = None

    @property
    def stopped(self) -> bool:
        """True once a stop string has been found."""
        return self._matched_stop is not None

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the output, or None (OpenAI's `stop_reason`)."""
        return self._matched_stop

    @property
    def held_text(self) -> str:
        """Text fed but not emitted yet because it may be the start of a stop string."""
        return self._held_text

    def feed(self, new_text: str, may_stop: bool = True) -> tuple[str, bool]:
        """Add output text; return the text safe to emit now and whether a stop string was hit.
        With `may_stop` false (the output is still short of min_new_tokens) a stop string that
        ends in `new_text` is passed over, but the text still advances the automata: a stop
        string that starts there and ends in a later piece is found."""
        if self._matched_stop is not None:
            return "", True
        if not self._stop_strings:
            return new_text, False
        text = self._held_text + new_text
        offset = len(self._held_text)  # the automata have consumed text[:offset]
        for position in range(offset, len(text)):
            completed = self._advance(text[position])
            if completed is not None and may_stop:
                self._matched_stop = completed
                self._held_text = ""
                end = position + 1 if self._include_stop_str else position + 1 - len(completed)
                return text[:end], True
        num_held = max(self._states)
        self._held_text = text[len(text) - num_held :]
        return text[: len(text) - num_held], False

    def flush(self) -> str:
        """At a finish that is not a stop string (EOS, length): release the held-back tail."""
        released, self._held_text = self._held_text, ""
        self._states = [0] * len(self._stop_strings)
        return "" if self._matched_stop is not None else released

    def _advance(self, char: str) -> str | None:
        """Feeds one character to every automaton; returns the longest stop string it
        completes, if any."""
        completed: str | None = None
        states = self._states
        for index, stop_string in enumerate(self._stop_strings):
            matched = states[index]
            table = self._tables[index]
            while matched and stop_string[matched] != char:
                matched = table[matched - 1]
            if stop_string[matched] == char:
                matched += 1
            if matched == len(stop_string):
                if completed is None or len(stop_string) > len(completed):
                    completed = stop_string
                matched = table[matched - 1]
            states[index] = matched
        return completed
