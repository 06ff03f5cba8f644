"""anytime: a decoder whose depth adapts per token and which keeps a latency promise.

Each token's loops run one at a time (one Forward per loop, run by the engine in the same step as
every other request's work). After every loop the decoder decides whether the token leaves now:

1. at loop T ("max_depth");
2. when the exit policy says so ("policy", see `anytime.policies`: "q_exit", "confidence",
   "entropy", "kl", "delta", "static");
3. when the budget has no room for another loop ("budget"). The budget always wins: a loop budget
   of k loops stops every token at loop k at the latest; a time budget (per token, or a whole-request
   deadline spread over the row's remaining tokens) stops a token when its elapsed time plus the
   predicted cost of one more loop would exceed it. The prediction is an online moving average of
   the measured loop period per (rows, positions per row, context-length bucket); see
   `anytime.budget.LoopCost`. The first loop of a token always runs, so a token misses its budget
   when one loop does not fit. The measured period is the engine step's: work of other requests in
the same step counts, so a busy engine makes a timed request leave earlier.

The token is then chosen from the shared LM head at its exit loop (greedy or sampled, with
`looplm.sampling.choose`). Requests are independent: each starts its next token as soon as it
emitted the previous one, so requests sit at different loops within one engine step, and a
request with a time budget has its work run first in a step (looplm.scheduler). The first token comes from the prefill, which runs all T loops with per-loop KV (docs/design.md, "Shared KV"); its exit loop is
chosen by the policy and a loop budget from the prefill's per-loop outputs.

Skipped loops. A token emitted at loop t < T leaves the KV slots of loops t+1..T at its position
unwritten, and later tokens read them at those loops. `skip=` says what happens:

- "exact" (default): the skipped loops are finished later, one loop per iteration, in the same
  forward as the row's next token (its pending positions ride along at their own loops, reading and
  writing their own loops' slots). A pending token is always at a deeper loop than every later
  token of its row, so the slot a later token reads at loop m is written before it is read. Cost:
  no extra forward calls or latency at batch 1 beyond a wider forward (up to T positions instead of
  1 per row), and the full T loops of compute per token in the end (`loops_computed_per_token`).
  `finish="lazy"` runs a pending loop only when a later token of the row reaches that loop (in
  the same forward, at the same loop: the slot is written before the same layer reads it), so
  loops that no later token reaches are never computed: with a budget of k loops for every
  token, decoding costs k loops per token. Same tokens; the cache then equals the full-depth
  cache in every slot that was written. `finish="ahead"` runs the skipped loops before the exit is
  decided: every decode token runs all T loops in one forward, as full depth does, and the exit
  decision is replayed over its per-loop outputs (as for the prefill's token; one policy call over
  every loop's observations, since policies decide per row); same tokens and exit
  loops, the full-depth cache at once, one forward per token instead of one per loop; a token is
  emitted after T loops, so no time budget. Eager suits hardware where a wider forward is free
  (memory-bound batch-1 decode on a GPU); lazy suits compute-bound CPUs whose tokens leave early;
  ahead suits a small model on a CPU, where a forward's fixed cost is about a loop body's and an
  extra row is not free. With a loop cap alone there is nothing to decide, and ahead runs as eager
  (`anytime.capped`). The default is "eager"; a checkpoint may recommend another
  (generation_config.json, "looplm": {"anytime": {"finish": ...}}; the bundled model recommends
  "ahead"), which gives way to a time budget. With "ahead", `step="fixed"|"compiled"` runs
  those one-token, all-loop forwards through full depth's fixed-shape step (kernels.fast_step).
  Exact against the full-depth per-loop cache: token i equals the no-cache reference "logits of
  loop exit_loop(i) at position i of the sequence, every position's state from all T loops", so a
  loop budget of k reproduces `argmax per_loop_logits(seq)[k - 1]` and no budget/policy reproduces
  full-depth decoding.
- "copy": for every layer l, slot (t', l) for t' = t+1..T at the token's position gets a copy of
  slot (t, l) (K after RoPE and V, exactly the stored tensors of the last computed loop); nothing is
  recomputed. Cost: a memory copy of (T - t) * L * Hkv * D * 2 elements per skipped token; compute
  is exactly the exit loops. Approximate (CALM-style state propagation): exact only against itself;
  equals full depth when no token skips a loop.
- "shared": read a shared-KV cache (`Engine.generate(..., kv="last"|"mean")`,
  a one-slot looplm.paged.PagedKVCache: one K/V per layer and position). Nothing to fill: "last" holds the
  K/V of the token's exit loop, "mean" the average over the loops it computed. Cost: nothing, and
  a T-fold smaller cache. Exact against decoding on that shared cache (with no budget or policy it
  equals full-depth decoding with the same kv mode), not against the per-loop cache. It is the
  default when the request's cache is shared; "exact"/"copy" on a shared cache raise, and so does
  "shared" on the per-loop cache.

Loop k of a position reads only loop-k K/V of earlier positions, so loops that no later token
reaches are dead compute: with the same exit loop k for every token, all three modes (and
`finish="lazy"`) give the same tokens; they differ when tokens exit at different loops.

Step output: token, exit_loop (1-based loop whose head produced it), loops (computed for it when
emitted: exit_loop, or T for the prefill-emitted first token), latency_ms (since the row's previous
token), reason, and info: "signal" (the policy's signal after each loop), "probs" (the chosen
token's probability after each loop, when the head ran at every loop: `trace=True` or a policy that
needs probabilities), "budget_ms" (the token's time budget). Statistics land in `req.stats`:
mean_loops (mean exit loop), exit_loop_counts, exit_reasons, loops_computed_per_token, finish_loops,
copied_slots, budget_miss_rate (fraction of decode tokens whose latency exceeded their budget),
p95_latency_ms, loop_cost_ms, policy.
"""

from .budget import Budget, LoopCost, make_budget
from .decoder import FINISH_MODES, SKIP_MODES, decode
from .policies import POLICIES, Confidence, Entropy, ExitPolicy, HiddenDelta, KLExit, LoopObservation, QExit, StaticDepth, make_policy

__all__ = [
    "Budget",
    "Confidence",
    "Entropy",
    "ExitPolicy",
    "FINISH_MODES",
    "HiddenDelta",
    "KLExit",
    "LoopCost",
    "LoopObservation",
    "POLICIES",
    "QExit",
    "SKIP_MODES",
    "StaticDepth",
    "decode",
    "make_budget",
    "make_policy",
]
