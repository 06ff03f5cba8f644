"""spec.calibrate: the (draft loop, branch, second drafts) sweep against full depth, its
recommendation in generation_config.json, and a checkpoint's recommended draft tree or second
drafts meeting the caller's options."""

import json
import random

import pytest

import looplm
from looplm.checkpoint import save_pretrained
from spec.calibrate import (MARGIN, NotLossless, Setting, best_row, candidates, default_prompts, fit_call_cost, load_limit,
                            load_sweep, main, sweep, write_recommendation)

from spec.drafts import DraftMap

from .conftest import spec_model
from .test_multi import pair_map

KEPT = {"bos_token_id": 0, "eos_token_id": 1,
        "looplm": {"speculative": {"extrapolate": 0.5, "draft_loop": 1}, "anytime": {"exit": "q_exit"}}}


def checkpoint(tmp_path, loops=4, gc=KEPT, dmap=None):
    """A random checkpoint; with `dmap` (a DraftMap) saved as its draft_map.safetensors and recommended."""
    path = tmp_path / "ckpt"
    if dmap is not None:
        gc = {**gc, "looplm": {**gc.get("looplm", {}), "speculative": {**gc.get("looplm", {}).get("speculative", {}),
                                                                       "draft_map": "draft_map.safetensors"}}}
    save_pretrained(spec_model(loops=loops, max_pos=64), path, generation_config=gc)
    if dmap is not None:
        dmap.save(path / "draft_map.safetensors")
    return path


def costs(table: dict):
    """A measure that runs the call (tokens, stats) but reports fixed seconds per setting (None: full depth)."""

    def measure(run, setting):
        return table[setting], run()

    return measure


def test_injected_costs_pick_the_fastest_and_write_records_it(tmp_path):
    path = checkpoint(tmp_path)
    engine = looplm.load(path)
    settings = candidates(engine.model.num_loops)
    assert settings == [Setting(k, b) for k in (1, 2) for b in (1, 2, 3)]  # T = 4: k divides T
    table = {None: 1.0, **{s: 1.5 for s in settings}, Setting(2, 3): 0.5}  # k=2 b=3 runs at 2x full depth
    result = sweep(engine, settings, default_prompts(engine, 2), new_tokens=6, repeats=2, measure=costs(table), progress=False)
    best = result["best"]
    assert (best["draft_loop"], best["branch"]) == (2, 3) and best["ratio_to_full"] == pytest.approx(2.0)
    assert all(r["ratio_to_full"] == pytest.approx(1 / 1.5) for r in result["rows"] if (r["draft_loop"], r["branch"]) != (2, 3))
    assert result["full_tokens_per_s"] == pytest.approx(12 / 1.0)

    write_recommendation(path, result, device="cpu", threads=1)
    gc = json.loads((path / "generation_config.json").read_text())
    assert {k: gc[k] for k in ("bos_token_id", "eos_token_id")} == {"bos_token_id": 0, "eos_token_id": 1}
    assert gc["looplm"]["anytime"] == {"exit": "q_exit"}
    spec_opts = gc["looplm"]["speculative"]
    assert spec_opts["extrapolate"] == 0.5 and spec_opts["draft_loop"] == 2 and spec_opts["branch"] == 3
    cal = spec_opts["calibrated"]
    assert cal["speculation_pays"] is True and cal["ratio_to_full"] == pytest.approx(2.0)
    assert cal["device"] == "cpu" and cal["torch_threads"] == 1 and cal["date_utc"].endswith("UTC")

    reloaded = looplm.load(path)
    fitted = {} if result["call_cost"] is None else {"call_cost": result["call_cost"]}
    assert reloaded.mode_defaults("speculative") == {"extrapolate": 0.5, "draft_loop": 2, "branch": 3, **fitted}  # "calibrated" is a record
    g = reloaded.generate([3, 1, 4], max_new_tokens=8, stop=[], mode="speculative")
    assert (g.stats["draft_loop"], g.stats["branch"]) == (2, 3)
    assert g.tokens == reloaded.generate([3, 1, 4], max_new_tokens=8, stop=[]).tokens


