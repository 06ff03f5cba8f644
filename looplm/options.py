"""Each decoding mode's options: one frozen dataclass per mode, checked when a request is submitted.

A request's mode options arrive as keyword arguments of `Engine.generate`/`stream` (merged over
the checkpoint's recommendation, `Engine.mode_defaults`) or as one of these objects
(`generate(prompt, options=SpeculativeOptions(draft_loop=2))`). `resolve` turns them into the
mode's dataclass: an unknown option, an option of another mode, a value of the wrong type or range,
or a combination the decoder cannot run raises a ValueError that starts with the option's name and
names the mode (and says when the value came from the checkpoint). The decoder then receives the
fields as its keyword arguments (`decoder_fn(model, request, **options.kwargs())`), so the
dataclasses mirror the decoders' signatures: same names, same defaults (a test compares them).

Loops are counted as depths at this edge: draft_loop = k means the draft head reads the state
after loops 1..k, budget_loops = k lets a token run at most loops 1..k, a static exit threshold k
exits after loop k. The decoders turn a depth into the 0-based start loop of the work items they
yield (`Forward.start_loop = k` resumes at the (k+1)-th loop), once, where they build them.

Construction checks what a value alone decides (types, names, ranges that do not depend on the
model); `check(num_loops, kv)` checks what depends on the model's depth T and the request's KV mode.
Imports of the decoders' packages are deferred to the checks, so looplm does not depend on them.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Callable, ClassVar

from .decoding import resolve_mode
from .validate import number_in


class OptionError(ValueError):
    """A bad mode option: `option` names it, `mode` its mode; the message starts with the option's name."""

    def __init__(self, mode: str, option: str, message: str, source: str = ""):
        self.mode, self.option, self.message = mode, option, message
        super().__init__(f"{message} (mode {mode!r}{source})")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def second_threshold_ok(t: object) -> bool:
    """Whether `t` is a second_threshold value: None, "adaptive" or a number in [0, 1] (not a bool)."""
    return t is None or t == "adaptive" or isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1


@dataclass(frozen=True)
class ModeOptions:
    """Base of the per-mode options; `mode` names the mode a subclass belongs to."""

    mode: ClassVar[str] = ""

    def kwargs(self) -> dict[str, Any]:
        """The fields as the decoder's keyword arguments (values as given: no copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def check(self, num_loops: int, kv: str = "per_loop") -> "ModeOptions":
        """Checks what depends on the model's depth T = num_loops and the request's KV mode; returns self."""
        return self

    def _fail(self, option: str, message: str) -> OptionError:
        return OptionError(self.mode, option, message)

    def _wrap(self, option: str, check: Callable[[], Any]) -> Any:
        """Runs a component's own check (a budget's, an exit policy's threshold range), naming the option."""
        try:
            return check()
        except (ValueError, TypeError) as e:
            message = str(e)
            raise self._fail(option, message if message.startswith(f"{option} ") else f"{option}: {message}") from None


@dataclass(frozen=True)
class FullOptions(ModeOptions):
    """Mode "full" (looplm.generate.decode_full): every token runs all T loops."""

    mode: ClassVar[str] = "full"

    step: str | None = None
    """How each decode step runs: None or "eager" (the runner's plan over the paged cache), "fixed"
    (the fixed-shape step, rows and keys padded to buckets) or "compiled" (that step compiled per
    bucket by the engine's runner)."""

    def __post_init__(self):
        from .generate import STEPS

        if self.step is not None and self.step not in STEPS:
            raise self._fail("step", f"step must be one of {STEPS} or None, got {self.step!r}")


