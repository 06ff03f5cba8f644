"""The public facade: `looplm.load()` -> Engine, one `generate`/`stream` for every decoder."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from . import checkpoint
from .cache import cache_factory
from .config import LoopConfig
from .decoding import DecodeRequest, Step, resolve_mode
from .fuse import fuse_if_large
from .model import LoopLM
from .sampling import SamplingParams
from .tokenizer import IncrementalText, Tokenizer

DEFAULT_MODEL = Path(__file__).parent / "default_model"

Prompt = str | Sequence[int]


@dataclass
class Generation:
    """The result for one prompt."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)  # new token ids
    text: str = ""
    loops: list[int] = field(default_factory=list)  # loops computed for each new token
    steps: list[Step] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (token or string), "length" (max_new_tokens), "context" (cache full)
    stats: dict = field(default_factory=dict)


class Engine:
    """A loaded looped model with its tokenizer; see `generate`."""

    def __init__(self, model: LoopLM, tokenizer: Tokenizer | None = None, generation_config: dict | None = None, path=None):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.generation_config = generation_config or {}

    @property
    def config(self) -> LoopConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def default_stop_ids(self) -> list[int]:
        eos = self.generation_config.get("eos_token_id", self.config.eos_token_id)
        return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: pass prompts as lists of token ids")
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def generate(self, prompt, *, max_new_tokens: int = 64, mode: str = "full", **kwargs) -> Generation | list[Generation]:
        """Generates continuations.

        Args:
            prompt: a string, a list of token ids, or a list of either (a batch of ragged prompts).
            max_new_tokens: new tokens per prompt; limited to what the context still holds
                (the result's finish_reason is then "context").
            mode: "full" (all T loops), "speculative" (spec/), or "anytime" (anytime/).
            temperature, top_k, top_p, seed: sampling (temperature 0 = greedy).
            stop: None for the checkpoint's eos ids, else a list of token ids and/or strings
                (an empty list never stops early).
            kv: "per_loop" (default: the exact cache, T*L slots per position), "last" or "mean"
                (one K/V per layer after prefill, T-fold smaller; an approximation, DESIGN.md §1).
            **mode_options: options of the chosen decoder (e.g. draft_loop, budget). A checkpoint
                may recommend its own in generation_config.json under "looplm": {mode: {...}}
                (see `mode_defaults`); what is passed here overrides them.
        Returns:
            A Generation, or a list of them for a batch.
        """
        stream = self.stream(prompt, max_new_tokens=max_new_tokens, mode=mode, **kwargs)
        for _ in stream:
            pass
        return stream.generations if self._is_batch(prompt) else stream.generations[0]

    def stream(self, prompt, *, max_new_tokens: int = 64, mode: str = "full", **kwargs) -> "Stream":
        """Same arguments as `generate`; iterating yields each Step (token, loops, latency, text) as it is decided.

        The returned Stream's `generations` hold each prompt's Generation so far (stats once it ends).
        """
        gens: dict[int, Generation] = {}
        return Stream(self._run(prompt, max_new_tokens, mode, kwargs, gens), gens)

    # -- internals ---------------------------------------------------------------------------
    @staticmethod
    def _is_batch(prompt) -> bool:
        return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not isinstance(prompt[0], int)

    def _prompt_ids(self, prompt) -> list[list[int]]:
        prompts = list(prompt) if self._is_batch(prompt) else [prompt]
        out = []
        for i, p in enumerate(prompts):
            ids = self.encode(p) if isinstance(p, str) else [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt {i}: token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
            if len(ids) >= self.config.max_position_embeddings:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; the context holds {self.config.max_position_embeddings} "
                    "(at least one position must stay free for a new token)"
                )
            out.append(ids)
        return out

    def _request(self, prompt, max_new_tokens, options) -> tuple[DecodeRequest, list[int], list[str], dict]:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        seed = options.pop("seed", None)
        sampling = SamplingParams(
            temperature=options.pop("temperature", 0.0), top_k=options.pop("top_k", None), top_p=options.pop("top_p", None)
        )
        stop = options.pop("stop", None)
        stop = self.default_stop_ids() if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
        stop_ids = [s for s in stop if isinstance(s, int)]
        stop_strs = [s for s in stop if isinstance(s, str) and s]
        prompts = self._prompt_ids(prompt)
        ctx = self.config.max_position_embeddings
        max_new = [min(max_new_tokens, ctx - len(p)) for p in prompts]
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        req = DecodeRequest(prompts, max_new, sampling, gen, [False] * len(prompts))
        # kv="per_loop" (exact, default) | "last" | "mean": shared KV across loops (looplm.cache.SharedKVCache)
        req.cache_factory = cache_factory(options.pop("kv", "per_loop"))
        return req, stop_ids, stop_strs, options

    def mode_defaults(self, mode: str) -> dict:
        """Decoder options the checkpoint recommends for `mode` (generation_config.json, key "looplm").

        A string option ending in ".safetensors" names a file of the checkpoint directory (e.g. the
        speculative decoder's fitted "draft_map") and is passed as that file's path.
        """
        defaults = (self.generation_config.get("looplm") or {}).get(mode) or {}
        if not isinstance(defaults, dict):
            raise ValueError(f"generation_config.json: looplm.{mode} must be an object of options, got {defaults!r}")
        out = dict(defaults)
        for key, value in out.items():
            if isinstance(value, str) and value.endswith(".safetensors"):
                file = Path(self.path or ".") / value
                if not file.is_file():
                    raise ValueError(f"generation_config.json: looplm.{mode}.{key} names {file}, which does not exist")
                out[key] = str(file)
        return out

    def _run(self, prompt, max_new_tokens, mode, kwargs, gens: dict) -> Iterator[Step]:
        decoder = resolve_mode(mode)
        req, stop_ids, stop_strs, options = self._request(prompt, max_new_tokens, {**self.mode_defaults(mode), **kwargs})
        for i, p in enumerate(req.prompts):
            gens[i] = Generation(prompt_tokens=p)
        detok = [IncrementalText(self.tokenizer.decode) for _ in req.prompts] if self.tokenizer is not None else None
        start = time.perf_counter()
        steps = decoder(self.model, req, **options)
        for step in steps:
            g = gens[step.row]
            if req.done[step.row] or len(g.tokens) >= req.max_new[step.row]:
                continue
            g.tokens.append(step.token)
            g.loops.append(step.loops)
            g.steps.append(step)
            text = detok[step.row].update(g.tokens) if detok is not None else ""
            hit = next((s for s in stop_strs if s in text), None)
            if step.token in stop_ids or hit is not None:
                req.done[step.row], g.finish_reason = True, "stop"
                if hit is not None:
                    text = text[: text.index(hit)]
            elif len(g.tokens) >= req.max_new[step.row]:
                req.done[step.row] = True
                g.finish_reason = "length" if req.max_new[step.row] == max_new_tokens else "context"
            elif text.endswith("\ufffd"):
                # a byte-level token ended inside a UTF-8 character: hold the partial character back
                # until a later token completes it, so streamed pieces concatenate to the final text
                text = text.rstrip("\ufffd")
            step.text, g.text = text[len(g.text):], text
            yield step
        elapsed = time.perf_counter() - start
        total = sum(len(g.tokens) for g in gens.values())
        for g in gens.values():
            g.stats = {
                **req.stats,
                "mode": mode,
                "new_tokens": len(g.tokens),
                "batch_tokens_per_s": total / elapsed if elapsed > 0 else float("inf"),
                "tokens_per_s": len(g.tokens) / elapsed if elapsed > 0 else float("inf"),
                "mean_loops": sum(g.loops) / max(len(g.loops), 1),
                "elapsed_ms": elapsed * 1e3,
            }