def test_the_call_cost_is_fitted_from_forwards_and_weight_passes_and_written(tmp_path):
    """Seconds made of a known cost per forward and per weight pass (from each call's own stats):
    the fit recovers their ratio, draft_loop="adaptive" reads it from the checkpoint."""
    c_call, c_loop = random.uniform(0.5, 3.0), random.uniform(0.05, 0.2)

    def measure(run, setting):
        gens = run()
        st = [g.stats for g in gens]
        return sum(c_call * s["forwards"] + c_loop * s["weight_passes_per_token"] * s["new_tokens"] for s in st), gens

    path = checkpoint(tmp_path)
    engine = looplm.load(path)
    result = sweep(engine, candidates(4, None, [1, 2]), default_prompts(engine, 2), new_tokens=12, repeats=1, measure=measure,
                   progress=False)
    assert result["call_cost"] == round(c_call / c_loop, 2)
    write_recommendation(path, result)
    assert json.loads((path / "generation_config.json").read_text())["looplm"]["speculative"]["call_cost"] == result["call_cost"]
    g = looplm.load(path).generate([3, 1, 4], max_new_tokens=4, stop=[], mode="speculative", draft_loop="adaptive")
    assert g.stats["loop_switches"][0] == [0, 2]
    # no fit from two points, nor a loop cost that is not positive
    rows = [{"branch": 1, "forwards_per_token": 1.2, "weight_passes_per_token": 2.2, "tokens_per_s": 100.0}]
    base = {"full_forwards_per_token": 1.0, "full_weight_passes_per_token": 4.0, "full_tokens_per_s": 100.0}
    assert fit_call_cost({**base, "rows": rows}) is None
    more = rows + [{"branch": 1, "forwards_per_token": 2.2, "weight_passes_per_token": 2.2, "tokens_per_s": 50.0}]
    assert fit_call_cost({**base, "full_tokens_per_s": 200.0, "rows": more}) is None  # fewer passes, yet slower


def test_when_nothing_beats_full_depth_nothing_is_recommended(tmp_path):
    path = checkpoint(tmp_path)
    engine = looplm.load(path)
    settings = candidates(engine.model.num_loops, [2], [1, 2])
    table = {None: 1.0, Setting(2, 1): 1.25, Setting(2, 2): 2.0}
    result = sweep(engine, settings, default_prompts(engine, 1), new_tokens=4, repeats=1, measure=costs(table), progress=False)
    assert (result["best"]["draft_loop"], result["best"]["branch"]) == (2, 1)
    write_recommendation(path, result)
    spec_opts = json.loads((path / "generation_config.json").read_text())["looplm"]["speculative"]
    assert spec_opts["draft_loop"] == 1 and "branch" not in spec_opts  # as they were
    assert spec_opts["calibrated"]["speculation_pays"] is False
    assert spec_opts["calibrated"]["ratio_to_full"] == pytest.approx(0.8)


def test_every_setting_decodes_the_full_depth_tokens():
    """The real decode (wall clock) of a random tiny model: each setting's tokens are checked equal
    to full depth's inside the sweep; a decoder that changed a token would raise."""
    model = spec_model(loops=6, max_pos=64)
    engine = looplm.Engine(model)
    settings = candidates(6)
    assert [s.draft_loop for s in settings[::3]] == [1, 2, 3]
    result = sweep(engine, settings, default_prompts(engine, 3), new_tokens=12, repeats=1, progress=False)
    assert len(result["rows"]) == 9 and all(r["ratio_to_full"] > 0 for r in result["rows"])


