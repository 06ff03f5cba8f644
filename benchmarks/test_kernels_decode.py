"""Full-depth decode on the CPU: the runner's fixed-shape step (eager and compiled,
kernels.fast_step.FixedStep) vs its plain eager plan, the same for anytime decoding with
finish="ahead" (each token's T loops in one forward, the exit replayed), and the KV cache's bytes
per token for the per-loop, "last" and "mean" caches, in one run.

Self-contained: builds its own models (the bundled default model, skipped while absent, and a
~100M-parameter Ouro-shaped model with random weights) and prints its own table at the end.

    nice -n 10 python -m pytest benchmarks/test_kernels_decode.py --benchmark-columns=mean,rounds

Environment: LOOPLM_BENCH_DEFAULT (a checkpoint directory standing in for the default model),
LOOPLM_BENCH_THREADS (torch threads, default 1: on a shared, loaded CPU more threads
make every op wait for descheduled workers), LOOPLM_BENCH_QUICK=1 (fewer tokens). Compilation
(torch.compile with inductor) happens in the warm-up, outside the timed rounds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import anytime
import looplm
from looplm import LoopConfig, LoopLM
from looplm.api import DEFAULT_MODEL
from looplm.decoding import DecodeRequest
from looplm.generate import decode_full
from looplm.paged import KV_MODES, PagedKVCache, bytes_per_position
from looplm.runner import Runner, drive
from looplm.sampling import SamplingParams

QUICK = os.environ.get("LOOPLM_BENCH_QUICK", "0") not in ("", "0")
THREADS = int(os.environ.get("LOOPLM_BENCH_THREADS", "1"))
PROMPT_LEN = 16
NEW_TOKENS = {"default": 8 if QUICK else 32, "random-100m": 4 if QUICK else 12}

# ~100M parameters in Ouro-1.4B's shape, scaled down: MHA, head_dim 128, intermediate/hidden 2.75,
# untied embeddings, T = 4: 6 layers x 12.8M + embeddings and head 2 x 12.6M = 102M.
RANDOM_100M = LoopConfig(
    vocab_size=12288, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=8, max_position_embeddings=1024, rope_theta=1e6, total_ut_steps=4,
)  # fmt: skip

_models: dict[str, LoopLM] = {}
_rows: dict[tuple, dict] = {}  # (model, what) -> numbers for the closing table


def _model(name: str) -> LoopLM:
    if name not in _models:
        if name == "default":
            path = Path(os.environ.get("LOOPLM_BENCH_DEFAULT", DEFAULT_MODEL))
            if not (path / "config.json").is_file():
                pytest.skip(f"the default model has not landed in {path}")
            _models[name] = looplm.load(path).model.float().eval()
        else:
            _models[name] = LoopLM(RANDOM_100M).init_weights(0).eval()
    return _models[name]


@pytest.fixture(scope="module", autouse=True)
def _threads_and_table(request):
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None or capman is None or not _rows:
        return
    with capman.global_and_fixture_disabled():  # teardown output is captured otherwise
        tr.write_line("")
        tr.write_line(f"kernels decode benchmark (CPU, {THREADS} thread(s), batch 1, prompt {PROMPT_LEN}, greedy, full depth)")
        for (model, what), r in sorted(_rows.items()):
            shown = {k: v for k, v in r.items() if k not in ("tokens", "steps")}
            tr.write_line(f"  {model:12s} {what:14s} " + "  ".join(f"{k}={v}" for k, v in shown.items()))


def _prompt(model: LoopLM) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, model.config.vocab_size, (PROMPT_LEN,), generator=g).tolist()]


class _Decode:
    """One sequence decoded alone by `decode_full` (or anytime q_exit at q=0.5 with finish="ahead":
    `anytime=True`) over its own runner: `start()` runs the prefill (untimed: it yields the
    prefill's token), `rest()` the n decode steps after it (the timed region). The runner keeps its
    fixed steps, so a compiled bucket is compiled once."""

    def __init__(self, model: LoopLM, prompt: list[int], n: int, step: str, anytime: bool = False):
        p = model.lm_head.weight
        bs = 16
        blocks = -(-(len(prompt) + n + 1) // bs)
        self.runner = Runner(model, PagedKVCache(model.config, blocks, bs, dtype=p.dtype, device=p.device))
        self.model, self.prompt, self.n, self.step, self.anytime = model, prompt, n, step, anytime

    def start(self):
        self.runner.cache.pool.release(0)
        req = DecodeRequest([self.prompt], [self.n + 1], SamplingParams(), torch.Generator().manual_seed(0), [False])
        dec = (anytime.decode(self.model, req, exit="q_exit", q=0.5, finish="ahead", step=self.step) if self.anytime
               else decode_full(self.model, req, step=self.step))
        steps = drive(self.runner, 0, len(self.prompt) + self.n + 1, dec)
        next(steps)
        _sync()
        return (steps,), {}

    @staticmethod
    def rest(steps) -> list[tuple[int, int]]:
        out = [(s.token, s.exit_loop) for s in steps]
        _sync()
        return out

    def time_once(self) -> tuple[float, list[int]]:
        args, _ = self.start()
        t0 = time.perf_counter()
        out = self.rest(*args)
        return time.perf_counter() - t0, out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@pytest.mark.parametrize("model_name", ["default", "random-100m"])
@pytest.mark.parametrize("step_kind", ["eager", "fixed", "compiled"])  # eager first: the ratios refer to it
def test_full_depth_decode(benchmark, model_name, step_kind):
    """Decode tokens/s at batch 1 (prefill outside the timed region): the runner's eager plan vs its
    fixed-shape step, uncompiled ("fixed") and compiled with inductor ("compiled": one graph of all T
    loops per bucket; compiled in the warm-up, outside the timed rounds)."""
    model = _model(model_name)
    prompt, n = _prompt(model)[0], NEW_TOKENS[model_name]
    dec = _Decode(model, prompt, n, step_kind)
    warm_s, _ = dec.time_once()  # compiles outside the timed region
    tokens = benchmark.pedantic(dec.rest, setup=dec.start, rounds=3, iterations=1, warmup_rounds=0)
    tok_s = n / benchmark.stats.stats.min
    row = {"tokens_per_s": round(tok_s, 2), "warmup_s": round(warm_s, 1)}
    eager = _rows.get((model_name, "eager"))
    if step_kind != "eager" and eager is not None:
        row["speedup_vs_eager"] = round(tok_s / eager["tokens_per_s"], 2)
        row["same_tokens"] = tokens == eager["tokens"]
        assert row["same_tokens"], "the fixed-shape step must decode the eager step's tokens"
        # the machine's load drifts between tests: also time eager/fixed pairs back to back
        base = _Decode(model, prompt, n, "eager")
        ratios = [base.time_once()[0] / dec.time_once()[0] for _ in range(3)]
        row["interleaved_speedup"] = round(sorted(ratios)[1], 2)  # median of 3 pairs
    _rows[(model_name, step_kind)] = {**row, **({"tokens": tokens} if step_kind == "eager" else {})}
    benchmark.extra_info.update(row, model=model_name, step=step_kind, new_tokens=n, threads=THREADS)


@pytest.mark.parametrize("step_kind", ["eager", "compiled"])  # eager first: the ratios refer to it
def test_anytime_ahead_decode(benchmark, step_kind):
    """The bundled model's anytime q_exit (q=0.5, finish="ahead") at batch 1: decode tokens/s with
    the runner's plan vs the compiled fixed-shape step (same tokens and exit loops), and against
    full depth with the same step, timed in back-to-back pairs (median of 3)."""
    model = _model("default")
    prompt, n = _prompt(model)[0], NEW_TOKENS["default"]
    dec = _Decode(model, prompt, n, step_kind, anytime=True)
    warm_s, _ = dec.time_once()  # compiles outside the timed region
    steps = benchmark.pedantic(dec.rest, setup=dec.start, rounds=3, iterations=1, warmup_rounds=0)
    tok_s = n / benchmark.stats.stats.min
    row = {"tokens_per_s": round(tok_s, 2), "warmup_s": round(warm_s, 1), "mean_exit_loop": round(sum(e for _, e in steps) / n, 2)}
    full = _Decode(model, prompt, n, step_kind)
    full.time_once()
    ratios = [full.time_once()[0] / dec.time_once()[0] for _ in range(3)]
    row["x_full_same_step"] = round(sorted(ratios)[1], 2)
    eager = _rows.get(("default", "anytime ahead eager"))
    if step_kind != "eager" and eager is not None:
        row["speedup_vs_eager"] = round(tok_s / eager["tokens_per_s"], 2)
        row["same_tokens"] = steps == eager["steps"]
        assert row["same_tokens"], "the fixed-shape step must give the plan's tokens and exit loops"
        base = _Decode(model, prompt, n, "eager", anytime=True)
        ratios = [base.time_once()[0] / dec.time_once()[0] for _ in range(3)]
        row["interleaved_speedup"] = round(sorted(ratios)[1], 2)
    _rows[("default", f"anytime ahead {step_kind}")] = {**row, **({"steps": steps} if step_kind == "eager" else {})}
    benchmark.extra_info.update(row, model="default", step=step_kind, mode="anytime q_exit q=0.5 finish=ahead",
                                new_tokens=n, threads=THREADS)


@pytest.mark.parametrize("model_name", ["default", "random-100m"])
@pytest.mark.parametrize("kv", KV_MODES)
def test_kv_cache_bytes(benchmark, model_name, kv):
    """KV bytes per token (cache position) and end-to-end tokens/s (prefill included) of Engine.generate(kv=...), mode "full"."""
    model = _model(model_name)
    engine = looplm.Engine(model)
    prompts, n = _prompt(model), max(2, NEW_TOKENS[model_name] // 2)
    gen = benchmark.pedantic(
        lambda: engine.generate(prompts[0], max_new_tokens=n, stop=[], kv=kv), rounds=1, iterations=1, warmup_rounds=1
    )
    assert list(engine.usage()["caches"]) == [kv]  # the call used the engine's paged cache of this mode only
    cache = engine.scheduler.runners[kv].cache
    per_token = cache.bytes_per_token()
    per_loop = model.num_loops * model.config.num_hidden_layers * 2 * model.config.num_key_value_heads * model.config.head_dim
    per_loop *= cache.k.element_size()
    assert per_token == (per_loop if kv == "per_loop" else per_loop // model.num_loops)
    assert per_token == bytes_per_position(model.config, kv, cache.k.dtype)
    row = {"kv_bytes_per_token": per_token, "x_smaller": per_loop // per_token, "generate_tokens_per_s": round(n / benchmark.stats.stats.min, 2)}
    _rows[(model_name, f"kv={kv}")] = row
    benchmark.extra_info.update(row, model=model_name, kv=kv, new_tokens=len(gen.tokens), threads=THREADS)


# Ouro-1.4B's published shape (docs/design.md, "Checkpoint layout"), random weights
OURO_1_4B = LoopConfig(
    vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
    num_key_value_heads=16, max_position_embeddings=65536, rope_theta=1e6, total_ut_steps=4,
)  # fmt: skip


@pytest.mark.gpu
def test_gpu_decode_vs_bandwidth_bound(benchmark):
    """Batch-1 bf16 decode of an Ouro-1.4B-shaped model vs T x (layer-stack bytes) / measured copy bandwidth."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the bandwidth-bound comparison runs only on a GPU")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LoopLM(OURO_1_4B).to(torch.bfloat16).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    bandwidth = 2 * 10 * src.nbytes / (time.perf_counter() - t0)  # read + write bytes per second
    del src, dst
    stack = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    head = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    bound_tok_s = bandwidth / (model.num_loops * stack + head)
    n = 64
    dec = _Decode(model, _prompt(model)[0], n, "compiled")
    dec.time_once()  # compiles
    benchmark.pedantic(dec.rest, setup=dec.start, rounds=3, iterations=1, warmup_rounds=0)
    tok_s = n / benchmark.stats.stats.min
    row = {
        "device": torch.cuda.get_device_name(),
        "tokens_per_s": round(tok_s, 1),
        "bound_tokens_per_s": round(bound_tok_s, 1),
        "fraction_of_bound": round(tok_s / bound_tok_s, 3),
        "copy_GBps": round(bandwidth / 1e9, 1),
        "step": "compiled",
    }
    _rows[("ouro-1.4b-bf16", "gpu-decode")] = row
    benchmark.extra_info.update(row)
