"""Fitted draft maps (spec.drafts.DraftMap, spec.fit_draft): exact output, clear errors, a fit that helps."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import looplm
from looplm.checkpoint import save_pretrained
from spec.drafts import DraftMap, draft_state
from spec.fit_draft import agreement, collect_states, fit_draft_map

from .conftest import acceptance, ragged_prompts, spec_model
from .test_accept import chi2_critical
from .test_sampling_e2e import sampled_chi2


def random_map(H: int, loops=(2,), scale: float = 0.3, hidden: int = 0) -> DraftMap:
    params = {}
    for k in loops:
        params[k] = {"weight": torch.randn(H, 2 * H) * scale, "bias": torch.randn(H) * scale}
        if hidden:
            params[k].update({"up.weight": torch.randn(hidden, 2 * H) * scale, "up.bias": torch.randn(hidden) * scale,
                              "down.weight": torch.randn(H, hidden) * scale, "down.bias": torch.randn(H) * scale})
    return DraftMap(params)


def test_the_extrapolation_map_equals_extrapolated_drafts():
    per_loop = torch.randn(2, 3, 5, 16)
    for c in (0.0, 0.5, 2.0):
        mapped = DraftMap.extrapolation(16, [2], c).state(per_loop)
        torch.testing.assert_close(mapped, draft_state(per_loop, c), rtol=1e-5, atol=1e-5)
    dmap = random_map(16)
    assert torch.equal(draft_state(per_loop, 0.5, dmap), dmap.state(per_loop))  # a map replaces the extrapolation


def test_a_hidden_layer_adds_its_gelu_branch():
    per_loop = torch.randn(2, 3, 16)
    dmap = random_map(16, hidden=8)
    p = dmap.params[2]
    x = torch.cat([per_loop[0], per_loop[1]], -1)
    expected = x @ p["weight"].T + p["bias"] + F.gelu(x @ p["up.weight"].T + p["up.bias"]) @ p["down.weight"].T + p["down.bias"]
    torch.testing.assert_close(dmap.state(per_loop), expected)


@pytest.mark.parametrize("hidden", [0, 8])
def test_save_load_round_trip_is_bit_exact(tmp_path, hidden):
    dmap = random_map(8, loops=(2, 3), hidden=hidden)
    dmap.info["note"] = "x"
    dmap.save(tmp_path / "m.safetensors")
    back = DraftMap.load(tmp_path / "m.safetensors")
    assert back.loops == [2, 3] and back.info == {"note": "x"}
    for k in (2, 3):
        assert sorted(back.params[k]) == sorted(dmap.params[k])
        assert all(torch.equal(back.params[k][n], dmap.params[k][n]) for n in dmap.params[k])


def test_bad_files_get_errors_naming_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        DraftMap.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00not a header")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable safetensors file"):
        DraftMap.load(tmp_path / "junk.safetensors")
    save_file({"loop2.weight": torch.zeros(4, 8)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not a draft map"):
        DraftMap.load(tmp_path / "model.safetensors")
    meta = {"format": "looplm-draft-map"}
    save_file({"loop2.weight": torch.zeros(4, 8), "loop2.bias": torch.zeros(4), "head": torch.zeros(1)}, str(tmp_path / "extra.safetensors"), meta)
    with pytest.raises(ValueError, match="unexpected tensor 'head'"):
        DraftMap.load(tmp_path / "extra.safetensors")
    save_file({"loop2.weight": torch.zeros(4, 4), "loop2.bias": torch.zeros(4)}, str(tmp_path / "shape.safetensors"), meta)
    with pytest.raises(ValueError, match=r"shape.safetensors: draft map loop 2: weight has shape \(4, 4\), expected \(4, 8\)"):
        DraftMap.load(tmp_path / "shape.safetensors")
    save_file({"loop2.weight": torch.zeros(4, 8), "loop2.bias": torch.zeros(4), "loop2.up.weight": torch.zeros(3, 8)},
              str(tmp_path / "half.safetensors"), meta)
    with pytest.raises(ValueError, match="all or none of"):
        DraftMap.load(tmp_path / "half.safetensors")


@pytest.mark.parametrize("opts", [{"pipeline": True}, {"draft_len": 3}])
def test_greedy_with_a_draft_map_equals_full_depth(opts):
    model = spec_model(loops=4, max_pos=40)
    engine = looplm.Engine(model)
    prompts = ragged_prompts(3, model.config.vocab_size, 1, 10)
    full = engine.generate(prompts, max_new_tokens=25, stop=[])
    dmap = random_map(model.config.hidden_size, loops=(2, 3))
    for k in (2, 3):
        if opts.get("pipeline") and 4 % k:
            continue
        spec_ = engine.generate(prompts, max_new_tokens=25, stop=[], mode="speculative", draft_loop=k, draft_map=dmap,
                                extrapolate=0.5, **opts)
        assert [s.tokens for s in spec_] == [f.tokens for f in full]
        mlp = random_map(model.config.hidden_size, loops=(k,), hidden=16)
        spec_ = engine.generate(prompts, max_new_tokens=25, stop=[], mode="speculative", draft_loop=k, draft_map=mlp, **opts)
        assert [s.tokens for s in spec_] == [f.tokens for f in full]
        assert spec_[0].stats["draft"] == "map" and spec_[0].stats["extrapolate"] == 0.0


def test_sampling_with_a_draft_map_follows_full_depth():
    """A map changes the draft distribution q; the emitted distribution must not change."""
    torch.manual_seed(5)
    model = spec_model(seed=13, vocab=5, loops=4, std=0.2, step_scale=1.0, max_pos=16)
    dmap = random_map(model.config.hidden_size, scale=0.2)
    stat, df, gens = sampled_chi2(model, [2, 4], {"top_k": 4}, draft_loop=2, pipeline=True, draft_map=dmap)
    assert 0 < acceptance(gens) < 1
    assert stat < chi2_critical(df), (stat, df)


def test_bad_draft_map_options_fail_cleanly_and_leave_the_engine_usable():
    model = spec_model(loops=4, max_pos=40)
    engine = looplm.Engine(model)
    H = model.config.hidden_size
    with pytest.raises(ValueError, match=f"hidden size {H + 8}, the model has {H}"):
        engine.generate([1, 2], max_new_tokens=4, mode="speculative", draft_loop=2, draft_map=random_map(H + 8))
    with pytest.raises(ValueError, match="draft_map must be a DraftMap"):
        engine.generate([1, 2], max_new_tokens=4, mode="speculative", draft_loop=2, draft_map=3)
    full = engine.generate([1, 2], max_new_tokens=8, stop=[])
    assert engine.generate([1, 2], max_new_tokens=8, stop=[], mode="speculative", draft_map=random_map(H)).tokens == full.tokens


@pytest.mark.parametrize("k,c,drafted_by", [(1, 0.5, "loop"), (3, 0.5, "extrapolate"), (3, 0.0, "loop"), (2, 0.5, "map")])
def test_a_recommended_map_without_the_draft_loop_is_not_used_and_says_so(tmp_path, k, c, drafted_by):
    """Like extrapolate at k = 1: a checkpoint's loop-2 map leaves drafting at other loops to the other options."""
    model = spec_model(loops=4, max_pos=40)
    random_map(model.config.hidden_size).save(tmp_path / "draft_map.safetensors")
    engine = looplm.Engine(model, generation_config={"looplm": {"speculative": {"draft_map": "draft_map.safetensors"}}}, path=tmp_path)
    prompts = ragged_prompts(2, model.config.vocab_size, 1, 8)
    full = engine.generate(prompts, max_new_tokens=12, stop=[])
    spec_ = engine.generate(prompts, max_new_tokens=12, stop=[], mode="speculative", draft_loop=k, extrapolate=c)
    assert [s.tokens for s in spec_] == [f.tokens for f in full]
    assert spec_[0].stats["draft"] == drafted_by
    assert ("draft_map_unused" in spec_[0].stats) == (k != 2)


