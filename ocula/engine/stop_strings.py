"""Stop strings over streamed output text.

`StopStringMatcher` is fed the detokenized output text in pieces of any size (a piece may hold part
of a stop string, one, or several). It returns only text that can no longer become part of a stop
string, so a streaming client never sees part of a stop string, and it stops at the first one.

Contract ("first" stop string): generation stops at the earliest point of the text where some stop
string has just been completed, i.e. the occurrence with the smallest end position; among stop
strings that end there, the longest wins. The emitted text is cut at the start of that occurrence,
or after its end with `include_stop_str_in_output`. This does not depend on how the text is split
into pieces. Only the output is searched: the prompt is never fed, so it never matches.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Finds stop strings in streamed text and withholds text that may still start one.

    `feed(new_text)` returns `(emit_text, stopped)`. While not stopped, the held-back tail is the
    longest suffix of the text seen that is a proper prefix of some stop string, so it is shorter
    than the longest stop string, and each feed searches only the held tail plus the new text.
    Once stopped, feed returns ("", True) and flush returns "".
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        # Empty stop strings are ignored: they would match before any output.
        self._stop_strings = tuple(dict.fromkeys(s for s in stop if s))
        # Proper prefixes of the stop strings, grouped by their last character, longest first:
        # the held tail must end with the text's last character, so only that group is checked.
        self._prefixes_by_last_char: dict[str, list[str]] = {}
        for prefix in sorted(
            {s[:n] for s in self._stop_strings for n in range(1, len(s))}, key=len, reverse=True
        ):
            self._prefixes_by_last_char.setdefault(prefix[-1], []).append(prefix)
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

    def feed(self, new_text: str) -> tuple[str, bool]:
        """Add output text; return the text safe to emit now and whether a stop string was hit."""
        if self._matched_stop is not None:
            return "", True
        if not self._stop_strings:
            return new_text, False
        text = self._held_text + new_text
        match = self._first_match(text)
        if match is not None:
            start, stop_string = match
            self._matched_stop = stop_string
            self._held_text = ""
            end = start + len(stop_string) if self._include_stop_str else start
            return text[:end], True
        num_held = self._longest_partial_stop_suffix(text)
        self._held_text = text[len(text) - num_held :]
        return text[: len(text) - num_held], False

    def flush(self) -> str:
        """At a finish that is not a stop string (EOS, length): release the held-back tail."""
        released, self._held_text = self._held_text, ""
        return "" if self._matched_stop is not None else released

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the occurrence that ends first in `text`; longest on a tie."""
        best: tuple[int, int, str] | None = None  # (end, -length, stop string)
        for stop_string in self._stop_strings:
            start = text.find(stop_string)  # the first occurrence of one string also ends first
            if start >= 0:
                candidate = (start + len(stop_string), -len(stop_string), stop_string)
                if best is None or candidate < best:
                    best = candidate
        if best is None:
            return None
        end, _, stop_string = best
        return end - len(stop_string), stop_string

    def _longest_partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for prefix in self._prefixes_by_last_char.get(text[-1:], ()):
            if text.endswith(prefix):
                return len(prefix)
        return 0
