"""Response bodies in the OpenAI shapes, with looplm's per-token extension fields.

Every choice and every stream chunk carries `looplm: {exit_loops, loops_computed, latency_ms}`,
one entry per token it holds (the 1-based loop whose head emitted the token, the loops computed
for it when it left, and the wall time since the row's previous token); a final chunk, which holds
no token, carries empty lists. Clients that do not know the field ignore it.
"""

from __future__ import annotations

import json
import re

from looplm import Engine, Generation, Step
from looplm.api import DEFAULT_MODEL

from .protocol import LOOPLM_OPTIONS

DEFAULT_MODEL_ID = "looplm-default"
# the first word of an engine ValueError -> the request field it is about
_PARAMS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "looplm.top_k",
           "seed": "seed", "stop": "stop", "prompt": "prompt", "per_token_ms": "looplm.budget_ms", "budget": "looplm.budget_loops"}


def model_id(engine: Engine) -> str:
    """The served model's id: "looplm-default" for the bundled model, else its directory's name."""
    if engine.path is None or engine.path.resolve() == DEFAULT_MODEL.resolve():
        return DEFAULT_MODEL_ID
    return engine.path.resolve().name


def model_card(name: str, engine: Engine) -> dict:
    from looplm.decoding import MODES

    return {
        "id": name, "object": "model", "created": 0, "owned_by": "looplm",
        "max_model_len": engine.config.max_position_embeddings,
        "looplm": {"num_loops": engine.config.total_ut_steps, "modes": sorted(MODES)},
    }


def param_of(message: str) -> str | None:
    """The request field an engine ValueError names ("draft_loop must be ..." -> "looplm.draft_loop")."""
    word = re.match(r"[A-Za-z_]+", message)
    word = word.group(0) if word else ""
    if word in LOOPLM_OPTIONS:
        return f"looplm.{word}"
    return _PARAMS.get(word)


def finish_reason(gen: Generation) -> str:
    return "stop" if gen.finish_reason == "stop" else "length"  # "context" (the cache is full) reads as length


def extension(steps: list[Step]) -> dict:
    return {
        "exit_loops": [s.exit_loop for s in steps],
        "loops_computed": [s.loops for s in steps],
        "latency_ms": [round(s.latency_ms, 3) for s in steps],
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _summary(done) -> dict:
    """The request's decoder statistics that are plain numbers or strings (mode, acceptance, ...)."""
    stats = done.generations[0].stats if done.generations else {}
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool)) or v is None}


def completion_response(rid: str, created: int, model: str, done, prompt_tokens: int, engine: Engine) -> dict:
    choices = []
    for i, gen in enumerate(done.generations):
        lp = None if done.logprobs is None else _completion_logprobs(done.logprobs[i], gen, engine)
        choices.append({"index": i, "text": gen.text, "logprobs": lp, "finish_reason": finish_reason(gen), "looplm": extension(gen.steps)})
    return {
        "id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model, "choices": choices,
        "usage": _usage(prompt_tokens, sum(len(g.tokens) for g in done.generations)), "looplm": _summary(done),
    }


def chat_response(rid: str, created: int, model: str, done, prompt_tokens: int, engine: Engine) -> dict:
    choices = []
    for i, gen in enumerate(done.generations):
        lp = None if done.logprobs is None else {"content": _chat_logprobs(done.logprobs[i], gen, engine)}
        choices.append({
            "index": i, "message": {"role": "assistant", "content": gen.text}, "logprobs": lp,
            "finish_reason": finish_reason(gen), "looplm": extension(gen.steps),
        })
    return {
        "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created, "model": model, "choices": choices,
        "usage": _usage(prompt_tokens, sum(len(g.tokens) for g in done.generations)), "looplm": _summary(done),
    }


def completion_chunk(rid: str, created: int, model: str, row: int, text: str, finish: str | None, steps: list[Step], first: bool) -> dict:
    choice = {"index": row, "text": text, "logprobs": None, "finish_reason": finish, "looplm": extension(steps)}
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def chat_chunk(rid: str, created: int, model: str, row: int, text: str, finish: str | None, steps: list[Step], first: bool) -> dict:
    delta = {"role": "assistant"} if first else {}
    if text or first:
        delta["content"] = text
    choice = {"index": row, "delta": delta, "logprobs": None, "finish_reason": finish, "looplm": extension(steps)}
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, created: int, model: str, chat: bool, prompt_tokens: int, completion_tokens: int) -> dict:
    kind = ("chatcmpl", "chat.completion.chunk") if chat else ("cmpl", "text_completion")
    return {"id": f"{kind[0]}-{rid}", "object": kind[1], "created": created, "model": model, "choices": [],
            "usage": _usage(prompt_tokens, completion_tokens)}


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


# -- logprobs ------------------------------------------------------------------------------------
def _completion_logprobs(rows: list, gen: Generation, engine: Engine) -> dict:
    tokens, offsets, at = [], [], 0
    for t in gen.tokens:
        piece = engine.decode([t])
        tokens.append(piece)
        offsets.append(at)
        at += len(piece)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for lp, _ in rows],
        "top_logprobs": [{engine.decode([t]): v for t, v in alts} for _, alts in rows],
        "text_offset": offsets,
    }


def _chat_logprobs(rows: list, gen: Generation, engine: Engine) -> list[dict]:
    def entry(token: int, logprob: float) -> dict:
        text = engine.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**entry(t, lp), "top_logprobs": [entry(a, v) for a, v in alts]} for t, (lp, alts) in zip(gen.tokens, rows)]
