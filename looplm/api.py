"""The public facade: `looplm.load()` -> Engine, one `generate`/`stream` for every decoder."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from . import checkpoint, validate
from .config import LoopConfig
from .decoding import DecodeRequest, Step, resolve_mode
from .fuse import fuse_if_large
from .paged import check_kv_mode
from .model import LoopLM
from .options import ModeOptions, check_object, resolve as resolve_options
from .sampling import SamplingParams
from .stats import Stats
from .threads import apply_threads, check_threads
from .tokenizer import IncrementalText, Tokenizer

DEFAULT_MODEL = Path(__file__).parent / "default_model"

Prompt = str | Sequence[int]


@dataclass
class Generation:
    """The result for one prompt."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)  # new token ids
    text: str = ""
    loops: list[int] = field(default_factory=list)  # loops computed for each token by the time it was emitted (Step.loops)
    exit_loops: list[int] = field(default_factory=list)  # 1-based loop whose head chose each token (Step.exit_loop)
    steps: list[Step] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (token or string), "length" (max_new_tokens), "context" (cache full)
    stats: Stats = field(default_factory=dict)  # the request's statistics (looplm.stats.Stats), once it ended


class Engine:
    """A loaded looped model with its tokenizer; see `generate`."""

    def __init__(self, model: LoopLM, tokenizer: Tokenizer | None = None, generation_config: dict | None = None, path=None,
                 **engine_options):
        """engine_options: the scheduler's (cache_bytes, block_size, max_running; looplm.scheduler.Scheduler)."""
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.generation_config = generation_config or {}
        from .scheduler import Scheduler

        self.scheduler = Scheduler(model, **engine_options)  # checks the options now; allocates caches when first used

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

    def generate(self, prompt, *, max_new_tokens: int = 64, mode: str | None = None, options: ModeOptions | None = None,
                 **kwargs) -> Generation | list[Generation]:
        """Generates continuations.

        Args:
            prompt: a string, a list of token ids, or a list of either (several requests, run
                concurrently by the engine).
            max_new_tokens: new tokens per prompt; limited to what the context still holds
                (the result's finish_reason is then "context").
            mode: "full" (all T loops), "speculative" (spec/), or "anytime" (anytime/); None:
                the mode of `options`, else "full".
            options: the mode's options as one object (looplm.options: FullOptions,
                SpeculativeOptions, AnytimeOptions), instead of keyword options. It states every
                option: the checkpoint's recommendation does not apply (start from
                `mode_defaults(mode)` to keep it).
            temperature, top_k, top_p, seed: sampling (temperature 0 = greedy); with a list of
                prompts, prompt i samples with seed + i (as it would alone with that seed).
            stop: None for the checkpoint's eos ids, else a list of token ids and/or strings
                (an empty list never stops early).
            kv: "per_loop" (default: the exact cache, T*L slots per position), "last" or "mean"
                (one K/V per layer after prefill, T-fold smaller; an approximation, see
                docs/design.md).
            **mode_options: options of the chosen mode (the fields of its looplm.options
                dataclass, e.g. draft_loop, budget_ms). A checkpoint may recommend its own in
                generation_config.json under "looplm": {mode: {...}} (see `mode_defaults`); what
                is passed here overrides them. An unknown option, one of another mode, a bad value
                or a combination the mode cannot run raises ValueError naming the option and the mode.
        Returns:
            A Generation, or a list of them for a list of prompts.
        """
        # the requests run quiet: this thread sleeps until each one ends instead of waking per token
        stream = self._open(prompt, max_new_tokens, mode, options, kwargs, quiet=True)
        for _ in stream:
            pass
        return stream.generations if self._is_batch(prompt) else stream.generations[0]

    def stream(self, prompt, *, max_new_tokens: int = 64, mode: str | None = None, options: ModeOptions | None = None,
               on_event: Callable[[Step | BaseException | None], None] | None = None, **kwargs) -> "Stream":
        """Same arguments as `generate`; iterating yields each Step (token, loops, latency, text) as it is decided.

        The request is validated and submitted when `stream` is called (errors raise here) and
        runs in the engine's background loop, batched with every other live request; `close()`
        (or dropping the Stream) cancels it and frees its cache blocks. A list of prompts gives
        one Stream over all of them: steps arrive per prompt in turn, `step.row` names the prompt.

        Args:
            on_event: instead of iterating (the Stream then cannot be iterated), receive the steps
                where they are decided: `on_event(step)` is called on the engine's loop thread with
                each Step in order (`step.row` names the prompt; the prompts' steps interleave),
                then exactly once with the end: None, or the exception that ended the stream (the
                first one; a list's other prompts are then cancelled), after every prompt's cache
                blocks were freed. It runs inside the engine loop, between its steps: it must be
                quick and never block (e.g. append to a deque and wake the consumer); an exception
                it raises is logged and cancels the stream, whose end is still delivered.
        """
        return self._open(prompt, max_new_tokens, mode, options, kwargs, quiet=False, on_event=on_event)

    def _open(self, prompt, max_new_tokens: int, mode: str | None, options: ModeOptions | None, kwargs: dict,
              quiet: bool, on_event: Callable | None = None) -> "Stream":
        """Validates and submits the requests of `stream`/`generate`; `quiet` requests queue no Steps."""
        validate.request(max_new_tokens, kwargs)
        prompts = validate.prompts(prompt)
        if mode is None:
            mode = options.mode if isinstance(options, ModeOptions) and options.mode else "full"
        seed = kwargs.pop("seed", None)
        streams = []
        for i, p in enumerate(prompts):  # prompt i of a list samples with seed + i: its own stream of draws
            streams.append(self._submit(p, max_new_tokens, mode, {**kwargs, "seed": None if seed is None else seed + i}, i,
                                        options))
        for s in streams:
            s._request.quiet = quiet
        if on_event is not None:
            events = _Events(on_event, [s._request for s in streams])
            for row, s in enumerate(streams):
                s._request.on_event = functools.partial(events.hand, row)
        self.scheduler.submit([s._request for s in streams])  # together: a bad request queues none of them
        if len(streams) == 1 and not self._is_batch(prompt):
            return streams[0]
        return BatchStream(streams)

    def usage(self) -> dict:
        """The engine's load: requests running and waiting, and per KV mode its cache blocks used and total."""
        return self.scheduler.usage()

    # -- internals ---------------------------------------------------------------------------
    @staticmethod
    def _is_batch(prompt) -> bool:
        return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not isinstance(prompt[0], int)

    def _prompt_ids(self, p, i: int = 0) -> list[int]:
        ids = self.encode(p) if isinstance(p, str) else list(p)
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
        return ids

    def _request(self, prompt, max_new_tokens, options, index: int = 0) -> tuple[DecodeRequest, list[int], list[str], dict]:
        validate.request(max_new_tokens, options)
        seed = options.pop("seed", None)
        sampling = SamplingParams(
            temperature=options.pop("temperature", 0.0), top_k=options.pop("top_k", None), top_p=options.pop("top_p", None)
        )
        stop = options.pop("stop", None)
        stop = self.default_stop_ids() if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
        stop_ids = [s for s in stop if isinstance(s, int)]
        stop_strs = [s for s in stop if isinstance(s, str) and s]
        ids = self._prompt_ids(prompt, index)
        ctx = self.config.max_position_embeddings
        max_new = min(max_new_tokens, ctx - len(ids))
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        kv = check_kv_mode(options.pop("kv", "per_loop"))
        req = DecodeRequest([ids], [max_new], sampling, gen, [False], kv=kv, seeded=seed is not None)
        if max_new < max_new_tokens:
            req.stats["_context_limited"] = True
        return req, stop_ids, stop_strs, options

    def mode_defaults(self, mode: str) -> dict:
        """Decoder options the checkpoint recommends for `mode` (generation_config.json, key "looplm").

        A string option ending in ".safetensors" names a file of the checkpoint directory (e.g. the
        speculative decoder's fitted "draft_map") and is passed as that file's path. The key
        "calibrated" is a record, not an option (where a recommendation came from: `python -m
        spec.calibrate --write`), and is left out.
        """
        defaults = (self.generation_config.get("looplm") or {}).get(mode) or {}
        if not isinstance(defaults, dict):
            raise ValueError(f"generation_config.json: looplm.{mode} must be an object of options, got {defaults!r}")
        out = {k: v for k, v in defaults.items() if k != "calibrated"}
        for key, value in out.items():
            if isinstance(value, str) and value.endswith(".safetensors"):
                file = Path(self.path or ".") / value
                if not file.is_file():
                    raise ValueError(f"generation_config.json: looplm.{mode}.{key} names {file}, which does not exist")
                out[key] = str(file)
        return out

    def _submit(self, prompt, max_new_tokens, mode, kwargs, index: int = 0, typed: ModeOptions | None = None) -> "Stream":
        """A validated request (its decoder started) and its Stream; the caller queues it.

        The mode options are `typed` (an options object, used as is) or the keyword options left
        in `kwargs` over the checkpoint's recommendation; either way checked before the decoder starts.
        """
        from .scheduler import Request

        decoder_fn = resolve_mode(mode)
        defaults = {} if typed is not None else self.mode_defaults(mode)
        req, stop_ids, stop_strs, values = self._request(prompt, max_new_tokens, {**defaults, **kwargs}, index)
        req.recommended = frozenset(k for k in defaults if k not in kwargs)
        if typed is not None:
            if values:
                raise ValueError(f"option {next(iter(values))!r}: pass mode options either in options= or as keyword "
                                 "arguments, not both")
            opts = check_object(typed, mode, self.model.num_loops, req.kv)
        else:
            opts = resolve_options(mode, values, self.model.num_loops, req.kv, req.recommended, notes=req.stats)
        decoder = decoder_fn(self.model, req, **opts.kwargs())
        gen = Generation(prompt_tokens=req.prompts[0])
        detok = IncrementalText(self.tokenizer.decode) if self.tokenizer is not None else None
        request = Request(req, decoder, mode, stop_ids, stop_strs, detok, gen)
        try:  # runs the decoder to its first item (e.g. a draft map is loaded and checked), in the caller's thread
            request.first = next(decoder)
        except StopIteration:
            request.first = None
        return Stream(self.scheduler, request)