@dataclass(frozen=True)
class SpeculativeOptions(ModeOptions):
    """Mode "speculative" (spec.decode): drafts at loop k, verifies with loops k+1..T; lossless."""

    mode: ClassVar[str] = "speculative"

    draft_loop: int | str | None = None
    """1-based depth k in 1..T-1 whose LM head drafts (the state after loops 1..k); None:
    min(spec.DEFAULT_DRAFT_LOOP, T-1); "adaptive": chosen online per request among the divisors
    of T from the acceptance each loop's drafts would have had (spec.adapt; pipelined, branch 1)."""
    draft_len: int | str | None = None
    """Tokens drafted per round: an integer >= 1 or "adaptive"; None: spec.DEFAULT_DRAFT_LEN in
    rounds. Not with pipeline=True (the pipeline keeps T/k - 1 drafts in flight)."""
    pipeline: bool | None = None
    """Draft token n+1 in the forward that finishes token n (k must divide T). None: pipelined when
    draft_len is not given and k divides T, else draft rounds."""
    extrapolate: float = 0.0
    """c in [0, 10]: drafts from z_k + c (z_k - z_{k-1}). Unused (stats["extrapolate"] = 0.0) at
    draft_loop 1, which has no earlier loop, and when a draft map drafts."""
    draft_map: Any = None
    """A fitted spec.drafts.DraftMap or the path of one (`python -m spec.fit_draft`): drafts from
    its map of the loop k-1 and k states. Loaded and checked (hidden size, maps for loop k) by
    spec.drafts.resolve_draft_map when the decoder starts, still at submit."""
    branch: int = 1
    """b >= 1 candidates per position: b > 1 runs draft trees in the pipeline (spec.trees; k must
    divide T, no draft_len); 1: the plain pipeline or rounds."""
    branch_threshold: float | None = None
    """With branch > 1: branch only where the draft's top-1 probability is below this value in
    [0, 1]; None: always."""
    draft_tokens: int = 1
    """1 or 2 tokens drafted by a token leaving loop k: with 2 the draft map's second-token head
    also drafts the token after its successor, the two run as a pair and one call can finish two
    tokens (spec.multi; pipelined, k must divide T, one sequence, a draft map with a second-token
    head for loop k: `python -m spec.fit_draft --next`). With branch > 1 the draft tree's top-1
    candidate carries the second draft (spec.trees); with draft_loop="adaptive", pairs run at the
    loops whose map has the head, first drafts alone at the others."""
    second_threshold: float | str | None = None
    """With draft_tokens=2: draft the second token only where the second-token head's top-1
    probability is at least this value in [0, 1]; None: always; "adaptive": where second drafts at
    that confidence have passed often enough in the request so far to pay (spec.seconds)."""
    fallback: bool = True
    """Decode the rest of a one-sequence request at full depth once drafts stop paying (fewer than
    a quarter of the last 12 tokens were accepted drafts; spec.fallback), with any branch (draft
    trees too: their side lanes are dropped at the switch). Lossless either way."""
    full_depth_above: int | None = None
    """While more than this many requests (>= 1) are in the engine (running or waiting), a
    speculative request decodes the rest of its tokens at full depth (spec.fallback): in a step
    shared by many requests a call's fixed cost is spread over their rows, and the rows that drafts
    add cost more than the calls they save. Checked at every emitted token; once the load is at
    most this again, the request speculates again (stats["load_spans"]).
    A sampled request with a seed never switches (its samples must not depend on what runs beside
    it). None: never. The bundled model recommends 4 (measured on a 2-core CPU)."""
    call_cost: float = 0.0
    """With draft_loop="adaptive": a forward call's fixed cost in loop passes, in [0, 1000] (0:
    decode time follows weight passes; `python -m spec.calibrate` measures it per model)."""

    def __post_init__(self):
        if not (_is_int(self.branch) and self.branch >= 1):
            raise self._fail("branch", f"branch must be an integer >= 1 (candidates per position), got {self.branch!r}")
        if self.branch_threshold is not None:
            if self.branch == 1:
                raise self._fail("branch_threshold", "branch_threshold needs branch > 1 (draft trees)")
            self._wrap("branch_threshold", lambda: number_in("branch_threshold", self.branch_threshold, 0, 1))
        if self.draft_tokens not in (1, 2) or not _is_int(self.draft_tokens):
            raise self._fail("draft_tokens", f"draft_tokens must be 1 or 2 (tokens drafted per draft step), got {self.draft_tokens!r}")
        if self.second_threshold is not None:
            if self.draft_tokens == 1:
                raise self._fail("second_threshold", "second_threshold needs draft_tokens=2")
            if not second_threshold_ok(self.second_threshold):
                raise self._fail("second_threshold", f"second_threshold must be a number in [0, 1] or 'adaptive', got {self.second_threshold!r}")
        k = self.draft_loop
        if k is not None and k != "adaptive" and not (_is_int(k) and k >= 1):
            raise self._fail("draft_loop", f"draft_loop must be an integer >= 1 (a 1-based loop depth), 'adaptive' or None, "
                                           f"got {k!r}")
        self._wrap("call_cost", lambda: number_in("call_cost", self.call_cost, 0, 1000))
        if self.draft_len is not None and self.pipeline is True:
            raise self._fail("draft_len", "draft_len: pipeline=True sets the draft length itself (T/k - 1 drafts in "
                                          f"flight); got draft_len={self.draft_len!r}")
        n = self.draft_len
        if n is not None and n != "adaptive" and not (_is_int(n) and n >= 1):
            raise self._fail("draft_len", f"draft_len must be an integer >= 1, 'adaptive' or None, got {n!r}")
        n = self.full_depth_above
        if n is not None and not (_is_int(n) and n >= 1):
            raise self._fail("full_depth_above", f"full_depth_above must be an integer >= 1 (requests in the engine) or None, "
                                                 f"got {n!r}")
        if not isinstance(self.fallback, bool):
            raise self._fail("fallback", f"fallback must be True or False, got {self.fallback!r}")
        if self.pipeline is not None and not isinstance(self.pipeline, bool):
            raise self._fail("pipeline", f"pipeline must be True, False or None, got {self.pipeline!r}")
        self._wrap("extrapolate", lambda: number_in("extrapolate", self.extrapolate, 0, 10))

    def check(self, num_loops, kv="per_loop"):
        from spec.decoder import DEFAULT_DRAFT_LOOP

        T = num_loops
        if T < 2:
            raise ValueError(f"mode 'speculative' needs a model with at least 2 loops; this one has {T}")
        if self.draft_loop == "adaptive":
            if self.pipeline is False or self.draft_len is not None:
                raise self._fail("draft_loop", f"draft_loop='adaptive' runs in the pipeline: no draft_len and not "
                                               f"pipeline=False (got pipeline={self.pipeline}, draft_len={self.draft_len!r})")
            if self.branch > 1:
                raise self._fail("branch", f"branch={self.branch} (draft trees) does not run with draft_loop='adaptive'; "
                                           "use branch=1")
            return self
        k = min(DEFAULT_DRAFT_LOOP, T - 1) if self.draft_loop is None else self.draft_loop
        if k > T - 1:
            raise self._fail("draft_loop", f"draft_loop must be an integer in 1..{T - 1} (a 1-based loop depth below "
                                           f"T = {T}), got {self.draft_loop!r}")
        if self.pipeline and T % k:
            raise self._fail("pipeline", f"pipeline: the pipeline splits T = {T} loops into stages of draft_loop = {k}: "
                                         "k must divide T")
        if self.branch > 1 and (T % k or self.pipeline is False or self.draft_len is not None):
            raise self._fail("branch", f"branch={self.branch} (draft trees) runs in the pipeline: draft_loop must divide "
                                       f"T = {T} and draft_len must not be given (got draft_loop={k}, "
                                       f"pipeline={self.pipeline}, draft_len={self.draft_len!r})")
        if self.draft_tokens == 2 and (T % k or k < 2 or self.pipeline is False or self.draft_len is not None):
            raise self._fail("draft_tokens", f"draft_tokens=2 runs in the pipeline from a draft map: draft_loop must be "
                                             f">= 2 and divide T = {T}, and draft_len must not be given (got draft_loop={k}, "
                                             f"pipeline={self.pipeline}, draft_len={self.draft_len!r})")
        return self


