"""Incremental detokenizing with stop strings.

Text is released only when it is valid UTF-8 and cannot be the start of a stop string, so a
client never sees half a character or the beginning of a stop sequence it asked us to hide.
"""

from __future__ import annotations

from typing import Protocol


class Decodes(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class Detokenizer:
    # Tokens of context decoded before the new ones, so that byte-level BPE merges and
    # leading-space rules come out as they would in a full decode.
    CONTEXT_TOKENS = 6

    def __init__(self, tokenizer: Decodes, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window
        self.read_offset = 0  # tokens before this are already in `text`
        self.text = ""  # all text decoded so far (valid UTF-8)
        self.num_released = 0  # chars of `text` handed to the client
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """Feed tokens; return the newly releasable text ('' while held back)."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        self._decode_new()
        return self._release(final=False)

    def flush(self) -> str:
        """The end of generation: release whatever is held back (there is no stop match)."""
        if self.stopped:
            return ""
        self._decode_new(force=True)
        return self._release(final=True)

    def _decode_new(self, force: bool = False) -> None:
        before = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if not force and (after.endswith("\ufffd") or len(after) < len(before)):
            return  # an incomplete UTF-8 sequence: wait for the next token
        self.text += after[len(before) :]
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - self.CONTEXT_TOKENS, 0)

    def _release(self, final: bool) -> str:
        if self.stop:
            # a match may start in already-released text's last chars only if it was held back,
            # so searching from num_released is enough
            hit = self._find_stop()
            if hit is not None:
                self.stopped = True
                out = self.text[self.num_released : hit]
                self.num_released = hit
                return out
        end = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self.num_released : end]
        self.num_released = max(self.num_released, end)
        return out

    def _find_stop(self) -> int | None:
        hits = [i for s in self.stop if (i := self.text.find(s, self.num_released)) >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of unreleased text that is a proper prefix of a stop string."""
        tail = self.text[self.num_released :]
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(tail)), longest, -1):
                if tail.endswith(s[:n]):
                    longest = n
                    break
        return longest
