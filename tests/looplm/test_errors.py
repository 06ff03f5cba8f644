"""Bad input: a clear error naming the problem, and the engine keeps working afterwards."""

import json

import pytest
import torch

import looplm
from looplm.checkpoint import save_pretrained

from .conftest import tiny_model


@pytest.fixture
def ckpt(tmp_path):
    save_pretrained(tiny_model(), tmp_path / "ok")
    return tmp_path / "ok"


@pytest.fixture
def engine_and_reference(ckpt):
    engine = looplm.load(ckpt)
    return engine, engine.generate([[3, 4, 5], [9]], max_new_tokens=6, stop=[])


def assert_still_works(engine, reference):
    again = engine.generate([[3, 4, 5], [9]], max_new_tokens=6, stop=[])
    assert [g.tokens for g in again] == [g.tokens for g in reference]


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        looplm.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        looplm.load(tmp_path / "empty")


def test_wrong_model_type_and_missing_key(ckpt):
    edit_config(ckpt, model_type="llama")
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        looplm.load(ckpt)
    edit_config(ckpt, model_type="ouro", hidden_size=None)
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['hidden_size'\]"):
        looplm.load(ckpt)


def test_invalid_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        looplm.load(ckpt)


def _rewrite_tensors(ckpt, fn):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(ckpt / "model.safetensors"))
    fn(sd)
    save_file(sd, str(ckpt / "model.safetensors"))


def test_missing_unexpected_and_misshaped_tensors(ckpt):
    _rewrite_tensors(ckpt, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        looplm.load(ckpt)
    _rewrite_tensors(ckpt, lambda sd: sd.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(48, 32), "model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected \['model.extra.weight'\]"):
        looplm.load(ckpt)
    _rewrite_tensors(ckpt, lambda sd: (sd.pop("model.extra.weight"), sd.update({"model.norm.weight": torch.ones(31)})))
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(31,\), the config needs \(32,\)"):
        looplm.load(ckpt)


def test_truncated_and_corrupt_safetensors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        looplm.load(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        looplm.load(ckpt)


def test_index_naming_a_missing_shard(tmp_path):
    save_pretrained(tiny_model(), tmp_path, max_shard_bytes=20_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"names shard {shard.name}"):
        looplm.load(tmp_path)


def test_unsupported_dtype(ckpt):
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        looplm.load(ckpt, dtype="int8")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": []}, "empty"),
        ({"prompt": [[1, 2], []]}, "prompt 1 is empty"),
        ({"prompt": [1, 2, 500]}, r"token ids \[500\] are outside the vocabulary"),
        ({"prompt": [-1]}, "outside the vocabulary"),
        ({"prompt": [1] * 96}, "prompt 0 has 96 tokens; the context holds 96"),
        ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
        ({"top_p": 0.0}, r"top_p must be a finite number in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be a finite number in \(0, 1\]"),
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"mode": "warp"}, "unknown mode 'warp'"),
        ({"prompt": "text"}, "no tokenizer.json"),
    ],
)
def test_bad_requests_raise_and_leave_the_engine_usable(engine_and_reference, kwargs, message):
    engine, reference = engine_and_reference
    args = {"prompt": [1, 2, 3], "max_new_tokens": 4, "stop": []} | kwargs
    with pytest.raises(ValueError, match=message):
        engine.generate(args.pop("prompt"), **args)
    assert_still_works(engine, reference)


def test_failure_mid_stream_leaves_the_engine_usable(engine_and_reference):
    engine, reference = engine_and_reference
    stream = engine.stream([1, 2, 3], max_new_tokens=20, stop=[])
    next(stream)
    stream.close()  # a client that disconnects halfway
    assert_still_works(engine, reference)


def test_failed_load_does_not_touch_a_loaded_engine(engine_and_reference, ckpt):
    engine, reference = engine_and_reference
    edit_config(ckpt, vocab_size=10)
    with pytest.raises(ValueError, match=r"has shape \(61, 32\), the config needs \(10, 32\)"):
        looplm.load(ckpt)
    assert_still_works(engine, reference)
