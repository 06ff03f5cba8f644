"""The lm-evaluation-harness model "looplm": any depth, exit policy or decoder of a looped checkpoint.

    lm_eval --model looplm --model_args pretrained=PATH,loops=2 --tasks ...     (lm-eval with the
        "lm_eval.models" entry-point group; for releases without it: python -m looplm.harness run ...)

model_args: pretrained (default: the bundled model), dtype, device, mode (full | anytime |
speculative), loops=k, exit=q_exit|confidence|entropy|kl|delta|static with threshold= (alias q=),
budget_ms= / deadline_ms= (generation only), skip=, max_length=, batch_size=, and any option of the
chosen decoder (e.g. draft_loop=2 for speculative, kv=last).

Scoring (loglikelihood, loglikelihood_rolling) runs one no-cache forward of all T loops per batch
(looplm.harness.scoring): at a static depth every token is scored by the head after loop k; with an
exit policy each token by the head after the loop its policy exits at, which is what the engine's
exact anytime mode computes for that token. generate_until runs Engine.generate in the chosen mode.
The mean exit loop and the loops computed per token of every task land in the results under
config.looplm (lm-eval's get_model_info hook).
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

import looplm
from looplm.decoding import resolve_mode

from .scoring import ExitRule, Scored, score

logger = logging.getLogger(__name__)
MODES = ("full", "anytime", "speculative")
FACADE_OPTIONS = {"temperature", "top_k", "top_p", "seed", "kv"}  # Engine.generate's own keywords
TIME_BUDGETS = ("budget_ms", "deadline_ms")


class _Tally:
    """Per-task counts behind the recorded statistics.

    Loops computed per token: T for a scored token (the no-cache forward runs every loop at every
    position, as exact anytime decoding eventually does for the loops a token skipped), Step.loops
    for a generated one.
    """

    def __init__(self, T: int):
        self.tokens = 0
        self.exit_sum = 0
        self.loops_sum = 0  # loops computed for those tokens
        self.logprob_sum = 0.0
        self.hist = [0] * T

    def add(self, exit_loops: list[int], loops: list[int], logprobs: list[float] | None = None) -> None:
        self.tokens += len(exit_loops)
        self.exit_sum += sum(exit_loops)
        self.loops_sum += sum(loops)
        for t in exit_loops:
            self.hist[t - 1] += 1
        if logprobs is not None:
            self.logprob_sum += sum(logprobs)

    def summary(self, scored: bool) -> dict:
        n = max(self.tokens, 1)
        out = {"tokens": self.tokens, "mean_exit_loop": self.exit_sum / n, "loops_computed_per_token": self.loops_sum / n,
               "exit_loop_counts": list(self.hist)}
        if scored:
            out["nats_per_token"] = -self.logprob_sum / n
        return out


@register_model("looplm")
class LoopLMEval(TemplateLM):
    """lm-eval's view of a looplm Engine; see the module docstring for the model_args."""

    def __init__(self, pretrained: str | None = None, dtype: str | None = None, device: str | None = None,
                 mode: str | None = None, loops: int | None = None, exit: str | None = None,
                 threshold: float | None = None, q: float | None = None, max_length: int | None = None,
                 batch_size: int | str | None = None, max_batch_size: int | None = None, **options):
        super().__init__()
        if threshold is not None and q is not None:
            raise ValueError("pass threshold= or q=, not both")
        threshold = q if threshold is None else threshold
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval passes its --device default ("cuda") whether or not one exists
            logger.warning("device %r requested but CUDA is not available: using the CPU", device)
            device = "cpu"
        self.engine = looplm.load(pretrained or None, dtype=dtype or None, device=device or None)
        self.model = self.engine.model.eval()
        if self.engine.tokenizer is None:
            raise ValueError(f"{self.engine.path}: lm-eval needs the checkpoint's tokenizer.json")
        T = self.model.num_loops
        timed = any(options.get(k) is not None for k in TIME_BUDGETS)
        wants_anytime = loops not in (None, T) or exit is not None or timed or "skip" in options
        if mode is None:
            mode = "anytime" if wants_anytime else "full"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "anytime" and wants_anytime:
            raise ValueError(f"mode={mode!r} runs all {T} loops: loops < T, exit=, skip= and time budgets need mode=anytime")
        self.rule = ExitRule.make(T, loops, exit, threshold)
        self.mode, self.timed = mode, timed
        self.gen_options = dict(options)
        if mode == "anytime":
            self.gen_options.setdefault("skip", "exact")
            if exit is not None:
                self.gen_options.update(exit=exit, threshold=threshold)
            if loops is not None:
                self.gen_options["budget_loops"] = int(loops)
        self._check_options(mode, self.gen_options)
        ctx = self.model.config.max_position_embeddings
        self._max_length = ctx if max_length is None else int(max_length)
        if not 2 <= self._max_length <= ctx:
            raise ValueError(f"max_length must lie in [2, {ctx}] (max_position_embeddings), got {max_length!r}")
        if batch_size is None or str(batch_size).startswith("auto"):
            batch_size = max_batch_size or 32  # no memory probing: a fixed default
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.tokenizer = self.engine.tokenizer
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self._scored: list[Scored] = []  # _loglikelihood_tokens' per-token results, for loglikelihood's tallies

    @staticmethod
    def _check_options(mode: str, options: dict) -> None:
        params = inspect.signature(resolve_mode(mode)).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return
        known = (set(params) - {"model", "req"}) | FACADE_OPTIONS
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown model_args {unknown} for mode={mode!r}; it takes {sorted(known)}")

    # ---- what TemplateLM needs --------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        stop = self.engine.default_stop_ids()
        return stop[0] if stop else self.model.config.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.model.config.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.engine.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.engine.decode(tokens)

    def get_model_info(self) -> dict:
        """What lm-eval stores under results["config"]: the checkpoint, the rule, and per-task loop statistics."""
        per_task = {f"{task}/{kind}": t.summary(kind != "generate_until") for (task, kind), t in self._tallies.items()}
        return {"looplm": {"path": str(self.engine.path), "mode": self.mode, "num_loops": self.model.num_loops,
                           "rule": self.rule.describe(), "generate_options": dict(self.gen_options),
                           "per_task": per_task}}

    def _tally(self, req: Instance, kind: str) -> _Tally:
        key = (str(getattr(req, "task_name", None) or "unknown"), kind)
        if key not in self._tallies:
            self._tallies[key] = _Tally(self.model.num_loops)
        return self._tallies[key]

    def _score_checks(self) -> None:
        if self.timed:
            raise ValueError("budget_ms / deadline_ms depend on wall time: they apply to generate_until only; "
                             "score with loops= or exit= instead")
        if self.gen_options.get("skip", "exact") != "exact" or self.gen_options.get("kv", "per_loop") != "per_loop":
            raise ValueError("scoring reproduces the exact per-loop cache only: skip='exact' and kv='per_loop'")

    # ---- scoring ------------------------------------------------------------------------------
    def _score_rows(self, rows: list[tuple[list[int], int]], disable_tqdm: bool, desc: str) -> list[Scored]:
        # in chunks for the progress bar; score() shares forwards within a chunk, and lm-eval sends
        # a question's choices next to each other
        out = []
        step = self.batch_size * 32
        for b in tqdm(range(0, len(rows), step), desc=desc, disable=disable_tqdm):
            out += score(self.model, rows[b : b + step], self.rule, self.batch_size)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        self._score_checks()
        rows = []
        for (context, continuation), ctx_ids, cont_ids in requests:
            if not cont_ids:
                raise ValueError(f"continuation {continuation!r} encodes to no tokens")
            # an all-whitespace context moves into the continuation (TemplateLM._encode_pair): condition on the prefix token
            ctx_ids = ctx_ids or [self.prefix_token_id]
            if len(cont_ids) > self.max_length:
                raise ValueError(f"continuation of {len(cont_ids)} tokens exceeds max_length {self.max_length}")
            ids = (ctx_ids + cont_ids)[-(self.max_length + 1):]  # keep the last max_length inputs
            rows.append((ids, len(cont_ids)))
        self._scored = self._score_rows(rows, disable_tqdm, "looplm loglikelihood")
        return [(sum(r.logprobs), all(r.greedy)) for r in self._scored]

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM's encoding (context and continuation split at the continuation's tokens), then
        the tallies of the per-token results _loglikelihood_tokens kept, one per request in order."""
        out = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        for req, res in zip(requests, self._scored):
            self._tally(req, "loglikelihood").add(res.exit_loops, [self.model.num_loops] * len(res.exit_loops), res.logprobs)
        self._scored = []
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Total log-probability of each string: disjoint windows of max_length tokens, the first
        conditioned on the prefix token (lm-eval's rolling windows with context_len 1)."""
        self._score_checks()
        rows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            windows = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            for ctx, pred in map(make_disjoint_window, windows):
                rows.append((ctx + pred, len(pred)))
                owner.append(i)
        results = self._score_rows(rows, disable_tqdm, "looplm loglikelihood_rolling")
        totals = [0.0] * len(requests)
        T = self.model.num_loops
        for i, r in zip(owner, results):
            totals[i] += sum(r.logprobs)
            self._tally(requests[i], "loglikelihood_rolling").add(r.exit_loops, [T] * len(r.exit_loops), r.logprobs)
        return totals

    # ---- generation ---------------------------------------------------------------------------
    def generate_options(self, gen_kwargs: dict) -> tuple[int, dict]:
        """(max_new_tokens, Engine.generate keywords) for one request's lm-eval gen_kwargs."""
        kw = dict(gen_kwargs)
        until = kw.pop("until", None)
        until = [] if until is None else [until] if isinstance(until, str) else list(until)
        max_new = int(kw.pop("max_gen_toks", 256))
        do_sample = kw.pop("do_sample", None)
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        options = dict(self.gen_options)
        if do_sample is False:
            temperature = 0.0
        options["temperature"] = temperature
        for k in ("top_k", "top_p", "seed"):
            if k in kw:
                options[k] = kw.pop(k)
        unknown = sorted(set(kw))
        if unknown:
            raise ValueError(f"unsupported generation kwargs {unknown}")
        options["stop"] = until + self.engine.default_stop_ids()
        return max_new, options

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Engine.generate over batches of requests with the same gen_kwargs, cut at their stop strings."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items()))].append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="looplm generate_until", disable=disable_tqdm)
        for idx in groups.values():
            max_new, options = self.generate_options(requests[idx[0]].args[1])
            for b in range(0, len(idx), self.batch_size):
                chunk = idx[b : b + self.batch_size]
                prompts = [self._prompt_ids(requests[i].args[0], max_new) for i in chunk]
                gens = self.engine.generate(prompts, max_new_tokens=max_new, mode=self.mode, **options)
                for i, g in zip(chunk, gens):
                    out[i] = g.text
                    self._tally(requests[i], "generate_until").add([s.exit_loop for s in g.steps], [s.loops for s in g.steps])
                bar.update(len(chunk))
        bar.close()
        return out

    def _prompt_ids(self, context: str, max_new: int) -> list[int]:
        ids = self.tok_encode(context) or [self.prefix_token_id]
        keep = max(1, self.model.config.max_position_embeddings - max_new)
        return ids[-keep:]  # left-truncate so the context holds the new tokens