class Stream:
    """An iterator of one request's Steps; also exposes its Generation (stats once it ends)."""

    def __init__(self, scheduler, request):
        self._scheduler, self._request = scheduler, request
        self._ended = False

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Step:
        if self._ended:
            raise StopIteration
        if self._request.on_event is not None:
            raise TypeError("this stream hands its steps to its on_event callback: it cannot be iterated")
        item = self._request.out.get()
        if isinstance(item, Step):
            return item
        self._ended = True
        if isinstance(item, BaseException):
            raise item
        raise StopIteration

    def close(self) -> None:
        """Cancels the request (e.g. a client went away): its cache blocks are freed; the engine stays usable."""
        if not self._ended:
            self._scheduler.cancel(self._request)
            self._ended = True

    def __del__(self):
        if not self._ended and not self._request.finished:
            self._scheduler.cancel(self._request)

    @property
    def generation(self) -> Generation:
        return self._request.generation

    @property
    def generations(self) -> list[Generation]:
        return [self._request.generation]


class _Events:
    """Hands the Steps and the end of one stream's requests (one per prompt) to its on_event
    callback: each Step with its prompt's row, the end once, when the last request ended. Called on
    the engine's loop thread only (no lock)."""

    def __init__(self, on_event: Callable[[Step | BaseException | None], None], requests: list):
        self.on_event, self.requests = on_event, requests
        self.left, self.error = len(requests), None

    def hand(self, row: int, item: Step | BaseException | None) -> None:
        if isinstance(item, Step):
            item.row = row
            try:
                self.on_event(item)
            except Exception:  # the scheduler logs it and cancels this request: the others stop too
                self._cancel()
                raise
            return
        self.left -= 1
        if item is not None and self.error is None:
            self.error = item
            self._cancel()  # the stream failed: its other prompts need not run on
        if self.left == 0:
            self.on_event(self.error)

    def _cancel(self) -> None:
        for r in self.requests:
            r.cancelled = True


