"""Generated ids -> text, piece by piece, for streaming: never half a character, never half a grapheme
cluster, never the start of a stop string that may still complete.

Each step extends the text of the generation so far (the tokenizer's own decoder: byte fallback,
byte-level, metaspace) by decoding only its last few ids again (`_decoded`: the cost of a token stays
constant, where decoding everything each step grew with the square of the length), and emits what lies
beyond the text already emitted, less what may still change:
- a trailing U+FFFD: the bytes of a character split over tokens (`<0xE0><0xA4>` of ह) are not done;
- the last grapheme cluster (the `regex` package's \\X, Unicode's extended grapheme clusters with the
  Indic conjunct rule): the next token may extend it — a virama and a consonant turn क into क्ष, a
  vowel sign turns it into कि, a zero-width joiner glues emoji together;
- a tail that is the beginning of a stop string.
At the end (`finish`) everything left is emitted, cut before a stop string.
"""

from __future__ import annotations

import regex

CLUSTER = regex.compile(r"\X")
INCOMPLETE = "\ufffd"
# Ids decoded again before the new ones: context for the decoder (a byte-fallback character spans at
# most 4 byte tokens; a metaspace decoder treats only the first id of a call differently, in both calls).
CONTEXT_IDS = 8


class TextStream:
    """Text of one generation; `add(token_id)` returns the text that is now final (maybe "")."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False  # a stop string was written: the text ends before it
        self.text = ""  # the decoded generation, cut before a stop string once one appears
        self.anchor = 0  # the text of ids[:anchor] is final (`anchor_text`): later ids only add to it
        self.anchor_text = ""
        # Byte-fallback tokens decode as one run: a run that is not valid UTF-8 yet shows every byte of
        # it as U+FFFD, a finished character before the open one included; so the anchor never sits
        # inside a run.
        self.byte_ids = frozenset(getattr(tokenizer, "byte_ids", None) or ())

    def add(self, token_id: int) -> str:
        """Take one generated token; the newly final text. After a stop string, nothing more."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        self.text = self._decoded()
        if self._cut_at_stop():
            return self._emit(len(self.text))
        safe = len(self.text.rstrip(INCOMPLETE))
        if safe:
            last = None
            for last in CLUSTER.finditer(self.text, min(len(self.emitted), safe), safe):
                pass
            safe = last.start() if last is not None else safe  # the last cluster may still grow
        safe = min(safe, len(self.text) - self._stop_prefix_length())
        return self._emit(safe)

    def _decoded(self) -> str:
        """tokenizer.decode(self.ids), decoding again only CONTEXT_IDS ids before the anchor and those
        after it; a decoder whose output for the window does not extend its output for the context
        (it rewrote earlier text) gets the whole generation decoded instead."""
        start = max(0, self.anchor - CONTEXT_IDS)
        context = self.tokenizer.decode(self.ids[start:self.anchor]) if self.anchor > start else ""
        window = self.tokenizer.decode(self.ids[start:])
        if window.startswith(context) and not context.endswith(INCOMPLETE):
            text = self.anchor_text + window[len(context):]
        else:
            text = self.tokenizer.decode(self.ids)
        if not text.endswith(INCOMPLETE) and self.ids[-1] not in self.byte_ids:
            self.anchor, self.anchor_text = len(self.ids), text  # the next ids add to this text
        return text

    def finish(self) -> str:
        """The generation ended: the rest of the text (a trailing U+FFFD stays: those bytes never completed)."""
        return self._emit(len(self.text))

    def _cut_at_stop(self) -> bool:
        if not self.stop:
            return False
        longest = max(len(s) for s in self.stop)
        start = max(0, len(self.emitted) - longest + 1)
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not found:
            return False
        self.text = self.text[:min(found)]
        self.stopped = True
        return True

    def _stop_prefix_length(self) -> int:
        """Length of the longest tail of the text that a stop string begins with."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, end: int) -> str:
        if end <= len(self.emitted) or not self.text.startswith(self.emitted):
            # (a decoder that rewrote text already emitted: what went out stays; nothing new until it agrees)
            return ""
        piece = self.text[len(self.emitted):end]
        self.emitted = self.text[:end]
        return piece
