"""Request bodies of the OpenAI-compatible endpoints (pydantic), and the error body.

Fields follow the OpenAI API; fields it defines that looplm does not use (user, presence_penalty,
...) are accepted and ignored, as OpenAI clients send some of them by default. The `looplm` object
carries per-request engine options (`Engine.generate`'s mode and mode options); the keys it accepts
are listed in LOOPLM_OPTIONS.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Per-request options a client may set in the `looplm` object: the mode and its decoders' options
# (spec.decode, anytime.decode), the KV layout and top_k. Options that name server-side objects or
# files (draft_map, budget, clock, step) stay with the checkpoint's defaults and the server.
LOOPLM_OPTIONS = frozenset({
    "mode", "kv", "top_k",
    "draft_loop", "draft_len", "pipeline", "extrapolate", "branch", "branch_threshold", "draft_tokens", "second_threshold",
    "fallback", "full_depth_above", "call_cost",
    "budget_ms", "deadline_ms", "budget_loops", "exit", "threshold", "q", "skip", "finish", "safety",
})
MAX_TOP_LOGPROBS = 5  # as the OpenAI completions API


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    looplm: dict[str, Any] | None = None

    def stop_strings(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """POST /v1/completions. `prompt`: a string, a list of token ids, or a list of either (a batch)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text: a string, or the concatenated text parts of a list of parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages: only text content parts are supported, got type {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def max_new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