class BatchStream:
    """Steps of several requests (one per prompt), each prompt's in turn; step.row is the prompt's index."""

    def __init__(self, streams: list[Stream]):
        self._streams = streams
        self._it = self._steps()

    def _steps(self):
        for row, s in enumerate(self._streams):
            for step in s:
                step.row = row
                yield step

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Step:
        return next(self._it)

    def close(self) -> None:
        for s in self._streams:
            s.close()

    @property
    def generations(self) -> list[Generation]:
        return [s.generation for s in self._streams]


def load(path: str | Path | None = None, *, dtype=None, device=None, threads: int | None = None, tp: int | None = None,
         **engine_options) -> Engine:
    """Loads an Ouro checkpoint directory (None: the bundled default model) into an Engine.

    Args:
        path: the checkpoint directory; None loads looplm/default_model.
        dtype: "float32", "bfloat16", "float16" or a torch dtype (default:
            `looplm.dtypes.default_dtype`: the config's torch_dtype on a GPU; on the CPU bfloat16
            only for a large bf16 checkpoint on a CPU with native bf16, else float32).
        device: a torch device ("cpu", "cuda", "cuda:1"); a ValueError when torch cannot use it.
        threads: torch intra-op threads, set process-wide (`torch.set_num_threads`). None takes
            $LOOPLM_THREADS, else one thread per 64 MiB of weights up to the available cores
            (looplm.threads: a model as small as the bundled one gets 1).
        tp: tensor parallelism over this many ranks of a `torchrun --nproc-per-node tp` launch
            (looplm.tp): each rank loads only its slices of the weights and holds only its KV
            heads. Returns the engine on rank 0; on the other ranks it serves rank 0's steps and
            exits the process when rank 0 exits. None or 1: one process.
        **engine_options: the engine's scheduler (looplm.scheduler.Scheduler): cache_bytes,
            block_size, max_running, max_step_tokens, prefill_chunk.

    Models of more than 256 MiB of bf16 weights get fused q/k/v and gate/up projections
    (`looplm.fuse`; the state dict is unchanged).
    """
    if path is None:
        path = DEFAULT_MODEL
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the bundled default model is missing from {path}; pass a checkpoint path")
    if threads is not None:
        check_threads(threads)  # a bad value fails before the weights are read
    shard = None
    if tp is not None and tp != 1:
        from . import tp as tensor_parallel

        tensor_parallel.check_divisible(checkpoint.read_config(path), tp)  # before joining a launch
        rank, device = tensor_parallel.init(tp, device)
        shard = (rank, tp)
    model, tokenizer, gen_cfg = checkpoint.load_pretrained(path, dtype=dtype, device=device, tp=shard)
    apply_threads(model, threads)
    engine = Engine(fuse_if_large(model), tokenizer, gen_cfg, Path(path), **engine_options)
    if shard is not None:
        tensor_parallel.start(engine)  # returns on rank 0 only
    return engine


