"""Measures which speculative setting (draft loop k, branch b, second drafts) decodes fastest for a checkpoint here.

    python -m spec.calibrate [--checkpoint DIR] [--loops K,K] [--branches B,B] [--draft-tokens 1,2]
                             [--second-thresholds P,P] [--prompts N] [--new-tokens N] [--repeats R]
                             [--loads N,N|none] [--threads N] [--write]

Candidates: every draft loop k in 1..T-1 that divides T (the pipeline and draft trees need it; or
those of `--loops`) times every branch b of `--branches` (default 1,2,3); and, where the
checkpoint's draft map has a second-token head for a k >= 2 (`python -m spec.fit_draft --next`),
draft_tokens=2 at k with each branch (b > 1: draft trees whose top-1 candidate carries the second
draft) and each second_threshold of `--second-thresholds` (default none,0.1,0.3,adaptive; "none":
always; "adaptive": chosen online per request, spec.seconds); `--branches 1` keeps the sweep
short where trees cannot pay (a CPU, where a call's extra rows cost). Greedy, batch 1, each
built-in prompt (prose and code; token ids drawn from a fixed seed for a checkpoint without a
tokenizer) generated alone to `--new-tokens` tokens. Each setting's calls alternate with
full-depth calls, `--repeats` times; its ratio is the median over repeats of its tokens/s over the
tokens/s of the full-depth call just before it, so a change of machine load between repeats cancels
out; the best is the simplest setting (fewest branches, then one drafted token before two, then the
latest draft loop; among thresholds the fewest weight passes per token) within MARGIN (5%) of the fastest, as nearly
equal ratios differ by noise. Every setting's tokens must equal full depth's (lossless; a
difference is a bug and stops the run). The checkpoint's other recommended options (draft map, extrapolation) apply to every setting.

Which setting wins depends on the model (how often its loop-k drafts are accepted) and on the
device (whether a forward's extra rows are free): run it per checkpoint and per kind of machine.
`--write` records the best setting in the checkpoint's generation_config.json under
"looplm": {"speculative": {"draft_loop": k, "branch": b, "calibrated": {...}}}, with
"draft_tokens": 2 and "second_threshold" when second drafts won (its other keys are kept), so
`mode="speculative"` uses it by default (Engine.mode_defaults); when no setting beats full depth,
the options are left as they were and "calibrated" says "speculation_pays": false.

Then the best setting is timed beside other requests (`--loads`, default 1,2,3,4,6,8: that many
requests submitted together, drafting whatever the load, against full depth), and `--write` also
records `full_depth_above`: the most requests at once up to which speculation paid (by more than
MARGIN) at every load swept (None when it paid at all of them), above which a request switches to
full depth.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from looplm.options import second_threshold_ok

from .adapt import divisors_below

PROMPTS = [
    "def fibonacci(n):",
    "It is a truth universally acknowledged, that a single man",
    "import os\nimport sys\n\ndef main():",
    "Emma Woodhouse, handsome, clever, and rich,",
    "class Stack:\n    def __init__(self):",
    "The with statement is used to wrap the execution of a block",
    "for i in range(10):\n    if i % 2 == 0:",
    "Mr. Darcy said nothing, but",
]
"""The built-in prompts, prose and code alternating (`--prompts N` takes the first N)."""


class Setting(NamedTuple):
    """A speculative setting the sweep times: draft loop k, branch b, and second-token drafts (draft_tokens=2)."""

    draft_loop: int
    branch: int
    draft_tokens: int = 1
    second_threshold: float | str | None = None

    def options(self) -> dict:
        """Its keyword options for mode "speculative" (every one given, over the checkpoint's recommendation)."""
        opts = {"mode": "speculative", "draft_loop": self.draft_loop, "branch": self.branch, "draft_tokens": self.draft_tokens}
        return opts if self.draft_tokens == 1 else {**opts, "second_threshold": self.second_threshold}

    def __str__(self) -> str:
        pairs = "" if self.draft_tokens == 1 else f" d=2 s={threshold_name(self.second_threshold)}"
        return f"k={self.draft_loop} b={self.branch}{pairs}"


def threshold_name(p: float | str | None) -> str:
    """A second_threshold as the command line writes it: none, adaptive or the number."""
    return "none" if p is None else p if isinstance(p, str) else f"{p:g}"


Measure = Callable[[Callable[[], list], "Setting | None"], tuple[float, list]]
"""measure(run, setting) -> (seconds, run's result): times one call; setting None is full depth."""


MARGIN = 0.05
"""A setting with more rows per forward is recommended only when it beats the simpler ones by more than this share."""


class NotLossless(AssertionError):
    """A speculative setting's greedy tokens differ from full depth's (a bug in the decoder)."""


def check_lossless(what: str, gens, reference: list[list[int]]) -> None:
    """Raises NotLossless, naming `what`, the prompt and the first differing token, where a
    speculative generation's greedy tokens differ from full depth's `reference`."""
    for i, (g, ref) in enumerate(zip(gens, reference)):
        if g.tokens != ref:
            first = next(j for j, (a, b) in enumerate(zip(g.tokens + [None], ref + [None])) if a != b)
            raise NotLossless(f"{what}: prompt {i}'s greedy tokens differ from full depth (first at token {first})"
                              " - speculation must be lossless: this is a bug")


def wall_clock(run: Callable[[], list], setting: Setting | None = None) -> tuple[float, list]:
    """The default measure: wall seconds of `run()` (the device synchronised on both sides)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = run()
    sync()
    return time.perf_counter() - t0, out


def parse_ints(text: str | Sequence[int] | None, option: str) -> list[int] | None:
    """"1,2" -> [1, 2] (a list passes through); a ValueError naming `option` when it is not a list of integers."""
    if text is None or not isinstance(text, str):
        return None if text is None else list(text)
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{option}: expected comma-separated integers, got {text!r}")
    return values


def candidates(num_loops: int, loops: Sequence[int] | None = None, branches: Sequence[int] = (1, 2, 3),
               pair_loops: Sequence[int] = (), thresholds: Sequence[float | str | None] = (None,)) -> list[Setting]:
    """Every (k, b): k in `loops` (default: every 1 <= k < T dividing T), b in `branches`; then
    draft_tokens=2 at each of those k that is in `pair_loops` (the draft loops whose map has a
    second-token head) and >= 2, with each b (b > 1: the tree's top-1 candidate carries the second
    draft, spec.trees) and each second_threshold of `thresholds`.

    Raises ValueError naming --loops or --branches for a k that is not in 1..T-1 or does not divide
    T, or a branch that is not an integer >= 1, and naming --second-thresholds for a threshold
    outside [0, 1].
    """
    T = num_loops
    if T < 2:
        raise ValueError(f"speculation needs a model with at least 2 loops; this one has {T}")
    divisors = divisors_below(T)
    ks = divisors if loops is None else list(loops)
    for k in ks:
        if not (isinstance(k, int) and k in divisors):
            raise ValueError(f"--loops: draft loop {k!r} must be in 1..{T - 1} and divide T = {T} (the pipeline runs "
                             f"T/k stages); this model takes {divisors}")
    if not branches:
        raise ValueError("--branches: give at least one branch")
    for b in branches:
        if not (isinstance(b, int) and not isinstance(b, bool) and b >= 1):
            raise ValueError(f"--branches: branch {b!r} must be an integer >= 1 (candidates per position)")
    for p in thresholds:
        if not second_threshold_ok(p):
            raise ValueError(f"--second-thresholds: {p!r} must be 'none', 'adaptive' or a probability in [0, 1]")
    plain = [Setting(k, b) for k in dict.fromkeys(ks) for b in dict.fromkeys(branches)]
    pairs = [Setting(k, b, 2, p) for k in dict.fromkeys(ks) if k >= 2 and k in pair_loops
             for b in dict.fromkeys(branches) for p in dict.fromkeys(thresholds)]
    return plain + pairs


def parse_thresholds(text: str) -> list[float | str | None]:
    """"none,0.1,adaptive" -> [None, 0.1, "adaptive"]; a ValueError naming --second-thresholds otherwise."""
    words = {"none": None, "adaptive": "adaptive"}
    why = f"--second-thresholds: expected comma-separated probabilities, 'none' or 'adaptive', got {text!r}"
    try:
        values = [words[v.strip().lower()] if v.strip().lower() in words else float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(why) from None
    if not values:
        raise ValueError(why)
    return values


def pair_loops(engine) -> list[int]:
    """The draft loops at which the checkpoint's recommended draft map has a second-token head."""
    from .drafts import DraftMap

    path = engine.mode_defaults("speculative").get("draft_map")
    if not isinstance(path, str):
        return []
    dmap = DraftMap.load(path)
    return sorted(k for k in dmap.params if dmap.has_next(k))


def check_counts(repeats: int, new_tokens: int) -> None:
    """A ValueError naming --repeats or --new-tokens when it is below 1."""
    if repeats < 1:
        raise ValueError(f"--repeats: must be >= 1, got {repeats}")
    if new_tokens < 1:
        raise ValueError(f"--new-tokens: must be >= 1, got {new_tokens}")


def default_prompts(engine, n: int | None = None) -> list[list[int]]:
    """The first n built-in prompts as token ids; a checkpoint without a tokenizer gets n fixed random ones."""
    n = len(PROMPTS) if n is None else n
    if not 1 <= n <= len(PROMPTS):
        raise ValueError(f"--prompts: must be in 1..{len(PROMPTS)} (the built-in prompts), got {n}")
    if engine.tokenizer is not None:
        return [engine.encode(t) for t in PROMPTS[:n]]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 12, (n,), generator=g).tolist()
    return [torch.randint(0, engine.config.vocab_size, (m,), generator=g).tolist() for m in lengths]


