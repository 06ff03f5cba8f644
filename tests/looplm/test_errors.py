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


# -- loader gaps (issue #13 item 7) ------------------------------------------------------------
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("hidden_size", "32", "hidden_size must be an integer, got '32'"),
        ("hidden_size", 31.5, "hidden_size must be an integer, got 31.5"),
        ("num_hidden_layers", True, "num_hidden_layers must be an integer, got True"),
        ("rms_norm_eps", "1e-6", "rms_norm_eps must be a finite number, got '1e-6'"),
        ("tie_word_embeddings", 0, "tie_word_embeddings must be true or false, got 0"),
        ("eos_token_id", [0, "2"], r"eos_token_id must be an integer or a list of integers or null, got \[0, '2'\]"),
        ("intermediate_size", 0, r"invalid config value\(s\): intermediate_size=0"),
    ],
)
def test_wrong_typed_config_values_name_file_and_key(ckpt, key, value, message):
    edit_config(ckpt, **{key: value})
    with pytest.raises(ValueError, match=f"config.json: {message}"):
        looplm.load(ckpt)


def test_missing_model_type(ckpt):
    edit_config(ckpt, model_type=None)
    with pytest.raises(ValueError, match=r"config.json: no model_type \(expected 'ouro'\)"):
        looplm.load(ckpt)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_name_file_and_tensor(ckpt, bad):
    sd = looplm.load(ckpt).model.state_dict()  # untied: every tensor is in the file
    name = list(sd)[int(torch.randint(0, len(sd), ()))]
    row = int(torch.randint(0, min(2, sd[name].numel()), ()))  # the gate's bias has one value

    def poison(sd):
        t = sd[name].clone()
        t.view(-1)[row] = bad
        sd[name] = t

    _rewrite_tensors(ckpt, poison)
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor {name} has 1 non-finite value\(s\)"):
        looplm.load(ckpt)


def test_overflow_in_the_requested_dtype_is_non_finite(ckpt):
    _rewrite_tensors(ckpt, lambda sd: sd["model.norm.weight"].__setitem__(0, 1e6))  # > float16's 65504
    assert looplm.load(ckpt).model.model.norm.weight[0].item() == 1e6
    with pytest.raises(ValueError, match=r"tensor model.norm.weight has 1 non-finite value\(s\) \(NaN or inf\) in torch.float16"):
        looplm.load(ckpt, dtype="float16")


def test_finite_weights_whose_sum_overflows_still_load(ckpt):
    """The loader's finiteness check sums each tensor first; a sum that overflows with every value
    finite must not count as a bad tensor."""
    _rewrite_tensors(ckpt, lambda sd: sd["model.norm.weight"][:3].fill_(3e38))  # finite in float32; 9e38 is not
    assert looplm.load(ckpt).model.model.norm.weight[:3].tolist() == [pytest.approx(3e38)] * 3


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/../../x.safetensors", "", 3])
def test_shard_index_cannot_name_files_outside_the_checkpoint(tmp_path, shard):
    save_pretrained(tiny_model(), tmp_path / "ck", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "ck/model.safetensors.index.json").read_text())
    victim = sorted(index["weight_map"])[0]
    index["weight_map"][victim] = shard
    (tmp_path / "ck/model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "outside.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"model.safetensors.index.json: weight_map\['{victim}'\] = .* is not a file name inside"):
        looplm.load(tmp_path / "ck")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_without_cuda(ckpt, device):
    with pytest.raises(ValueError, match="CUDA is not available"):
        looplm.load(ckpt, device=device)


def test_unknown_device(ckpt):
    with pytest.raises(ValueError, match="device='tpu9' is not a torch device"):
        looplm.load(ckpt, device="tpu9")


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2", True])
def test_bad_thread_counts(ckpt, threads, monkeypatch):
    with pytest.raises(ValueError, match=f"threads must be an integer >= 1, got {threads!r}"):
        looplm.load(ckpt, threads=threads)
    monkeypatch.setenv("LOOPLM_THREADS", "two")
    with pytest.raises(ValueError, match="LOOPLM_THREADS must be an integer >= 1, got 'two'"):
        looplm.load(ckpt)


