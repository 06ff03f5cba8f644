"""Shared fixtures of the benchmark suite.

- `bench_model`: parametrised over the models every decoder is compared on — the bundled
  default model ("default", skipped while looplm/default_model/ is absent) and a ~100M-parameter
  Ouro-shaped model with random weights built in memory ("random-100m"). `default_model` and
  `random_model` give one of them directly.
- `measure(bm, batch, mode, **options)`: times `Engine.generate` under pytest-benchmark (a warm-up
  call outside the timed rounds), checks nothing itself, and fills `benchmark.extra_info` with
  tokens/s, loops per token, speculative statistics, KV bytes per token, peak memory and the ratio
  to full-depth decoding of the same model, batch and length, timed in calls interleaved with the
  benchmark's own rounds (untimed by pytest-benchmark), so drifting machine load cancels out.
- `baselines`: the session's full-depth outputs per (model, batch, new tokens), measured on first use.

Options: `--bench-device cpu|cuda` (env LOOPLM_BENCH_DEVICE) and `--bench-quick`
(env LOOPLM_BENCH_QUICK=1, fewer tokens and rounds).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import looplm
from looplm import Engine, Generation, LoopConfig, LoopLM
from looplm.api import DEFAULT_MODEL
from looplm.paged import PagedKVCache, bytes_per_position
from looplm.runner import Runner

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAMES = ("default", "random-100m")

# ~100M parameters, Ouro-1.4B's shape scaled down: MHA with head_dim 128, intermediate/hidden
# = 2.75, untied embeddings, T = 4. 6 layers x 12.8M + 2 x 12.6M (embeddings, head) = 102M.
RANDOM_100M = LoopConfig(
    vocab_size=12288,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=1024,
    rope_theta=1e6,
    total_ut_steps=4,
    eos_token_id=None,
)

# Prompts for the default model (it was trained on Python sources, docs, Austen and synthetic tasks).
TEXT_PROMPTS = [
    "def fibonacci(n):",
    "It is a truth universally acknowledged, that a single man",
    "import os\nimport sys\n\ndef main():",
    "class Stack:\n    def __init__(self):",
    "The os.path module implements some useful functions on pathnames.",
    "Elizabeth was",
    "for i in range(10):\n    if i % 2 == 0:",
    "def read_config(path):\n    \"\"\"Read a configuration file",
    "Mr. Darcy said nothing, but",
    "The with statement is used to wrap the execution of a block",
    "try:\n    import json\nexcept ImportError:",
    "Emma Woodhouse, handsome, clever, and rich,",
    "def quicksort(items):",
    "Return a list of the words in the string, using sep",
    "She had never",
    "while True:\n    line = f.readline()",
]


def pytest_addoption(parser):
    group = parser.getgroup("looplm benchmarks")
    group.addoption(
        "--bench-device",
        default=os.environ.get("LOOPLM_BENCH_DEVICE", "cpu"),
        choices=["cpu", "cuda"],
        help="device the benchmark models run on (env LOOPLM_BENCH_DEVICE)",
    )
    group.addoption(
        "--bench-quick",
        action="store_true",
        default=os.environ.get("LOOPLM_BENCH_QUICK", "") not in ("", "0"),
        help="fewer new tokens and rounds (env LOOPLM_BENCH_QUICK=1)",
    )
    group.addoption(
        "--bench-threads",
        type=int,
        default=int(os.environ.get("LOOPLM_BENCH_THREADS", "1")),
        help="torch intra-op threads on the CPU (env LOOPLM_BENCH_THREADS; default 1: steadiest on a shared machine)",
    )
    group.addoption(
        "--bench-dtype",
        default=os.environ.get("LOOPLM_BENCH_DTYPE", "float32"),
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (env LOOPLM_BENCH_DTYPE; default float32, in which the exactness checks are exact)",
    )
    group.addoption(
        "--bench-checkpoint",
        default=os.environ.get("LOOPLM_BENCH_CHECKPOINT") or None,
        help="an Ouro checkpoint directory to benchmark in place of the bundled default model (env LOOPLM_BENCH_CHECKPOINT)",
    )


# -- the machine -------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_description(device: str = "cpu") -> dict:
    """What the numbers were measured on: CPU model, cores, threads, GPU, torch, date, commit."""
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        # uncommitted changes to the code that ran (generated results files do not count)
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", "looplm", "spec", "anytime", "kernels", "benchmarks/*.py")),
    }
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["looplm"] = machine_description(config.getoption("--bench-device"))
    machine_info["looplm"]["torch_threads"] = config.getoption("--bench-threads")


# outcomes of every test, so the report can say what was skipped (and why) or failed
_OUTCOMES: list[dict] = []


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = report.longrepr[2].removeprefix("Skipped: ")
        elif report.failed:
            reason = (report.longreprtext or "").strip().splitlines()[-1:][0] if report.longreprtext else "failed"
        _OUTCOMES.append({"test": report.nodeid, "when": report.when, "outcome": report.outcome, "reason": reason})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["looplm_outcomes"] = list(_OUTCOMES)


# -- the models --------------------------------------------------------------------------------
@dataclass
class BenchModel:
    """A model under test, with the prompts and the run length every decoder uses on it."""

    name: str
    engine: Engine
    prompt_pool: list[list[int]]
    new_tokens: int  # new tokens per row in one timed generate call
    rounds: int  # timed rounds per benchmark
    params: int = 0
    description: str = ""

    @property
    def model(self) -> LoopLM:
        return self.engine.model

    @property
    def num_loops(self) -> int:
        return self.model.num_loops

    def prompts(self, batch: int) -> list[list[int]]:
        """`batch` ragged prompts (distinct up to 16, then repeated)."""
        return [self.prompt_pool[i % len(self.prompt_pool)] for i in range(batch)]


def _count_params(model: LoopLM) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def build_default(device: str, quick: bool, path: str | None = None, dtype: str = "float32") -> BenchModel:
    engine = looplm.load(path, dtype=dtype, device=device)
    engine.model.eval()
    if engine.tokenizer is not None:
        pool = [engine.encode(t) for t in TEXT_PROMPTS]
    else:
        pool = _random_prompts(engine.config.vocab_size, 16, 6, 14, seed=1)
    n = _count_params(engine.model)
    cfg = engine.config
    what = f"checkpoint {path}" if path else "bundled default model"
    desc = f"{what}: {n / 1e6:.1f}M params, {dtype}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers x {cfg.total_ut_steps} loops, vocab {cfg.vocab_size}"
    return BenchModel("default", engine, pool, new_tokens=16 if quick else 32, rounds=1 if quick else 3, params=n, description=desc)


def build_random_100m(device: str, quick: bool, dtype: str = "float32") -> BenchModel:
    model = LoopLM(RANDOM_100M).init_weights(seed=0).to(device=device, dtype=getattr(torch, dtype)).eval()
    pool = _random_prompts(RANDOM_100M.vocab_size, 16, 6, 12, seed=2)
    n = _count_params(model)
    cfg = RANDOM_100M
    desc = f"random Ouro-shaped model: {n / 1e6:.1f}M params, {dtype}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers x {cfg.total_ut_steps} loops, vocab {cfg.vocab_size}, init std 0.02 (random weights: its early loops do not predict its last loop's tokens, so its speculative rows measure the cost of drafting and verifying, not a speedup)"
    return BenchModel("random-100m", Engine(model), pool, new_tokens=4 if quick else 8, rounds=1 if quick else 2, params=n, description=desc)


def _random_prompts(vocab: int, count: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (count,), generator=g).tolist()
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def generate_each(engine: Engine, prompts, new_tokens: int, **opts) -> tuple[tuple[float, float], list[Generation]]:
    """Each prompt generated alone, one after the other, never stopping early -> ((wall s, process
    CPU s) in total, [Generation])."""
    t0, c0 = time.perf_counter(), time.process_time()
    gens = [engine.generate(p, max_new_tokens=new_tokens, stop=[], **opts) for p in prompts]
    return (time.perf_counter() - t0, time.process_time() - c0), gens


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> str:
    device = pytestconfig.getoption("--bench-device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but no CUDA device is available")
    return device


@pytest.fixture(autouse=True)
def _bench_threads(pytestconfig):
    """Every benchmark of this folder runs with --bench-threads intra-op threads (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(pytestconfig.getoption("--bench-threads"))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bench_quick(pytestconfig) -> bool:
    return pytestconfig.getoption("--bench-quick")


@pytest.fixture(scope="session")
def _model_store(pytestconfig) -> dict:
    return {"checkpoint": pytestconfig.getoption("--bench-checkpoint"), "dtype": pytestconfig.getoption("--bench-dtype")}


def _get_model(store: dict, name: str, device: str, quick: bool) -> BenchModel:
    if name not in store:
        if name == "default":
            path = store["checkpoint"]
            if path is None and not (DEFAULT_MODEL / "config.json").is_file():
                store[name] = f"the bundled default model is not in {DEFAULT_MODEL} yet"
            else:
                store[name] = build_default(device, quick, path, store["dtype"])
        elif name == "random-100m":
            store[name] = build_random_100m(device, quick, store["dtype"])
        else:
            raise ValueError(f"unknown benchmark model {name!r}; choose one of {MODEL_NAMES}")
    got = store[name]
    if isinstance(got, str):
        pytest.skip(got)
    return got


@pytest.fixture(params=MODEL_NAMES)
def bench_model(request, _model_store, bench_device, bench_quick) -> BenchModel:
    """Each benchmark model in turn (the default one is skipped while it is absent)."""
    return _get_model(_model_store, request.param, bench_device, bench_quick)


@pytest.fixture
def default_model(_model_store, bench_device, bench_quick) -> BenchModel:
    return _get_model(_model_store, "default", bench_device, bench_quick)


@pytest.fixture
def random_model(_model_store, bench_device, bench_quick) -> BenchModel:
    return _get_model(_model_store, "random-100m", bench_device, bench_quick)


# -- measuring ---------------------------------------------------------------------------------
class _PeakMemory:
    """Peak memory above the level at entry while the block runs.

    CPU: the process's resident set size sampled every 2 ms from /proc/self/statm by a thread
    (tracemalloc cannot see PyTorch's allocations; ru_maxrss only moves past the process's earlier
    peak). CUDA: torch.cuda.max_memory_allocated.
    """

    def __init__(self, device: str):
        self.device, self.peak_bytes, self.method = device, None, ""

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated above the level before the call"
            return self
        self.method = "peak RSS above the RSS before the call (after malloc_trim), /proc/self/statm sampled every 2 ms"
        _malloc_trim()  # hand freed heap back to the OS so this call's allocations show in the RSS
        self.base = self._rss()
        if self.base is None:
            self.method = "not measured: /proc/self/statm is unavailable"
            return self
        self.peak, self.stop = self.base, threading.Event()

        def sample():
            while not self.stop.is_set():
                self.peak = max(self.peak, self._rss())
                self.stop.wait(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.base
        elif self.base is not None:
            self.peak = max(self.peak, self._rss())
            self.stop.set()
            self.thread.join()
            self.peak_bytes = self.peak - self.base
        return False

    @staticmethod
    def _rss() -> int | None:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _kv_bytes(bm: BenchModel, gens: list[Generation], kv: str) -> tuple[float, int, str]:
    """(KV bytes per position and row, KV bytes the call's requests reserve, where the figure comes
    from) of the engine's paged cache of mode `kv`. A request reserves, when admitted, whole blocks
    for its prompt and its new tokens (looplm.paged.BlockPool)."""
    cache = bm.engine.scheduler.runners[kv].cache
    per_token = cache.bytes_per_token()
    assert per_token == bytes_per_position(bm.model.config, kv, cache.k.dtype)
    reserved = sum(cache.pool.blocks_for(len(g.prompt_tokens) + len(g.tokens)) for g in gens) * cache.block_size * per_token
    return float(per_token), reserved, f"the engine's {kv} PagedKVCache: nbytes per cache position"


@dataclass
class Measurement:
    """One benchmark's results: the outputs of its calls and what they cost.

    Speeds use the fastest round (min wall time): on a shared machine noise only slows a run.
    """

    model: str
    mode: str
    batch: int
    options: dict
    outputs: list[list[int]]  # new tokens per row (identical in every round: greedy)
    gens: list[Generation]
    seconds: list[float]  # wall time of each timed generate call
    prefill_ms: list[float]  # per timed call (Generation.stats['prefill_ms'], or prefill measured apart)
    new_tokens: int  # new tokens of one call, all rows
    token_loops: int = 0  # (token, loop) pairs computed in the warm-up call, prefill included (all requests)
    prefill_token_loops: int = 0  # of those, the prompts' prefill (T loops per prompt position)
    kv_bytes_per_token: float | None = None
    kv_bytes_source: str = ""
    peak_mem_bytes: int | None = None
    peak_mem_method: str = ""
    stats: dict = field(default_factory=dict)
    paired: "Measurement | None" = None  # full-depth calls interleaved with the timed rounds

    @property
    def decode_seconds(self) -> list[float]:
        return [max(s - p / 1e3, 1e-9) for s, p in zip(self.seconds, self.prefill_ms)]

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of the whole generate call (prefill included), best round."""
        return self.new_tokens / min(self.seconds)

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second of decoding (the call's wall time minus its prefill), best round."""
        return self.new_tokens / min(self.decode_seconds)

    @property
    def mean_loops(self) -> float:
        loops = [n for g in self.gens for n in g.loops]
        return sum(loops) / max(len(loops), 1)

    @property
    def mean_exit_loop(self) -> float:
        exits = [s.exit_loop for g in self.gens for s in g.steps]
        return sum(exits) / max(len(exits), 1)

    @property
    def decode_loops_per_token(self) -> float:
        """(token, loop) pairs computed after prefill per new token (rejected drafts included)."""
        return (self.token_loops - self.prefill_token_loops) / max(self.new_tokens, 1)


def _first(stats: dict, *names):
    for n in names:
        if isinstance(stats.get(n), (int, float)) and not isinstance(stats.get(n), bool):
            return float(stats[n])
    return None


class Baselines:
    """Full-depth runs of this session per (model, batch, new tokens): the reference outputs.

    (Ratios use the full-depth calls interleaved with each benchmark's rounds, `Measurement.paired`.)
    """

    def __init__(self, device: str):
        self.device = device
        self.runs: dict[tuple, Measurement] = {}

    def get(self, bm: BenchModel, batch: int, new_tokens: int | None = None, rounds: int | None = None) -> Measurement:
        key = (bm.name, batch, new_tokens or bm.new_tokens)
        if key not in self.runs:
            self.runs[key] = run_generate(bm, batch, "full", {}, key[2], rounds or bm.rounds, self.device)
        return self.runs[key]

    def put(self, key: tuple, m: Measurement) -> None:
        self.runs.setdefault(key, m)


@pytest.fixture(scope="session")
def baselines(bench_device) -> Baselines:
    return Baselines(bench_device)


def _prefill_ms(bm: BenchModel, batch: int, device: str) -> float:
    """Median wall time of the prompts' prefill Forwards (looplm.decoding.prefill), all of them in
    one runner step as the engine batches them, over a fresh paged cache (when a decoder reports none)."""
    from looplm.decoding import DecodeRequest, prefill

    prompts = bm.prompts(batch)
    p = bm.model.lm_head.weight
    bs = 16
    blocks = sum(-(-len(q) // bs) for q in prompts)
    times = []
    for _ in range(3):
        runner = Runner(bm.model, PagedKVCache(bm.model.config, blocks, bs, dtype=p.dtype, device=p.device))
        items = []
        for i, q in enumerate(prompts):
            runner.cache.pool.admit(i, len(q))
            req = DecodeRequest([q], [1], None, None, [False])
            items.append((runner.cache.pool.ensure(i, len(q)), prefill(req, p.device)))
        _sync(device)
        t0 = time.perf_counter()
        runner.run(items)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_generate(
    bm: BenchModel, batch: int, mode: str, options: dict, new_tokens: int, rounds: int, device: str, benchmark=None, paired_full: bool = False
) -> Measurement:
    """Warm-up call (memory, caches, token loops measured there), then `rounds` timed calls.

    With `benchmark` the timed calls run under benchmark.pedantic (one iteration per round).
    With `paired_full`, a full-depth call runs (timed by us, untimed by pytest-benchmark) right
    before each timed round; the result's `.paired` holds those runs, so the ratio to full depth
    compares calls made seconds apart on a machine whose speed drifts.
    """
    prompts = bm.prompts(batch)
    engine, model = bm.engine, bm.model

    def call(mode=mode, options=options):
        return engine.generate(prompts, max_new_tokens=new_tokens, mode=mode, stop=[], **options)

    kv_mode = options.get("kv", "per_loop")
    engine.scheduler.runner(kv_mode)  # the engine's paged cache exists before the call: its blocks are counted below
    with _PeakMemory(device) as mem:
        gens = call()
    token_loops = sum(g.stats["token_loops"] for g in gens)
    kv, kv_reserved, kv_source = _kv_bytes(bm, gens, kv_mode)
    if mem.peak_bytes is not None:
        mem.peak_bytes += kv_reserved
        mem.method += " + the KV bytes of the cache blocks the call's requests reserve (the engine's paged cache is allocated beforehand)"

    runs = {"self": ([], [], []), "full": ([], [], [])}  # seconds, prefill_ms, results

    def timed(which="self", **kw):
        seconds, prefill, results = runs[which]
        _sync(device)
        t0 = time.perf_counter()
        out = call(**kw)
        _sync(device)
        seconds.append(time.perf_counter() - t0)
        prefill.append(out[0].stats.get("prefill_ms"))
        results.append(out)
        return out

    def setup():
        if paired_full:
            timed("full", mode="full", options={})

    if benchmark is not None:
        benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    else:
        for _ in range(rounds):
            setup()
            timed()
    measured_prefill = None

    def build(which, mode, options, **extra) -> Measurement:
        nonlocal measured_prefill
        seconds, prefill, results = runs[which]
        if not all(isinstance(p, (int, float)) for p in prefill):
            if measured_prefill is None:
                measured_prefill = _prefill_ms(bm, batch, device)
            prefill = [measured_prefill] * len(seconds)
        gens = results[-1]
        return Measurement(
            model=bm.name, mode=mode, batch=batch, options=dict(options), outputs=[list(g.tokens) for g in gens], gens=gens,
            seconds=list(seconds), prefill_ms=list(prefill), new_tokens=sum(len(g.tokens) for g in gens), **extra,
        )

    m = build(
        "self", mode, options,
        token_loops=token_loops, prefill_token_loops=sum(len(p) for p in prompts) * model.num_loops,
        kv_bytes_per_token=kv, kv_bytes_source=kv_source, peak_mem_bytes=mem.peak_bytes, peak_mem_method=mem.method,
        stats=dict(gens[0].stats),
    )
    if paired_full:
        m.paired = build("full", "full", {})
    return m


def extra_info(m: Measurement, base: Measurement | None, description: str = "") -> dict:
    """What a benchmark records, flat and JSON-friendly (read by benchmarks/report.py)."""
    s = m.stats
    info = {
        "model": m.model,
        "model_description": description,
        "mode": m.mode,
        "batch": m.batch,
        "torch_threads": torch.get_num_threads(),
        "options": {k: v for k, v in m.options.items()},
        "new_tokens_per_row": m.new_tokens // max(m.batch, 1),
        "new_tokens": m.new_tokens,
        "rounds": len(m.seconds),
        "seconds": m.seconds,
        "seconds_min": min(m.seconds),
        "tokens_per_s": m.tokens_per_s,
        "decode_tokens_per_s": m.decode_tokens_per_s,
        "prefill_ms": min(m.prefill_ms),
        "mean_loops": m.mean_loops,
        "mean_exit_loop": m.mean_exit_loop,
        "decode_loops_per_token": m.decode_loops_per_token,
        "acceptance_rate": _first(s, "acceptance_rate", "accept_rate", "acceptance"),
        "mean_accepted_length": _first(s, "mean_accepted_length", "mean_accepted_len", "mean_accepted", "accepted_length_mean"),
        "kv_bytes_per_token": m.kv_bytes_per_token,
        "kv_bytes_source": m.kv_bytes_source,
        "peak_mem_mb": None if m.peak_mem_bytes is None else m.peak_mem_bytes / 2**20,
        "peak_mem_method": m.peak_mem_method,
        "stats": {k: v for k, v in s.items() if isinstance(v, (int, float, str, bool)) or v is None},
    }
    if base is not None:
        info["full_seconds"] = base.seconds
        info["full_tokens_per_s"] = base.tokens_per_s
        info["full_decode_tokens_per_s"] = base.decode_tokens_per_s
        # median over rounds of (paired full-depth call time / this round's time): each ratio compares
        # two calls made back to back, so a change of machine load between rounds cancels out
        n = min(len(base.seconds), len(m.seconds))
        info["ratio_to_full"] = statistics.median(base.seconds[i] / m.seconds[i] for i in range(n))
        info["decode_ratio_to_full"] = statistics.median(base.decode_seconds[i] / m.decode_seconds[i] for i in range(n))
        agree = [a == b for x, y in zip(m.outputs, base.outputs) for a, b in zip(x, y)]
        info["token_agreement_with_full"] = sum(agree) / max(len(agree), 1)
    return info


@pytest.fixture
def measure(benchmark, baselines, bench_device):
    """`measure(bm, batch=1, mode="full", *, new_tokens=None, rounds=None, **options) -> Measurement`.

    Times `bm.engine.generate(prompts, mode=mode, stop=[], **options)` under `benchmark` (greedy),
    after one untimed warm-up call, and records `extra_info` including the ratio to full-depth calls
    of the same model, batch and length interleaved with its rounds. Assert correctness on the
    returned Measurement (its `.outputs`); `baselines.get(bm, batch).outputs` are the full-depth tokens.
    """

    def run(bm: BenchModel, batch: int = 1, mode: str = "full", *, new_tokens: int | None = None, rounds: int | None = None, **options) -> Measurement:
        n = new_tokens or bm.new_tokens
        is_baseline = mode == "full" and not options
        if not is_baseline:
            baselines.get(bm, batch, n, rounds)  # the full-depth outputs to check against (measured once)
        benchmark.group = f"{bm.name} batch {batch}"
        m = run_generate(bm, batch, mode, options, n, rounds or bm.rounds, bench_device, benchmark, paired_full=not is_baseline)
        if is_baseline:
            baselines.put((bm.name, batch, n), m)
        benchmark.extra_info.update(extra_info(m, m if is_baseline else m.paired, bm.description))
        return m

    return run


def mode_available(bm: BenchModel, mode: str, **options) -> str | None:
    """None when `generate(mode=mode, **options)` runs on this model, else why not (a skip reason).

    Only "not landed yet" counts: the mode's module is missing, or an option is unknown to it
    (TypeError on an unexpected keyword, or a ValueError naming the option). Anything else raises.
    """
    from looplm.decoding import resolve_mode

    try:
        resolve_mode(mode)
    except ValueError as e:
        return f"mode={mode!r} is not available yet: {e}"
    try:
        bm.engine.generate(bm.prompts(1)[0], max_new_tokens=2, mode=mode, stop=[], **options)
    except (TypeError, ValueError) as e:
        named = [k for k in options if k in str(e)]
        if isinstance(e, TypeError) and "unexpected keyword" in str(e) or named:
            opts = ", ".join(f"{k}={v!r}" for k, v in options.items())
            return f"mode={mode!r} with {opts} is not available yet ({type(e).__name__}: {e})"
        raise
    return None


@pytest.fixture(scope="module")
def engine():
    """The bundled default model's engine on one torch thread (skipped when the model is absent);
    the thread count is restored afterwards."""
    if not (DEFAULT_MODEL / "config.json").is_file():
        pytest.skip(f"default model not present in {DEFAULT_MODEL}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield looplm.load()
    torch.set_num_threads(threads)
