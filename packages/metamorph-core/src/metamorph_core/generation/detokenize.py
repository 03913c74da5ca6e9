"""Incremental detokenisation of generated text, with stop strings.

Decoding one token at a time is wrong for byte-level and SentencePiece tokenizers: a character
can span tokens and a leading space depends on the token before. :class:`IncrementalText`
decodes a short window of recent ids and shows only text that no later token can change, and
holds back any tail that could still become a stop string, so streamed pieces never have to be
taken back. Generated images split the text into segments: the window restarts after each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from metamorph_core.conversation import IMAGE_PLACEHOLDER


class IncrementalText:
    """One sample's generated text. :meth:`push` a token id, :meth:`push_image` where an image
    starts, :meth:`finish` at the end; each returns the text piece that became final (maybe
    ``""``). Once a stop string appears, :attr:`stopped` is set and the text is cut before it.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.text = ""  # everything final so far, stop-string tails included
        self.shown = 0  # how much of ``text`` has been returned
        self.stopped = False
        self._ids: list[int] = []  # the current segment's ids
        self._prefix = 0  # the decoding window starts here ...
        self._read = 0  # ... and the text of ids[_prefix:_read] is already in ``text``

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add a generated text token."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        # An unfinished character shows as U+FFFD; a character has at most 4 bytes, so a
        # replacement still there after 4 more tokens is in the text for good.
        pending = len(self._ids) - self._read
        if after.endswith("\ufffd") and pending < 4:
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return self._add(after[len(before) :])

    def push_image(self) -> str:
        """An image starts here: the text so far is final, then comes :data:`IMAGE_PLACEHOLDER`."""
        return self._add(self._flush_window() + IMAGE_PLACEHOLDER)

    def finish(self) -> str:
        """No more tokens: whatever is still held back becomes final."""
        out = self._add(self._flush_window()) + self.text[self.shown :]
        self.shown = len(self.text)
        return out

    def _flush_window(self) -> str:
        """The not yet final text of the current segment; a new segment starts."""
        before = self._decode(self._ids[self._prefix : self._read])
        rest = self._decode(self._ids[self._prefix :])[len(before) :]
        self._ids, self._prefix, self._read = [], 0, 0
        return rest

    def _add(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        start = self.shown
        hits = [k for k in (self.text.find(s, start) for s in self.stop) if k >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            end = len(self.text)
        else:
            end = len(self.text) - self._held_back()
        out, self.shown = self.text[start:end], end
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        return max(
            (
                n
                for s in self.stop
                for n in range(min(len(s) - 1, len(self.text)), 0, -1)
                if self.text.endswith(s[:n])
            ),
            default=0,
        )