# -- generate() gaps (issue #13 item 8) --------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": None}, "prompt must be a string, a list of token ids, or a list of those; got NoneType None"),
        ({"prompt": 5}, "prompt must be a string, a list of token ids, or a list of those; got int 5"),
        ({"prompt": [1, 3.7]}, r"prompt: token id 3.7 at index 1 is not an integer"),
        ({"prompt": [3.7, 1]}, r"prompt 0 must be a string or a list of token ids, got float 3.7"),
        ({"prompt": [[1, 2], [4, None]]}, r"prompt 1: token id None at index 1 is not an integer"),
        ({"prompt": [1, True]}, r"prompt: token id True at index 1 is not an integer"),
        ({"prompt": torch.tensor([1.0, 2.0])}, "a tensor of token ids must be 1-D with an integer dtype"),
        ({"prompt": torch.tensor([[1, 2]])}, "a tensor of token ids must be 1-D with an integer dtype"),
        ({"stop": 3.5}, r"stop must be None, a token id >= 0, a string, or a list of those; got 3.5"),
        ({"stop": [2, None]}, r"stop must be .*; got None in \[2, None\]"),
        ({"stop": -1}, r"stop must be .*; got -1"),
        ({"seed": "abc"}, "seed must be None or an integer in \\[0, 2\\*\\*64\\), got 'abc'"),
        ({"seed": 1.5}, "seed must be None or an integer"),
        ({"seed": -3}, "seed must be None or an integer"),
        ({"temperature": float("inf")}, "temperature must be a finite number >= 0, got inf"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0, got nan"),
        ({"temperature": "0.5"}, "temperature must be a finite number >= 0, got '0.5'"),
        ({"top_k": 2.5}, "top_k must be an integer >= 1, got 2.5"),
        ({"top_p": float("nan")}, r"top_p must be a finite number in \(0, 1\], got nan"),
        ({"max_new_tokens": 2.0}, "max_new_tokens must be an integer >= 1, got 2.0"),
        ({"mode": "anytime", "exit": "confidence", "threshold": 1.5}, r"confidence threshold must be a finite number in \[0, 1\], got 1.5"),
        ({"mode": "anytime", "exit": "confidence", "threshold": float("nan")}, "confidence threshold must be a finite number"),
        ({"mode": "anytime", "exit": "q_exit", "q": -0.1}, r"q_exit threshold must be a finite number in \[0, 1\], got -0.1"),
        ({"mode": "anytime", "exit": "entropy", "threshold": -1}, "entropy threshold must be a finite number >= 0, got -1"),
        ({"mode": "anytime", "exit": "kl", "threshold": float("inf")}, "kl threshold must be a finite number >= 0, got inf"),
        ({"mode": "anytime", "exit": "delta", "threshold": "0.1"}, "delta threshold must be a finite number >= 0, got '0.1'"),
        ({"mode": "anytime", "exit": "static", "threshold": 2.0}, "static depth must be an integer >= 1, got 2.0"),
    ],
)
def test_bad_arguments_name_the_argument(engine_and_reference, kwargs, message):
    engine, reference = engine_and_reference
    args = {"prompt": [1, 2, 3], "max_new_tokens": 4, "stop": []} | kwargs
    prompt = args.pop("prompt")
    with pytest.raises(ValueError, match=message):
        engine.generate(prompt, **args)
    if "exit" not in args:  # generic arguments: stream() raises when called, before any next()
        with pytest.raises(ValueError, match=message):
            engine.stream(prompt, **args)
    assert_still_works(engine, reference)


def test_stream_raises_when_called(engine_and_reference):
    engine, reference = engine_and_reference
    for prompt, message in (("", "no tokenizer.json"), ([], "prompt 0 is empty"), ([[1], []], "prompt 1 is empty")):
        with pytest.raises(ValueError, match=message):
            engine.stream(prompt, max_new_tokens=3)
    with pytest.raises(ValueError, match="unknown mode 'warp'"):
        engine.stream([1, 2], mode="warp")
    assert_still_works(engine, reference)


def test_integer_tensors_and_tuples_are_prompts(engine_and_reference):
    engine, _ = engine_and_reference
    ids = torch.randint(0, engine.config.vocab_size, (5,))
    want = engine.generate(ids.tolist(), max_new_tokens=4, stop=[]).tokens
    assert engine.generate(ids, max_new_tokens=4, stop=[]).tokens == want
    assert engine.generate(tuple(ids.tolist()), max_new_tokens=4, stop=[]).tokens == want
    assert [g.tokens for g in engine.generate([ids, ids.tolist()], max_new_tokens=4, stop=[])] == [want, want]
