"""A thin wrapper over a `tokenizers` tokenizer.json."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, tok: _HFTokenizer, path: Path | None = None):
        self._tok, self.path = tok, path

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        try:
            return cls(_HFTokenizer.from_file(str(path)), Path(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path}: cannot read tokenizer ({e})") from e

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def to_str(self) -> str:
        return self._tok.to_str()


class IncrementalText:
    """The text of a growing token list, decoding only the newest tokens at each step.

    Decoding the whole list after every token costs O(n) per token (O(n^2) per generation). Here
    each step decodes a short window twice: the last committed chunk, and that chunk plus the new
    tokens; the difference is the new text. Starting both from the same context tokens cancels
    what a decoder does at a sequence start (e.g. a Metaspace decoder dropping a leading space).
    A chunk is committed once its text does not end inside a UTF-8 character ("\\ufffd"), so a
    character split over byte-level tokens is decoded whole.
    """

    def __init__(self, decode):
        self._decode = decode
        self._prefix = self._read = 0  # tokens[prefix:read] is the last committed chunk
        self._text = ""  # text of tokens[:read]

    def update(self, tokens: list[int]) -> str:
        """The text of all of `tokens` (which extends the list of the previous call); it may end in
        "\\ufffd" while the last token stops inside a character."""
        context = self._decode(tokens[self._prefix : self._read])
        window = self._decode(tokens[self._prefix :])
        if not window.startswith(context):  # a decoder that rewrites its context: decode it all
            return self._decode(tokens)
        tail = window[len(context) :]
        if tail.endswith("\ufffd"):
            return self._text + tail
        self._text += tail
        self._prefix, self._read = self._read, len(tokens)
        return self._text