def _pooled(gens) -> dict:
    """Weight passes and forwards per token, and token acceptance, over the prompts (ratios of sums)."""
    tokens = sum(len(g.tokens) for g in gens)
    st = [g.stats for g in gens]
    tested = sum(s.get("accepted", 0) + s.get("rejected", 0) for s in st)
    return {"weight_passes_per_token": sum(s["weight_passes_per_token"] * len(g.tokens) for s, g in zip(st, gens)) / max(tokens, 1),
            "forwards_per_token": sum(s["forwards"] for s in st) / max(tokens, 1),
            "token_acceptance": sum(s.get("accepted", 0) for s in st) / tested if tested else None}


def sweep(engine, settings: Sequence[Setting], prompts: Sequence[list[int]], new_tokens: int = 64, repeats: int = 3,
          measure: Measure = wall_clock, progress: bool = True, margin: float = MARGIN) -> dict:
    """Times every setting against full depth (the module docstring); returns the table and the best.

    Returns {"rows": [{draft_loop, branch, draft_tokens, second_threshold, tokens_per_s, ratio_to_full,
    ratios, weight_passes_per_token, forwards_per_token, token_acceptance}], "full_tokens_per_s", "full_weight_passes_per_token",
    "full_forwards_per_token", "tokens", "best": see `best_row`, "call_cost": see `fit_call_cost`}.
    Raises NotLossless when a setting's tokens differ from full depth's.
    """
    check_counts(repeats, new_tokens)

    def run(setting: Setting | None, which=prompts, n=new_tokens) -> Callable[[], list]:
        opts = {} if setting is None else Setting(*setting).options()
        return lambda: [engine.generate(p, max_new_tokens=n, stop=[], **opts) for p in which]

    full = run(None)()  # untimed: the reference tokens, and a warm-up
    reference = [g.tokens for g in full]
    tokens = sum(len(t) for t in reference)
    for s in settings:  # warm-up of each decoder (first calls allocate lanes, draft maps, ...)
        run(s, prompts[:1], min(new_tokens, 8))()
    full_seconds: list[float] = []
    seconds: dict[Setting, list[float]] = {s: [] for s in settings}
    ratios: dict[Setting, list[float]] = {s: [] for s in settings}
    gens_of = {}
    bar = tqdm(total=repeats * len(settings), desc="calibrate", disable=not progress, mininterval=2)
    for _ in range(repeats):
        for s in settings:
            f_dt, _ = measure(run(None), None)
            dt, gens = measure(run(s), s)
            check_lossless(str(Setting(*s)), gens, reference)
            full_seconds.append(f_dt)
            seconds[s].append(dt)
            ratios[s].append(f_dt / dt)  # tokens are equal on both sides: tok/s ratio = time ratio
            gens_of[s] = gens
            bar.set_postfix_str(f"{Setting(*s)} {f_dt / dt:.2f}x", refresh=False)
            bar.update()
    bar.close()
    rows = [{**Setting(*s)._asdict(), "tokens_per_s": tokens / statistics.median(seconds[s]),
             "ratio_to_full": statistics.median(ratios[s]), "ratios": ratios[s], **_pooled(gens_of[s])} for s in settings]
    pooled = _pooled(full)
    result = {"rows": rows, "tokens": tokens, "full_tokens_per_s": tokens / statistics.median(full_seconds),
              "full_weight_passes_per_token": pooled["weight_passes_per_token"],
              "full_forwards_per_token": pooled["forwards_per_token"], "best": best_row(rows, margin)}
    result["call_cost"] = fit_call_cost(result)
    return result


