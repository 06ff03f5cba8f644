"""No loop 1..k of a drafted token is computed twice: verification resumes from the saved loop-k state."""

from collections import defaultdict

import pytest

import looplm

from .conftest import spec_model


def record_layer_calls(model):
    """Forward pre-hooks on every layer: a log of (layer, loop, row, position) per computed token."""
    log = []

    def hook(layer_idx):
        def pre(module, args):
            ctx = args[3]
            B, S = ctx.pos.shape[:2]
            for b in range(B):
                for s in range(S):
                    loop = ctx.loop if isinstance(ctx.loop, int) else int(ctx.loop[b, s])
                    log.append((layer_idx, loop, b, int(ctx.pos[b, s])))
        return pre

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    return log, handles


def logged_run(T, prompt, **opts):
    """A 30-token speculative run (no fallback to full depth) with every layer call logged, on a fresh random model that both
    accepted and rejected drafts (a fresh model occasionally accepts every draft, so up to 20 are
    drawn). Returns (model, log, generation)."""
    for _ in range(20):
        model = spec_model(loops=T, step_scale=0.08)
        log, handles = record_layer_calls(model)
        gen = looplm.Engine(model).generate(prompt, max_new_tokens=30, stop=[], mode="speculative", fallback=False, **opts)
        for h in handles:
            h.remove()
        if 0 < gen.stats["token_acceptance"] < 1:
            break
    return model, log, gen


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("g", [1, 3, 6])
def test_each_token_runs_each_loop_once(k, g):
    T, prompt = 4, [5, 9, 2, 7]
    model, log, gen = logged_run(T, prompt, draft_loop=k, draft_len=g)
    L = model.config.num_hidden_layers
    # per layer and position, the loops computed over time must be whole runs 0, 1, .., T-1: a token
    # that re-enters a position (after a rejection) starts again at loop 0, but no token ever has a
    # loop computed twice (a recomputation of loops 1..k would read 0..k-1, 0..T-1)
    seqs = defaultdict(list)
    for layer, loop, b, pos in log:
        # rows are tokens of the one sequence (the runner lays every token out as a row)
        seqs[layer, pos].append(loop)
    runs = 0
    for (layer, pos), loops in seqs.items():
        assert len(loops) % T == 0 and loops == list(range(T)) * (len(loops) // T), (layer, pos, loops)
        runs += len(loops) // T
    # counts agree with the model's own counter and with what the rounds drafted
    assert len(log) == L * gen.stats["token_loops"]
    st = gen.stats
    assert st["rounds"] > 1 and 0 < st["acceptance_rate"] < 1
    drafted = st["drafted"]
    assert st["acceptance_rate"] == st["accepted"] / drafted
    assert runs == L * (len(prompt) + drafted)
    # every emitted token after the first cost exactly what it drafted: T loops per drafted position
    assert st["loops_per_token"] * len(gen.tokens) == pytest.approx(T * drafted)
    draft_calls = [e for e in log if e[0] == 0 and e[1] == 0 and e[3] >= len(prompt)]
    assert len(draft_calls) == drafted  # loop 0 runs once per drafted position, only in drafting