def test_a_setting_that_changes_a_token_fails_loudly(monkeypatch):
    engine = looplm.Engine(spec_model(loops=4, max_pos=64))
    real = engine.generate

    def broken(prompt, **kw):
        g = real(prompt, **kw)
        if kw.get("branch") == 2:
            g.tokens[-1] = (g.tokens[-1] + 1) % engine.config.vocab_size
        return g

    monkeypatch.setattr(engine, "generate", broken)
    with pytest.raises(NotLossless, match="k=2 b=2: prompt 0's greedy tokens differ from full depth"):
        sweep(engine, [(2, 1), (2, 2)], default_prompts(engine, 1), new_tokens=4, repeats=1, progress=False)


def test_bad_arguments_fail_before_any_timing(tmp_path, capsys, monkeypatch):
    import spec.calibrate as calibrate

    monkeypatch.setattr(calibrate, "sweep", lambda *a, **k: pytest.fail("timed despite a bad argument"))
    path = checkpoint(tmp_path)
    cases = [
        (["--loops", "3"], "--loops: draft loop 3 must be in 1..3 and divide T = 4"),
        (["--loops", "4"], "--loops: draft loop 4"),
        (["--loops", "x"], "--loops: expected comma-separated integers"),
        (["--branches", "0"], "--branches: branch 0 must be an integer >= 1"),
        (["--branches", "1,-2"], "--branches: branch -2"),
        (["--prompts", "0"], "--prompts: must be in 1..8"),
        (["--repeats", "0"], "--repeats: must be >= 1"),
        (["--draft-tokens", "3"], "--draft-tokens: each must be 1 or 2"),
        (["--draft-tokens", "2"], "--draft-tokens: 2 needs a recommended draft map with a second-token head"),
        (["--second-thresholds", "1.5"], "--second-thresholds: 1.5 must be 'none', 'adaptive' or a probability in [0, 1]"),
        (["--second-thresholds", "high"], "--second-thresholds: expected comma-separated probabilities, 'none' or 'adaptive'"),
        (["--second-thresholds", "adapt"], "--second-thresholds: expected comma-separated probabilities, 'none' or 'adaptive'"),
        (["--loads", "0,2"], "--loads: each must be an integer >= 1"),
        (["--loads", "many"], "--loads: expected comma-separated integers"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", str(path), *args])
        assert e.value.code == 2
        assert message in capsys.readouterr().err, args
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(missing)])
    assert f"--checkpoint: {missing} is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "empty")])
    assert f"--checkpoint: {tmp_path / 'empty'} has no config.json" in capsys.readouterr().err
    # a read-only checkpoint (simulated: chmod does not stop root): --write fails, naming the file
    monkeypatch.setattr(calibrate.os, "access", lambda p, mode: False)
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(path), "--write"])
    assert f"--write: {path / 'generation_config.json'} is not writable" in capsys.readouterr().err


def test_the_command_runs_end_to_end_and_writes(tmp_path, capsys):
    path = checkpoint(tmp_path, dmap=pair_map(32))
    assert main(["--checkpoint", str(path), "--loops", "2", "--branches", "1,2", "--second-thresholds", "0.5", "--prompts", "1",
                 "--new-tokens", "4", "--repeats", "1", "--threads", "1", "--write"]) == 0
    out = capsys.readouterr().out
    assert " k  b  d  second   tokens/s  ratio to full" in out and f"recorded in {path / 'generation_config.json'}" in out
    assert ("best: draft_loop=2" in out) != ("full depth is faster here" in out)
    assert "\n 2  1  2     0.5  " in out  # the second-draft row
    spec_opts = json.loads((path / "generation_config.json").read_text())["looplm"]["speculative"]
    assert spec_opts["extrapolate"] == 0.5 and spec_opts["calibrated"]["settings"]["new_tokens"] == 4
    assert spec_opts["calibrated"]["torch_threads"] == 1
    assert spec_opts["calibrated"]["settings"]["swept"] == ["k=2 b=1", "k=2 b=2", "k=2 b=1 d=2 s=0.5", "k=2 b=2 d=2 s=0.5"]
    if spec_opts["calibrated"]["speculation_pays"]:  # then the best setting was timed beside other requests
        assert "requests at once  ratio to full" in out and "full_depth_above" in spec_opts
        assert [n for n, _ in spec_opts["calibrated"]["loads"]] == [1, 2, 3, 4, 6, 8]
    else:
        assert "requests at once" not in out and "full_depth_above" not in spec_opts