class Stream:
    """An iterator of Steps that also exposes the Generations it is filling."""

    def __init__(self, steps: Iterator[Step], gens: dict[int, Generation]):
        self._steps, self._gens = steps, gens

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Step:
        return next(self._steps)

    def close(self) -> None:
        """Stops the decode early (e.g. a client went away); the engine stays usable."""
        self._steps.close()

    @property
    def generations(self) -> list[Generation]:
        """One Generation per prompt, in prompt order (empty until the first step is requested)."""
        return [self._gens[i] for i in range(len(self._gens))]


def load(path: str | Path | None = None, *, dtype=None, device=None) -> Engine:
    """Loads an Ouro checkpoint directory (None: the bundled default model) into an Engine.

    dtype None: `looplm.dtypes.default_dtype`. Models of more than 256 MiB of bf16 weights get
    fused q/k/v and gate/up projections (`looplm.fuse`; the state dict is unchanged).
    """
    if path is None:
        path = DEFAULT_MODEL
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the bundled default model is missing from {path}; pass a checkpoint path")
    model, tokenizer, gen_cfg = checkpoint.load_pretrained(path, dtype=dtype, device=device)
    return Engine(fuse_if_large(model), tokenizer, gen_cfg, Path(path))


def save(engine: Engine, path: str | Path, **kwargs) -> None:
    """Writes the engine's model (and tokenizer) in the published Ouro layout."""
    checkpoint.save_pretrained(
        engine.model, path, tokenizer=engine.tokenizer, generation_config=engine.generation_config or None, **kwargs
    )