def save(engine: Engine, path: str | Path, **kwargs) -> None:
    """Writes the engine's model (and tokenizer) in the published Ouro layout.

    Files that the generation config's per-mode options name (e.g. the speculative decoder's
    "draft_map.safetensors", see `Engine.mode_defaults`) are copied from the engine's checkpoint
    directory, so the saved checkpoint runs every mode as the original does. Raises ValueError
    (before writing anything) when such a file is missing or is not a plain name inside the directory.
    """
    files = _named_files(engine)
    checkpoint.save_pretrained(
        engine.model, path, tokenizer=engine.tokenizer, generation_config=engine.generation_config or None, **kwargs
    )
    for name, source in files.items():
        target = Path(path) / name
        if source.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)


def _named_files(engine: Engine) -> dict[str, Path]:
    """Relative file name -> source path of every ".safetensors" option in generation_config["looplm"]."""
    files = {}
    for mode, options in (engine.generation_config.get("looplm") or {}).items():
        for key, value in (options or {}).items() if isinstance(options, dict) else ():
            if not (isinstance(value, str) and value.endswith(".safetensors")):
                continue
            where = f"generation_config looplm.{mode}.{key} = {value!r}"
            if Path(value).is_absolute() or ".." in Path(value).parts:
                raise ValueError(f"{where}: a checkpoint file must be named relative to its directory")
            source = Path(engine.path or ".") / value
            if engine.path is None or not source.is_file():
                raise ValueError(f"{where}: no such file in the engine's checkpoint directory {engine.path}")
            files[value] = source
    return files