def load_sweep(engine, setting: Setting, prompts: Sequence[list[int]], loads: Sequence[int], new_tokens: int = 64,
               repeats: int = 3, measure: Measure = wall_clock, progress: bool = True) -> dict:
    """Times `setting` (drafting whatever the load: full_depth_above=None) against full depth on n
    requests submitted together (one generate call of n prompts, the built-in ones in turn: they
    share every engine step), for each n in `loads`, alternating `repeats` times; each ratio is
    the median of full depth's seconds over the setting's.

    Returns {"loads": [{"requests": n, "ratio_to_full": r, "ratios": [...]}], "full_depth_above":
    `load_limit` of them}. Raises NotLossless when the setting's tokens differ from full depth's.
    """
    check_counts(repeats, new_tokens)
    opts = {**Setting(*setting).options(), "full_depth_above": None}
    rows = []
    bar = tqdm(total=repeats * len(loads), desc="loads", disable=not progress, mininterval=2)
    for n in loads:
        batch = [prompts[i % len(prompts)] for i in range(n)]
        ratios = []
        for _ in range(repeats):
            f_dt, full = measure(lambda: engine.generate(batch, max_new_tokens=new_tokens, stop=[]), None)
            dt, gens = measure(lambda: engine.generate(batch, max_new_tokens=new_tokens, stop=[], **opts), setting)
            check_lossless(f"{Setting(*setting)} beside {n - 1} other requests", gens, [g.tokens for g in full])
            ratios.append(f_dt / dt)
            bar.set_postfix_str(f"{n} requests {f_dt / dt:.2f}x", refresh=False)
            bar.update()
        rows.append({"requests": n, "ratio_to_full": statistics.median(ratios), "ratios": ratios})
    bar.close()
    return {"loads": rows, "full_depth_above": load_limit(rows)}


