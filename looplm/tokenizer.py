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