# -- beside other requests: full_depth_above -----------------------------------------------------------
def test_the_load_limit_is_the_last_load_before_speculation_stops_paying():
    loads = sorted(random.sample(range(1, 40), 6))
    m = random.randrange(1, 6)  # speculation pays at the first m loads, not at the next
    rows = [{"requests": n, "ratio_to_full": random.uniform(1 + MARGIN, 2.0) if i < m else random.uniform(0.3, 2.0)}
            for i, n in enumerate(loads)]
    rows[m]["ratio_to_full"] = random.uniform(1.0, 1 + MARGIN - 1e-3)  # within the margin of 1: noise, not a gain
    random.shuffle(rows)
    assert load_limit(rows) == loads[m - 1]
    no_margin = load_limit(rows, margin=0.0)  # then that load counts as paid
    assert no_margin is None or no_margin >= loads[m]
    assert load_limit([{**r, "ratio_to_full": 1 + MARGIN + random.random()} for r in rows]) is None  # paid everywhere: never switch
    assert load_limit([{"requests": loads[0], "ratio_to_full": 0.9}, *rows]) == 1  # not even at the fewest


def test_injected_load_costs_set_full_depth_above_and_write_records_it(tmp_path):
    """Seconds per call from its request count: speculation at 0.8 of full depth's time up to m
    requests at once, 1.3 above; the sweep finds m, --write records it, the reloaded checkpoint
    switches a crowd of m + 1 requests to full depth."""
    path = checkpoint(tmp_path)
    engine = looplm.load(path)
    m = random.randint(1, 4)

    def measure(run, setting):
        gens = run()
        n = len(gens)
        return n * (1.0 if setting is None else 0.8 if n <= m else 1.3), gens

    loads = load_sweep(engine, Setting(2, 1), default_prompts(engine, 3), [1, 2, 3, 4, 5, 6], new_tokens=5, repeats=2,
                       measure=measure, progress=False)
    assert loads["full_depth_above"] == m
    assert [r["ratio_to_full"] for r in loads["loads"]] == pytest.approx([1.25] * m + [1 / 1.3] * (6 - m))
    table = {None: 1.0, Setting(2, 1): 0.5}
    result = sweep(engine, [Setting(2, 1)], default_prompts(engine, 1), new_tokens=4, repeats=1, measure=costs(table), progress=False)
    write_recommendation(path, {**result, "loads": loads})
    spec_opts = json.loads((path / "generation_config.json").read_text())["looplm"]["speculative"]
    assert spec_opts["full_depth_above"] == m
    assert [n for n, _ in spec_opts["calibrated"]["loads"]] == [1, 2, 3, 4, 5, 6]
    reloaded = looplm.load(path)
    crowd = reloaded.generate([[3, 1, 4]] * (m + 1), max_new_tokens=6, stop=[], mode="speculative")
    assert [g.stats["fallback_reason"] for g in crowd] == ["load"] * (m + 1)
    # where the best setting does not beat full depth, no limit is written
    slow = sweep(engine, [Setting(2, 1)], default_prompts(engine, 1), new_tokens=4, repeats=1,
                 measure=costs({None: 1.0, Setting(2, 1): 2.0}), progress=False)
    write_recommendation(path, {**slow, "loads": {**loads, "full_depth_above": m + 7}})
    assert json.loads((path / "generation_config.json").read_text())["looplm"]["speculative"]["full_depth_above"] == m


def test_the_command_skips_the_load_sweep_when_asked(tmp_path, capsys):
    path = checkpoint(tmp_path)
    assert main(["--checkpoint", str(path), "--loops", "2", "--branches", "1", "--prompts", "1", "--new-tokens", "4",
                 "--repeats", "1", "--loads", "none"]) == 0
    assert "requests at once" not in capsys.readouterr().out