def load_limit(rows: list[dict], margin: float = MARGIN) -> int | None:
    """The full_depth_above these load rows recommend: the most requests n such that speculation
    paid (ratio >= 1 + margin: a ratio within the margin of 1 is noise on a shared machine, and
    switching there costs nothing) at every swept load up to n; 1 when it did not pay at the
    fewest; None (never switch) when it paid at every load swept."""
    rows = sorted(rows, key=lambda r: r["requests"])
    paid = 0
    for r in rows:
        if r["ratio_to_full"] < 1 + margin:
            return max(paid, 1)
        paid = r["requests"]
    return None


def fit_call_cost(result: dict) -> float | None:
    """A forward call's fixed cost in loop passes here (the r of draft_loop="adaptive", spec.adapt):
    seconds per token ~ c_call * forwards per token + c_loop * weight passes per token, fitted by
    least squares over full depth and the branch-1 settings of one drafted token (their rows per call are the tokens in
    flight, whose loops add up to about T per token in each), r = c_call / c_loop, rounded and
    clipped to [0, 1000]. None with fewer than three points, or when the fit's loop cost is not
    positive (noise swamped the difference between the settings)."""
    pts = [(result["full_forwards_per_token"], result["full_weight_passes_per_token"], 1 / result["full_tokens_per_s"])]
    pts += [(r["forwards_per_token"], r["weight_passes_per_token"], 1 / r["tokens_per_s"]) for r in result["rows"]
            if r["branch"] == 1 and r.get("draft_tokens", 1) == 1]
    if len(pts) < 3:
        return None
    a = torch.tensor(pts, dtype=torch.float64)
    sol = torch.linalg.lstsq(a[:, :2], a[:, 2:]).solution[:, 0]
    c_call, c_loop = float(sol[0]), float(sol[1])
    if c_loop <= 0:
        return None
    return round(min(max(c_call / c_loop, 0.0), 1000.0), 2)