@dataclass(frozen=True)
class AnytimeOptions(ModeOptions):
    """Mode "anytime" (anytime.decode): each token runs one loop at a time until a budget or exit policy stops it."""

    mode: ClassVar[str] = "anytime"

    budget: Any = None
    """An anytime.Budget, instead of the shorthands budget_ms / deadline_ms / budget_loops."""
    budget_ms: float | None = None
    """Wall time per token in milliseconds (> 0), from the row's previous token."""
    deadline_ms: float | None = None
    """Wall time for the whole request in milliseconds (> 0), spread over the tokens left."""
    budget_loops: int | None = None
    """At most this many loops per token: a 1-based depth >= 1 (a token leaves after loop
    min(budget_loops, T) at the latest: above T, no limit)."""
    exit: Any = None
    """None, an exit policy's name (anytime.POLICIES: "q_exit", "confidence", "entropy", "kl",
    "delta", "static") or an anytime.ExitPolicy."""
    threshold: float | None = None
    """The exit policy's threshold (its documented default when None); for "static", the 1-based
    loop a token exits after (>= 1; above T, every token runs to depth T)."""
    q: float | None = None
    """Alias of threshold (Ouro's q for "q_exit"); not both."""
    skip: str | None = None
    """What the loops a token skipped become: "exact", "copy" or "shared" (anytime.SKIP_MODES);
    None: "shared" on a shared-KV cache, else "exact". "shared" needs kv="last"/"mean", the others
    kv="per_loop"."""
    finish: str | None = None
    """When skip="exact" runs a skipped loop: "eager" (alongside the next token), "lazy" (when a
    later token needs its slot) or "ahead" (before the exit is decided: all T loops in one forward
    per token; not with a time budget; with a loop cap alone, as "eager"). Same tokens in all
    three. None: "eager" ("ahead" under a fixed-shape step). A checkpoint's recommended "ahead"
    gives way to a time budget."""
    step: str | None = None
    """How a finish="ahead" decode forward runs: None or "eager" (the runner's plan), "fixed" or
    "compiled" (full depth's fixed-shape step, as mode "full" takes it). A fixed-shape step needs
    what "ahead" needs: an exit policy or trace, skip "exact", no time budget, finish "ahead" or None."""
    clock: Callable[[], float] = time.perf_counter
    """A callable returning seconds; inject one to test time budgets."""
    safety: float = 1.0
    """Margin (>= 0) of the loop-cost prediction: mean + safety * mean absolute deviation."""
    trace: bool = False
    """Run the LM head at every loop so each Step.info carries "probs"."""

    def __post_init__(self):
        from anytime import POLICIES, SKIP_MODES, ExitPolicy, make_policy
        from anytime.decoder import check_finish

        for name in ("budget_ms", "deadline_ms"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf):
                raise self._fail(name, f"{name} must be a positive number of milliseconds, got {v!r}")
        v = self.budget_loops
        if v is not None and not (_is_int(v) and v >= 1):
            raise self._fail("budget_loops", f"budget_loops must be an integer >= 1 (a 1-based loop depth), got {v!r}")
        plan = self._wrap("budget", self._plan)
        if not (self.exit is None or isinstance(self.exit, ExitPolicy) or isinstance(self.exit, str) and self.exit in POLICIES):
            raise self._fail("exit", f"exit: unknown exit policy {self.exit!r}; choose one of {sorted(POLICIES)}, "
                                     "an anytime.ExitPolicy or None")
        if self.threshold is not None and self.q is not None:
            raise self._fail("q", "q: pass threshold= or q=, not both")
        name = "q" if self.q is not None else "threshold"
        self._wrap(name, lambda: make_policy(self.exit, self.threshold if self.q is None else self.q))
        if self.skip is not None and self.skip not in SKIP_MODES:
            raise self._fail("skip", f"skip: unknown skip mode {self.skip!r}; choose one of {SKIP_MODES} or None")
        self._wrap("finish", lambda: check_finish(self.finish, plan is not None and plan.timed))
        if not callable(self.clock):
            raise self._fail("clock", f"clock must be a callable returning seconds, got {self.clock!r}")
        try:
            number_in("safety", self.safety, 0)
        except ValueError as e:
            raise self._fail("safety", str(e)) from None
        if not isinstance(self.trace, bool):
            raise self._fail("trace", f"trace must be True or False, got {self.trace!r}")

    def _plan(self):
        """The anytime.Budget these options describe, or None (anytime.make_budget checks it)."""
        from anytime import make_budget

        return make_budget(self.budget, budget_ms=self.budget_ms, deadline_ms=self.deadline_ms, budget_loops=self.budget_loops)

    def check(self, num_loops, kv="per_loop"):
        from anytime.decoder import check_step

        shared = kv != "per_loop"
        plan = self._plan()  # checked in __post_init__
        timed = plan is not None and plan.timed
        whole = self.exit is None and not timed and not self.trace
        skip = self.skip or ("shared" if shared else "exact")
        if self.skip == "shared" and not shared:
            raise self._fail("skip", "skip: 'shared' needs a shared-KV cache (one K/V per layer): pass kv='last' or "
                                     "kv='mean', or use skip='exact' / 'copy' with the per-loop cache")
        if self.skip not in (None, "shared") and shared:
            raise self._fail("skip", f"skip: {self.skip!r} needs the per-loop cache (kv='per_loop'); a shared-KV cache "
                                     "takes skip='shared'")
        self._wrap("step", lambda: check_step(self.step, self.finish, skip, timed, whole))
        return self