def test_a_callers_map_without_the_draft_loop_is_an_error():
    model = spec_model(loops=4, max_pos=40)
    engine = looplm.Engine(model)
    with pytest.raises(ValueError, match=r"maps for draft loops \[2\], not for draft_loop=3"):
        engine.generate([1, 2], max_new_tokens=4, mode="speculative", draft_loop=3, draft_map=random_map(model.config.hidden_size))
    assert engine.generate([1, 2], max_new_tokens=4, stop=[]).tokens  # still usable


def test_a_checkpoint_recommends_its_draft_map(tmp_path):
    model = spec_model(loops=4, max_pos=40)
    save_pretrained(model, tmp_path)
    random_map(model.config.hidden_size).save(tmp_path / "draft_map.safetensors")
    gc = {"looplm": {"speculative": {"draft_loop": 2, "draft_map": "draft_map.safetensors"}}}
    (tmp_path / "generation_config.json").write_text(json.dumps(gc))
    engine = looplm.load(tmp_path)
    assert engine.mode_defaults("speculative")["draft_map"] == str(tmp_path / "draft_map.safetensors")
    full = engine.generate([3, 1, 4], max_new_tokens=12, stop=[])
    spec_ = engine.generate([3, 1, 4], max_new_tokens=12, stop=[], mode="speculative")
    assert spec_.tokens == full.tokens and spec_.stats["draft"] == "map"
    plain = engine.generate([3, 1, 4], max_new_tokens=12, stop=[], mode="speculative", draft_map=None)
    assert plain.tokens == full.tokens and plain.stats["draft"] == "loop"
    (tmp_path / "draft_map.safetensors").unlink()
    with pytest.raises(ValueError, match="looplm.speculative.draft_map names .*draft_map.safetensors, which does not exist"):
        engine.generate([3, 1, 4], max_new_tokens=4, mode="speculative")