# -- a checkpoint's recommended draft tree and the caller's options ------------------------------------
@pytest.mark.parametrize("own", [{"draft_len": 4}, {"draft_len": "adaptive"}, {"pipeline": False}, {"draft_loop": 3}])
def test_a_recommended_branch_gives_way_to_the_callers_options(tmp_path, own):
    gc = {"looplm": {"speculative": {"draft_loop": 2, "branch": 2, "branch_threshold": 0.9}}}
    engine = looplm.load(checkpoint(tmp_path, gc=gc))
    full = engine.generate([5, 6, 7], max_new_tokens=10, stop=[])
    tree = engine.generate([5, 6, 7], max_new_tokens=10, stop=[], mode="speculative")
    assert tree.stats["branch"] == 2 and "branch_unused" not in tree.stats and tree.tokens == full.tokens
    g = engine.generate([5, 6, 7], max_new_tokens=10, stop=[], mode="speculative", **own)
    assert g.tokens == full.tokens and "branch" not in g.stats
    assert g.stats["branch_unused"].startswith("the checkpoint's recommended branch=2, branch_threshold=0.9 does not run")
    # branch=1 from the caller drops the recommended threshold (it needs branch > 1)
    g = engine.generate([5, 6, 7], max_new_tokens=10, stop=[], mode="speculative", branch=1)
    assert g.tokens == full.tokens and "branch_threshold=0.9" in g.stats["branch_unused"]


def test_a_checkpoint_whose_own_tree_cannot_run_still_fails(tmp_path):
    engine = looplm.load(checkpoint(tmp_path, gc={"looplm": {"speculative": {"draft_loop": 3, "branch": 2}}}))
    with pytest.raises(ValueError, match="branch=2 .*the value is the checkpoint's"):
        engine.generate([5, 6, 7], max_new_tokens=4, mode="speculative")
    with pytest.raises(ValueError, match="branch=2 .*draft_len"):  # the caller's own tree and draft_len conflict
        engine.generate([5, 6, 7], max_new_tokens=4, mode="speculative", draft_loop=2, branch=2, draft_len=3)


def test_a_recommended_branch_is_dropped_under_tensor_parallelism():
    """Draft trees do not run under tp yet: the checkpoint's branch gives way (said in stats); the caller's raises.
    Only the decoder's start runs here (up to its first work item), with a stand-in for the tp group."""
    import torch

    from looplm.decoding import DecodeRequest
    from looplm.sampling import SamplingParams
    from spec.decoder import decode as decode_speculative

    model = spec_model(loops=4, max_pos=64)
    model.tp = object()
    try:
        def request(recommended):
            req = DecodeRequest([[1, 2, 3]], [4], SamplingParams(), torch.Generator().manual_seed(0), [False])
            req.recommended = frozenset(recommended)
            return req

        req = request({"branch"})
        next(decode_speculative(model, req, draft_loop=2, branch=2))
        assert "does not run under tensor parallelism" in req.stats["branch_unused"]
        with pytest.raises(ValueError, match="branch=2 .*tensor parallelism"):
            next(decode_speculative(model, request(()), draft_loop=2, branch=2))
    finally:
        del model.tp