OPTIONS: dict[str, type[ModeOptions]] = {"full": FullOptions, "speculative": SpeculativeOptions, "anytime": AnytimeOptions}


def options_class(mode: str) -> type[ModeOptions]:
    """The options dataclass of `mode`: OPTIONS', or for a mode registered in looplm.decoding.MODES
    without one, a dataclass of its decoder's parameters after (model, request) with their
    defaults and no checks of their values."""
    if mode in OPTIONS:
        return OPTIONS[mode]
    return _from_signature(mode, resolve_mode(mode))


@functools.lru_cache(maxsize=None)
def _from_signature(mode: str, decoder_fn: Callable) -> type[ModeOptions]:
    params = list(inspect.signature(decoder_fn).parameters.values())[2:]
    spec = [(p.name, Any) if p.default is p.empty else (p.name, Any, field(default=p.default)) for p in params]
    return make_dataclass(f"{mode.title()}Options", spec, bases=(ModeOptions,), namespace={"mode": mode},
                          frozen=True, kw_only=True)


def option_names(mode: str) -> tuple[str, ...]:
    """The option names of `mode`, in the decoder's order."""
    return tuple(f.name for f in fields(options_class(mode)))


def resolve(mode: str, values: dict, num_loops: int, kv: str = "per_loop", recommended: frozenset = frozenset(),
            notes: dict | None = None) -> ModeOptions:
    """The checked options of `mode` from keyword values (the caller's over the checkpoint's).

    A draft tree the checkpoint recommends (branch, branch_threshold) gives way to the caller's
    own options that rule it out (draft_len, pipeline=False, a draft_loop not dividing T; branch=1
    under a recommended branch_threshold): it is dropped and `notes["branch_unused"]` says why.
    So do recommended second-token drafts (draft_tokens=2, second_threshold) before the caller's
    draft_loop, draft_len or pipeline (and draft_tokens=1 under a recommended
    second_threshold), said in `notes["draft_tokens_unused"]`.
    A recommended finish="ahead" gives way to the caller's time budget (budget_ms, deadline_ms, a
    timed budget), said in `notes["finish_unused"]`.
    A checkpoint whose own options conflict still raises.

    Args:
        mode: a key of looplm.decoding.MODES.
        values: option name -> value; names in `recommended` came from the checkpoint's
            generation_config.json, and errors about them say so.
        num_loops: the model's depth T.
        kv: the request's KV mode ("per_loop", "last" or "mean").
    Raises:
        ValueError: an unknown option (naming the mode it belongs to, if any), or a bad value or
            combination (an OptionError naming the option and the mode).
    """
    cls = options_class(mode)
    accepted = option_names(mode)
    for key in values:
        if key in accepted:
            continue
        owners = [m for m in OPTIONS if m != mode and key in option_names(m)]
        where = f"; it is an option of mode {owners[0]!r}" if owners else ""
        source = " (from the checkpoint's generation_config.json)" if key in recommended else ""
        raise ValueError(f"unknown option {key!r}{source} for mode {mode!r}{where}; mode {mode!r} takes: "
                         f"{', '.join(sorted(accepted)) or 'no options'}")
    try:
        return cls(**values).check(num_loops, kv)
    except TypeError as e:  # a required option of a registered mode's decoder is missing
        raise ValueError(f"mode {mode!r}: {e}") from None
    except OptionError as e:
        kept = _without_recommended(mode, e.option, values, recommended)
        if kept is None and e.option not in recommended:
            raise
        if kept is None:
            raise OptionError(mode, e.option, e.message, "; the value is the checkpoint's, from generation_config.json") from None
        opts = resolve(mode, kept, num_loops, kv, recommended)
        if notes is not None:
            gone = [k for k in values if k not in kept]
            key = ("finish_unused" if "finish" in gone else
                   "draft_tokens_unused" if "draft_tokens" in gone or "second_threshold" in gone else "branch_unused")
            dropped = ", ".join(f"{k}={values[k]!r}" for k in gone)
            notes[key] = f"the checkpoint's recommended {dropped} does not run with this request's options: {e.message}"
        return opts


