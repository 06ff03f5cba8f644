"""The CPU dtype rule (looplm.dtypes) and how far bf16 per-loop logits stray from float32's."""

import random

import pytest
import torch

import looplm.dtypes as dtypes
from looplm.checkpoint import load_model, save_pretrained
from looplm.dtypes import default_dtype, weight_bytes

from .conftest import tiny_config, tiny_model

# bf16 keeps 8 significant bits (a relative rounding of <= 2^-9 per op), compounded over L x T = 8 layer
# passes: each loop's logits (all positions) differ from float32's by ||bf16 - f32|| / ||f32|| of 0.021
# on average and at most 0.063 over 300 random tiny models (std 0.1) and prompts: the stated tolerance
# is 0.1 per loop. (Per position the tail is heavier: up to 0.21 of the position's largest |logit|.)
BF16_LOGIT_TOL = 0.1


@pytest.mark.parametrize("tied", [False, True])
def test_weight_bytes_counts_every_parameter_once(tied):
    cfg = tiny_config(tied=tied, layers=random.randint(1, 3))
    model = tiny_model(tied=tied, layers=cfg.num_hidden_layers)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert weight_bytes(cfg, 2) == 2 * params
    assert weight_bytes(cfg, 4) == 4 * params


def _big_bf16_config():
    cfg = tiny_config()
    cfg.torch_dtype = "bfloat16"
    return cfg


def test_rule_on_the_cpu(monkeypatch):
    cfg = _big_bf16_config()
    monkeypatch.setattr(dtypes, "BF16_MIN_BYTES", weight_bytes(cfg))  # exactly large enough
    monkeypatch.setattr(dtypes, "cpu_bf16_native", lambda: True)
    assert default_dtype(cfg, "cpu") == torch.bfloat16
    monkeypatch.setattr(dtypes, "BF16_MIN_BYTES", weight_bytes(cfg) + 1)  # fits the caches: float32
    assert default_dtype(cfg, "cpu") == torch.float32
    monkeypatch.setattr(dtypes, "BF16_MIN_BYTES", 0)
    monkeypatch.setattr(dtypes, "cpu_bf16_native", lambda: False)  # no native bf16: float32
    assert default_dtype(cfg, "cpu") == torch.float32
    monkeypatch.setattr(dtypes, "cpu_bf16_native", lambda: True)
    cfg.torch_dtype = "float32"  # the config does not ask for bf16
    assert default_dtype(cfg, "cpu") == torch.float32


def test_rule_off_the_cpu_is_the_config_dtype():
    cfg = _big_bf16_config()
    assert default_dtype(cfg, "cuda") == torch.bfloat16
    cfg.torch_dtype = "float16"
    assert default_dtype(cfg, torch.device("cuda", 0)) == torch.float16


def test_native_bf16_follows_the_cpuinfo_flags(monkeypatch):
    for flags, native in [({"avx2", "fma"}, False), ({"avx512f", "avx512_bf16"}, True), ({"amx_tile", "amx_bf16"}, True), (set(), False)]:
        monkeypatch.setattr(dtypes, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert dtypes.cpu_bf16_native() is native
        assert ("no native" in dtypes.cpu_bf16_reason()) is not native


@pytest.mark.parametrize("native", [False, True])
def test_loader_uses_the_rule(tmp_path, monkeypatch, native):
    save_pretrained(tiny_model(), tmp_path, dtype="bfloat16")
    monkeypatch.setattr(dtypes, "BF16_MIN_BYTES", 0)
    monkeypatch.setattr(dtypes, "cpu_bf16_native", lambda: native)
    want = torch.bfloat16 if native else torch.float32
    assert {p.dtype for p in load_model(tmp_path).parameters()} == {want}
    assert {p.dtype for p in load_model(tmp_path, dtype="float32").parameters()} == {torch.float32}  # asked for: kept


@torch.no_grad()
def test_bf16_per_loop_logits_within_tolerance_of_float32():
    model = tiny_model(loops=4, vocab=97)
    ids = torch.randint(0, 97, (2, 12))
    want = model.per_loop_logits(ids)  # (T, B, S, V)
    got = model.to(torch.bfloat16).per_loop_logits(ids)
    assert got.dtype == torch.bfloat16
    err = (got.float() - want).flatten(1).norm(dim=-1) / want.flatten(1).norm(dim=-1)  # (T,) per loop
    assert (err > 0).all(), "the bf16 model must really compute in bf16"
    assert (err <= BF16_LOGIT_TOL).all(), f"relative error per loop {err.tolist()}"