def best_row(rows: list[dict], margin: float = MARGIN) -> dict:
    """The simplest row whose ratio is within `margin` of the highest: fewest branches, then one
    drafted token before two, then the latest draft loop (fewest rows per forward); among second-draft
    settings of one draft loop (thresholds), the fewest weight passes per token. Rows of nearly
    equal speed differ by noise on a shared machine, the simpler setting wastes less where they do
    not, and weight passes are what decode time follows at batch 1 on an accelerator or for a model
    larger than the CPU's caches."""
    top = max(r["ratio_to_full"] for r in rows)
    close = [r for r in rows if r["ratio_to_full"] >= top * (1 - margin)]
    return min(close, key=lambda r: (r["branch"], r.get("draft_tokens", 1), -r["draft_loop"], r["weight_passes_per_token"]))


def print_table(result: dict, file=None) -> None:
    file = file or sys.stdout
    print(f"full depth: {result['full_tokens_per_s']:.1f} tokens/s, {result['full_weight_passes_per_token']:.2f} weight "
          f"passes/token ({result['tokens']} tokens per call)", file=file)
    print(" k  b  d  second   tokens/s  ratio to full  passes/token  token acceptance", file=file)
    for r in result["rows"]:
        acc = "-" if r["token_acceptance"] is None else f"{r['token_acceptance']:.3f}"
        d = r.get("draft_tokens", 1)
        second = "-" if d == 1 else threshold_name(r.get("second_threshold"))
        print(f" {r['draft_loop']}  {r['branch']}  {d}  {second:>6}  {r['tokens_per_s']:9.1f}  {r['ratio_to_full']:13.2f}  "
              f"{r['weight_passes_per_token']:12.2f}  {acc:>16}", file=file)
    if result.get("call_cost") is not None:
        print(f"a forward call costs about {result['call_cost']:.2f} loop passes here (call_cost, for draft_loop='adaptive')", file=file)
    best = result["best"]
    name = ", ".join(f"{k}={v}" for k, v in _recommended(best).items())
    if best["ratio_to_full"] >= 1:
        print(f"best: {name} ({best['ratio_to_full']:.2f}x full depth)", file=file)
    else:
        print(f"full depth is faster here: the best setting, {name}, runs at {best['ratio_to_full']:.2f}x full depth", file=file)