# recommended option -> the caller's options that may rule it out (it then gives way, see `resolve`)
_GIVE_WAY = {"speculative": {"branch": ("draft_loop", "draft_len", "pipeline"), "branch_threshold": ("branch",),
                             "draft_tokens": ("draft_loop", "draft_len", "pipeline"), "second_threshold": ("draft_tokens",)},
             "anytime": {"finish": ("budget_ms", "deadline_ms", "budget")}}


_GROUPS = ({"branch", "branch_threshold"}, {"draft_tokens", "second_threshold"}, {"finish"})  # what gives way together


def _without_recommended(mode: str, option: str, values: dict, recommended: frozenset) -> dict | None:
    """`values` less the checkpoint's draft-tree, second-draft or finish options when the caller's
    own options caused `option`'s error (see `resolve`); None when the error stands."""
    causes = _GIVE_WAY.get(mode)
    if causes is None:
        return None
    caller = {k for k in values if k not in recommended}
    if option in recommended:  # a recommended option failed: did one of the caller's options rule it out?
        failed = {option} if any(c in caller for c in causes.get(option, ())) else set()
    else:  # the caller's option failed: which recommended options does it rule out?
        failed = {k for k in values if k in recommended and option in causes.get(k, ())}
    drop = {k for g in _GROUPS if g & failed for k in g if k in recommended and k in values}
    return {k: v for k, v in values.items() if k not in drop} if drop else None


def check_object(options: object, mode: str, num_loops: int, kv: str = "per_loop") -> ModeOptions:
    """An options object passed as `options=`: it must be `mode`'s."""
    if not isinstance(options, ModeOptions):
        raise ValueError(f"options must be a looplm.options object ({', '.join(c.__name__ for c in OPTIONS.values())}), "
                         f"got {type(options).__name__}")
    if mode != options.mode:
        raise ValueError(f"options is a {type(options).__name__} (mode {options.mode!r}) but mode={mode!r}")
    return options.check(num_loops, kv)