@pytest.mark.parametrize("hidden", [0, 32])
def test_fitting_lowers_the_kl_and_raises_agreement_on_its_tokens(hidden):
    model = spec_model(loops=4, max_pos=64, step_scale=0.3).float()
    x = torch.randint(0, model.config.vocab_size, (8, 48))
    states = collect_states(model, [x[:4], x[4:]], [1, 2, 4])
    assert states[4].shape == (8 * 48, model.config.hidden_size)
    before = agreement(model, states, 2, lambda h0, h1: draft_state(torch.stack([h0, h1]), 0.5))
    start, _ = fit_draft_map(model, states, 2, extrapolate=0.5, hidden=hidden, steps=0, progress=False)
    h = torch.stack([states[1], states[2]])
    torch.testing.assert_close(start.state(h), draft_state(h, 0.5), rtol=1e-5, atol=1e-5)  # starts at the extrapolation
    dmap, curve = fit_draft_map(model, states, 2, extrapolate=0.5, hidden=hidden, steps=150, lr=1e-2, batch_tokens=256, progress=False)
    after = agreement(model, states, 2, lambda h0, h1: dmap.state(torch.stack([h0, h1])))
    assert sorted(dmap.params[2]) == sorted(["weight", "bias"] + (["up.weight", "up.bias", "down.weight", "down.bias"] if hidden else []))
    assert curve[-1] < curve[0]
    assert after > before, (before, after)
    with pytest.raises(ValueError, match="2 <= draft loop < T = 4"):
        fit_draft_map(model, states, 1)


def test_generated_batches_are_greedy_continuations_of_training_prefixes(tmp_path):
    from looplm.train.trainer import TokenData
    from spec.fit_draft import generated_batches

    model = spec_model(loops=4, max_pos=64)
    engine = looplm.Engine(model)
    (tmp_path / "train.bin").write_bytes(torch.randint(0, model.config.vocab_size, (500,), dtype=torch.int16).numpy().astype("uint16").tobytes())
    train = TokenData(tmp_path / "train.bin", 40)
    batches = generated_batches(engine, train, 5, torch.Generator().manual_seed(1), prefix=6, total=20, chunk=2)
    assert [tuple(b.shape) for b in batches] == [(2, 20), (2, 20), (1, 20)]
    rows = torch.cat(batches)
    windows = train.tokens.tobytes()
    for row in rows:
        prefix = row[:6].tolist()
        assert bytes(torch.tensor(prefix, dtype=torch.int32).numpy().astype("uint16").tobytes()) in windows
        assert engine.generate(prefix, max_new_tokens=14, stop=[]).tokens == row[6:].tolist()
