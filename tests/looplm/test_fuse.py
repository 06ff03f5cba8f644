"""looplm.fuse: fused q/k/v and gate/up projections compute what the separate ones do, and save the same checkpoint."""

import pytest
import torch

import looplm
import looplm.dtypes as dtypes
from looplm.checkpoint import save_pretrained
from looplm.fuse import fuse, fuse_if_large, is_fused, unfuse

from .conftest import random_prompts, tiny_model


def test_fused_weights_are_views_of_one_matrix_and_the_state_dict_is_unchanged():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse(model)
    assert is_fused(model)
    after = model.state_dict()
    assert list(after) == list(before)  # the checkpoint names, in order, and no fused buffer among them
    assert all(torch.equal(after[k], before[k]) for k in before)
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        assert torch.equal(a.qkv, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        assert torch.equal(m.gate_up, torch.cat([m.gate_proj.weight, m.up_proj.weight]))
        # slices of the fused storage: no weight is held twice
        assert a.k_proj.weight.untyped_storage().data_ptr() == a.qkv.untyped_storage().data_ptr()
        assert m.up_proj.weight.untyped_storage().data_ptr() == m.gate_up.untyped_storage().data_ptr()


@torch.no_grad()
def test_fused_model_computes_the_same_logits_and_tokens():
    model = tiny_model(loops=4)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    want = model.per_loop_logits(ids)
    prompts = random_prompts(3, model.config.vocab_size)
    want_tokens = [g.tokens for g in looplm.Engine(model).generate(prompts, max_new_tokens=6, stop=[])]
    fuse(model)
    torch.testing.assert_close(model.per_loop_logits(ids), want, rtol=1e-5, atol=1e-5)  # a different BLAS blocking only
    assert [g.tokens for g in looplm.Engine(model).generate(prompts, max_new_tokens=6, stop=[])] == want_tokens
    unfuse(model)
    assert not is_fused(model)
    torch.testing.assert_close(model.per_loop_logits(ids), want, rtol=0, atol=0)


def test_saving_a_fused_model_writes_the_unfused_checkpoint(tmp_path):
    model = tiny_model()
    save_pretrained(model, tmp_path / "plain")
    save_pretrained(fuse(model), tmp_path / "fused")
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == (tmp_path / "fused" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("large", [False, True])
def test_load_fuses_only_large_models(tmp_path, monkeypatch, large):
    save_pretrained(tiny_model(), tmp_path)
    big = dtypes.weight_bytes(looplm.checkpoint.read_config(tmp_path))
    monkeypatch.setattr(dtypes, "BF16_MIN_BYTES", big if large else big + 1)
    assert is_fused(looplm.load(tmp_path).model) is large
    assert is_fused(fuse_if_large(tiny_model())) is large