def print_loads(loads: dict, file=None) -> None:
    file = file or sys.stdout
    print("requests at once  ratio to full (drafting whatever the load)", file=file)
    for r in loads["loads"]:
        print(f"{r['requests']:16d}  {r['ratio_to_full']:.2f}", file=file)
    limit = loads["full_depth_above"]
    print("full_depth_above: None (speculation paid at every load swept)" if limit is None else
          f"full_depth_above: {limit} (above it a request switches to full depth)", file=file)


def _recommended(row: dict) -> dict:
    """A row's setting as the options generation_config.json records (draft_tokens only when 2)."""
    opts = {"draft_loop": row["draft_loop"], "branch": row["branch"]}
    if row.get("draft_tokens", 1) == 2:
        opts.update(draft_tokens=2, second_threshold=row.get("second_threshold"))
    return opts


def check_checkpoint(path: str | Path, write: bool) -> Path:
    """The checkpoint directory; a ValueError naming the path when it is missing, has no
    config.json, or (with `write`) is not writable."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--checkpoint: {path} is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"--checkpoint: {path} has no config.json (not a checkpoint directory)")
    gc = path / "generation_config.json"
    if write and not (os.access(path, os.W_OK) and (not gc.exists() or os.access(gc, os.W_OK))):
        raise ValueError(f"--write: {gc if gc.exists() else path} is not writable")
    return path


def write_recommendation(checkpoint: str | Path, result: dict, *, device: str = "cpu", threads: int | None = None,
                         settings: dict | None = None) -> dict:
    """Records `result`'s best setting in the checkpoint's generation_config.json (every other key
    kept); returns the new "looplm.speculative" object.

    Best ratio >= 1: draft_loop and branch are set, and draft_tokens=2 and second_threshold when
    second drafts won (else those two are removed), and full_depth_above when `result` has a
    load sweep ("loads", `load_sweep` of the best setting; its ratios go into "calibrated"). Below 1, they are left as they were. A fitted
    call cost (`fit_call_cost`) is set as call_cost, which draft_loop="adaptive" reads. Either way
    "calibrated" records the measured ratio, whether speculation pays, the device, the torch thread
    count and the date (UTC).
    """
    path = Path(checkpoint) / "generation_config.json"
    gc = json.loads(path.read_text()) if path.is_file() else {}
    looplm_opts = gc.setdefault("looplm", {})
    if not isinstance(looplm_opts, dict) or not isinstance(looplm_opts.setdefault("speculative", {}), dict):
        raise ValueError(f"{path}: looplm.speculative must be an object of options")
    spec_opts = looplm_opts["speculative"]
    best = result["best"]
    pays = best["ratio_to_full"] >= 1
    if pays:
        for key in ("draft_tokens", "second_threshold"):
            spec_opts.pop(key, None)
        spec_opts.update(_recommended(best))
    if result.get("call_cost") is not None:
        spec_opts["call_cost"] = result["call_cost"]
    loads = result.get("loads")
    if pays and loads is not None:
        spec_opts["full_depth_above"] = loads["full_depth_above"]
    spec_opts["calibrated"] = {
        **_recommended(best), "ratio_to_full": round(best["ratio_to_full"], 4),
        "speculation_pays": pays, "full_tokens_per_s": round(result["full_tokens_per_s"], 2),
        "device": device, "torch_threads": torch.get_num_threads() if threads is None else threads,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **({"loads": [[r["requests"], round(r["ratio_to_full"], 3)] for r in loads["loads"]]} if pays and loads else {}),
        **({"settings": settings} if settings else {}),
    }
    path.write_text(json.dumps(gc, indent=2) + "\n")
    return spec_opts


def main(argv: list[str] | None = None) -> int:
    import looplm
    from looplm.api import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python -m spec.calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the bundled default model)")
    p.add_argument("--loops", default=None, help="draft loops k to try, e.g. 1,2 (default: every k < T dividing T)")
    p.add_argument("--branches", default="1,2,3", help="branches b to try (default 1,2,3)")
    p.add_argument("--draft-tokens", default="1,2", help="tokens drafted per draft step to try: 1, 2 or 1,2 (default; 2 "
                                                          "where the draft map has a second-token head)")
    p.add_argument("--second-thresholds", default="none,0.1,0.3,adaptive",
                   help="second_threshold values to try with draft_tokens=2 (default none,0.1,0.3,adaptive; none: "
                        "always; adaptive: chosen per request from observed acceptance)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"the first N built-in prompts (1..{len(PROMPTS)})")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per setting, each after a full-depth call")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (looplm.load's threads)")
    p.add_argument("--loads", default="1,2,3,4,6,8",
                   help="requests at once to time the best setting at, against full depth, for full_depth_above "
                        "(default 1,2,3,4,6,8; none: skip)")
    p.add_argument("--write", action="store_true", help="record the best setting in the checkpoint's generation_config.json")
    a = p.parse_args(argv)
    try:  # every argument is checked before the model is timed (the loops once T is known)
        ckpt = check_checkpoint(DEFAULT_MODEL if a.checkpoint is None else a.checkpoint, a.write)
        loops, branches = parse_ints(a.loops, "--loops"), parse_ints(a.branches, "--branches")
        draft_tokens, thresholds = parse_ints(a.draft_tokens, "--draft-tokens"), parse_thresholds(a.second_thresholds)
        if not set(draft_tokens) <= {1, 2}:
            raise ValueError(f"--draft-tokens: each must be 1 or 2, got {a.draft_tokens!r}")
        check_counts(a.repeats, a.new_tokens)
        loads = None if a.loads.strip().lower() == "none" else parse_ints(a.loads, "--loads")
        if loads is not None and min(loads) < 1:
            raise ValueError(f"--loads: each must be an integer >= 1 (requests at once), got {a.loads!r}")
        engine = looplm.load(ckpt, threads=a.threads)
        heads = pair_loops(engine) if 2 in draft_tokens else []
        if draft_tokens == [2] and not heads:
            raise ValueError(f"--draft-tokens: 2 needs a recommended draft map with a second-token head; {ckpt} has none "
                             "(`python -m spec.fit_draft --next --recommend`)")
        settings = candidates(engine.model.num_loops, loops, branches, heads, thresholds)
        if 1 not in draft_tokens:
            settings = [s for s in settings if s.draft_tokens == 2]
            if not settings:
                raise ValueError(f"--draft-tokens: 2 needs a draft loop >= 2 among --loops with a second-token head (the map has {heads})")
        prompts = default_prompts(engine, a.prompts)
    except ValueError as e:
        p.error(str(e))
    device = str(engine.device)
    if engine.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(engine.device)})"
    print(f"{ckpt}: T = {engine.model.num_loops} loops on {device}, {torch.get_num_threads()} torch threads; "
          f"{len(settings)} settings x {a.repeats} repeats, {len(prompts)} prompts x {a.new_tokens} tokens", flush=True)
    result = sweep(engine, settings, prompts, a.new_tokens, a.repeats)
    print_table(result)
    best = result["best"]
    if loads and best["ratio_to_full"] >= 1:
        setting = Setting(best["draft_loop"], best["branch"], best.get("draft_tokens", 1), best.get("second_threshold"))
        result["loads"] = load_sweep(engine, setting, prompts, sorted(set(loads)), a.new_tokens, a.repeats)
        print_loads(result["loads"])
    if a.write:
        spec_opts = write_recommendation(ckpt, result, device=device, settings={
            "prompts": len(prompts), "new_tokens": a.new_tokens, "repeats": a.repeats, "swept": [str(s) for s in settings]})
        print(f"recorded in {ckpt / 'generation_config.json'}: {spec_opts}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