def test_a_setting_with_more_rows_must_win_by_more_than_the_margin():
    """Nearly equal ratios are noise: the simplest setting within MARGIN of the fastest is chosen
    (fewest branches, then the latest draft loop); a clear win is chosen whatever its rows."""
    base = 1.1 + random.random()
    close, clear = base * (1 + MARGIN / 2), base * (1 + 2 * MARGIN)

    def rows(ratios):
        return [{"draft_loop": k, "branch": b, "ratio_to_full": r, "weight_passes_per_token": random.uniform(1, 4)}
                for (k, b), r in ratios.items()]

    pick = best_row(rows({(2, 1): base, (2, 2): close, (1, 1): base * (1 - 2 * MARGIN), (1, 3): close}))
    assert (pick["draft_loop"], pick["branch"]) == (2, 1)
    pick = best_row(rows({(2, 1): base, (2, 2): clear, (1, 1): base, (1, 3): close}))
    assert (pick["draft_loop"], pick["branch"]) == (2, 2)
    pick = best_row(rows({(2, 1): base, (1, 1): close}))  # the same branch: the later draft loop
    assert (pick["draft_loop"], pick["branch"]) == (2, 1)
    # second-draft thresholds within the margin: the fewest weight passes per token, whatever the threshold
    pairs = [{"draft_loop": 2, "branch": 1, "draft_tokens": 2, "second_threshold": t, "ratio_to_full": base * random.uniform(1, 1 + MARGIN / 2),
              "weight_passes_per_token": random.uniform(1, 4)} for t in (None, 0.1, 0.3, "adaptive")]
    plain = rows({(2, 1): base * (1 - 2 * MARGIN)})
    assert best_row(plain + pairs) is min(pairs, key=lambda r: r["weight_passes_per_token"])
    pairs[0]["ratio_to_full"] = base * (1 + 3 * MARGIN)  # a clear win
    assert best_row(plain + pairs) is pairs[0]



# -- second-token drafts (draft_tokens=2) in the sweep and as a recommendation ----------------------------
def test_second_drafts_are_swept_where_the_map_has_a_head_and_recorded_when_they_win(tmp_path):
    path = checkpoint(tmp_path, dmap=pair_map(32, next_scale=random.uniform(0, 0.05)))
    engine = looplm.load(path)
    from spec.calibrate import pair_loops

    assert pair_loops(engine) == [2]
    settings = candidates(4, None, [1, 2], pair_loops(engine), [None, 0.2])
    assert settings[:4] == [Setting(k, b) for k in (1, 2) for b in (1, 2)]
    # k = 1 has no earlier loop to map from; trees carry second drafts too
    assert settings[4:] == [Setting(2, b, 2, p) for b in (1, 2) for p in (None, 0.2)]
    table = {None: 1.0, **{s: 0.8 for s in settings}, Setting(2, 1, 2, 0.2): 0.4}
    result = sweep(engine, settings, default_prompts(engine, 2), new_tokens=10, repeats=1, measure=costs(table), progress=False)
    best = result["best"]
    assert (best["draft_tokens"], best["second_threshold"], best["ratio_to_full"]) == (2, 0.2, pytest.approx(2.5))
    write_recommendation(path, result)
    spec_opts = json.loads((path / "generation_config.json").read_text())["looplm"]["speculative"]
    assert {k: spec_opts[k] for k in ("draft_loop", "branch", "draft_tokens", "second_threshold")} == \
        {"draft_loop": 2, "branch": 1, "draft_tokens": 2, "second_threshold": 0.2}
    assert spec_opts["calibrated"]["draft_tokens"] == 2 and spec_opts["extrapolate"] == 0.5

    engine = looplm.load(path)  # mode="speculative" now drafts pairs by default, and stays exact
    prompt = torch_prompt(engine)
    full = engine.generate(prompt, max_new_tokens=24, stop=[])
    g = engine.generate(prompt, max_new_tokens=24, stop=[], mode="speculative")
    assert g.stats["draft_tokens"] == 2 and g.stats["second_threshold"] == 0.2 and g.tokens == full.tokens

    # a later calibration where one drafted token wins removes the recommended second drafts
    table = {None: 1.0, **{s: 0.8 for s in settings}, Setting(2, 2): 0.4}
    result = sweep(engine, settings, default_prompts(engine, 1), new_tokens=6, repeats=1, measure=costs(table), progress=False)
    write_recommendation(path, result)
    spec_opts = json.loads((path / "generation_config.json").read_text())["looplm"]["speculative"]
    assert (spec_opts["branch"], "draft_tokens" in spec_opts, "second_threshold" in spec_opts) == (2, False, False)

    # and one where a tree with second drafts wins records both, and runs exactly
    table = {None: 1.0, **{s: 0.8 for s in settings}, Setting(2, 2, 2, None): 0.4}
    result = sweep(engine, settings, default_prompts(engine, 1), new_tokens=6, repeats=1, measure=costs(table), progress=False)
    write_recommendation(path, result)
    spec_opts = json.loads((path / "generation_config.json").read_text())["looplm"]["speculative"]
    assert (spec_opts["branch"], spec_opts["draft_tokens"], spec_opts["second_threshold"]) == (2, 2, None)
    engine = looplm.load(path)
    g = engine.generate(prompt, max_new_tokens=24, stop=[], mode="speculative")
    assert (g.stats["branch"], g.stats["draft_tokens"]) == (2, 2) and g.tokens == full.tokens


def test_the_adaptive_second_threshold_is_swept_ranked_after_fixed_ones_and_recorded(tmp_path):
    """"adaptive" parses and sweeps (exact tokens); a tie in speed between thresholds goes to the
    fewest weight passes per token; adaptive wins when clearly faster, and a checkpoint that
    records it decodes with it."""
    from spec.calibrate import pair_loops, parse_thresholds

    assert parse_thresholds("none, 0.25,ADAPTIVE") == [None, 0.25, "adaptive"]
    path = checkpoint(tmp_path, dmap=pair_map(32, next_scale=random.uniform(0, 0.05)))
    engine = looplm.load(path)
    settings = candidates(4, [2], [1], pair_loops(engine), [0.3, "adaptive"])
    assert settings == [Setting(2, 1), Setting(2, 1, 2, 0.3), Setting(2, 1, 2, "adaptive")]
    assert str(settings[2]) == "k=2 b=1 d=2 s=adaptive"
    tie = {None: 1.0, Setting(2, 1): 0.8, Setting(2, 1, 2, 0.3): 0.5, Setting(2, 1, 2, "adaptive"): 0.5}
    result = sweep(engine, settings, default_prompts(engine, 1), new_tokens=8, repeats=1, measure=costs(tie), progress=False)
    tied = [r for r in result["rows"] if r.get("draft_tokens") == 2]
    assert result["best"] == min(tied, key=lambda r: r["weight_passes_per_token"])
    faster = {**tie, Setting(2, 1, 2, "adaptive"): 0.4}
    result = sweep(engine, settings, default_prompts(engine, 1), new_tokens=8, repeats=1, measure=costs(faster), progress=False)
    assert result["best"]["second_threshold"] == "adaptive"
    write_recommendation(path, result)
    spec_opts = json.loads((path / "generation_config.json").read_text())["looplm"]["speculative"]
    assert (spec_opts["draft_tokens"], spec_opts["second_threshold"]) == (2, "adaptive")
    engine = looplm.load(path)
    prompt = torch_prompt(engine)
    g = engine.generate(prompt, max_new_tokens=24, stop=[], mode="speculative")
    assert g.stats["second_threshold"] == "adaptive" and g.tokens == engine.generate(prompt, max_new_tokens=24, stop=[]).tokens


def torch_prompt(engine, n=6):
    return [random.randrange(engine.config.vocab_size) for _ in range(n)]


@pytest.mark.parametrize("own", [{"draft_loop": 1}, {"pipeline": False}, {"draft_len": 2}, {"draft_tokens": 1}])
def test_recommended_second_drafts_give_way_to_the_callers_options(tmp_path, own):
    gc = {"looplm": {"speculative": {"draft_loop": 2, "draft_tokens": 2, "second_threshold": 0.1}}}
    engine = looplm.load(checkpoint(tmp_path, gc=gc, dmap=pair_map(32)))
    prompt = torch_prompt(engine)
    full = engine.generate(prompt, max_new_tokens=12, stop=[])
    pairs = engine.generate(prompt, max_new_tokens=12, stop=[], mode="speculative")
    assert pairs.stats["draft_tokens"] == 2 and "draft_tokens_unused" not in pairs.stats and pairs.tokens == full.tokens
    g = engine.generate(prompt, max_new_tokens=12, stop=[], mode="speculative", **own)
    assert g.tokens == full.tokens and "draft_tokens" not in g.stats and "second_threshold" not in g.stats
    assert g.stats["draft_tokens_unused"].startswith("the checkpoint's recommended ")
    assert "second_threshold=0.1" in g.stats["draft_tokens_unused"]


def test_recommended_second_drafts_and_trees_combine(tmp_path):
    """A caller's tree or adaptive draft loop under recommended second drafts, and a caller's second
    drafts under a recommended tree: the tree's top-1 candidate carries the second draft
    (spec.trees), and the adaptive loop drafts pairs at loop 2 (spec.multi)."""
    gc = {"looplm": {"speculative": {"draft_loop": 2, "draft_tokens": 2, "second_threshold": 0.1}}}
    engine = looplm.load(checkpoint(tmp_path / "pairs", gc=gc, dmap=pair_map(32)))
    prompt = torch_prompt(engine)
    full = engine.generate(prompt, max_new_tokens=12, stop=[]).tokens
    g = engine.generate(prompt, max_new_tokens=12, stop=[], mode="speculative", branch=2)
    assert (g.stats["branch"], g.stats["draft_tokens"], g.stats["second_threshold"]) == (2, 2, 0.1) and g.tokens == full
    assert "draft_tokens_unused" not in g.stats and "branch_unused" not in g.stats
    g = engine.generate(prompt, max_new_tokens=12, stop=[], mode="speculative", draft_loop="adaptive")
    assert (g.stats["draft_tokens"], g.stats["second_threshold"], g.stats["loop_switches"][0]) == (2, 0.1, [0, 2])
    assert g.tokens == full and "draft_tokens_unused" not in g.stats
    engine = looplm.load(checkpoint(tmp_path / "tree", gc={"looplm": {"speculative": {"draft_loop": 2, "branch": 3}}},
                                    dmap=pair_map(32)))
    g = engine.generate(prompt, max_new_tokens=12, stop=[], mode="speculative", draft_tokens=2)
    assert (g.stats["branch"], g.stats["draft_tokens"]) == (3, 2) and "branch_unused" not in g.stats
    assert g.tokens == engine.generate(prompt, max_new_tokens=12, stop=[]).tokens


def test_recommended_second_drafts_give_way_in_a_batch_or_without_a_head():
    """The decoder itself (a batch of two rows reaches it only from the decoder API): a recommended
    draft_tokens=2 runs the plain pipeline and says why; the caller's raises."""
    import torch

    from looplm.decoding import DecodeRequest
    from looplm.sampling import SamplingParams
    from spec.decoder import decode as decode_speculative

    model = spec_model(loops=4, max_pos=64)

    def request(recommended, rows=2):
        req = DecodeRequest([[1, 2, 3], [4, 5]][:rows], [4] * rows, SamplingParams(), torch.Generator().manual_seed(0),
                            [False] * rows)
        req.recommended = frozenset(recommended)
        return req

    for rows, dmap, why in [(2, pair_map(32), "it decodes one sequence per request, got a batch of 2"),
                            (1, DraftMap.extrapolation(32, [2]), "no draft map with a second-token head for draft_loop=2")]:
        req = request({"draft_tokens"}, rows)
        next(decode_speculative(model, req, draft_loop=2, draft_tokens=2, draft_map=dmap))
        assert req.stats["draft_tokens_unused"].startswith(f"the checkpoint's recommended draft_tokens=2 does not run here: {why}")
        with pytest.raises(ValueError, match=f"draft_tokens=2: {why}"):
            next(decode_speculative(model, request((), rows), draft_loop=2, draft_tokens=2, draft_map=dmap))
