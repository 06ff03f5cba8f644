"""`python -m benchmarks.gpu [--dry-run] [--out DIR] [--budget-s S]`: one command that validates a GPU.

Without CUDA it fails loudly (exit 2) unless `--dry-run`, which runs the same logic with tiny shapes
on the CPU in float32 (the test suite runs it, so it cannot rot). On a GPU, in bfloat16, it:
1. writes random checkpoints of Ouro-1.4B's and Ouro-2.6B's shapes (benchmarks/checkpoints.py, on
   the device) into a temporary directory and loads them back with `looplm.load`;
2. checks every attention backend available there (`kernels.available_backends`) against the
   reference (kernels.reference_attention): the attention function on prefill and decode inputs
   (against float32), and the model's per-loop logits (no cache) against the same model attending
   with the reference; greedy decode tokens per backend are recorded;
3. measures the device's bandwidth (a large matrix-vector product of the run's dtype, and a copy)
   and batch-1 full-depth eager decode tokens/s of both models against bytes per token / that rate;
4. checks speculative greedy == full depth (plain drafts and pipelined), recording weight passes
   per token (calls of a layer's MLP) and wall-clock;
5. measures throughput at 1..64 concurrent requests (a batch of prompts to `Engine.generate`);
6. last (its compilation takes longest), checks the compiled fixed-shape step (`step="compiled"`;
   "fixed", uncompiled, in a dry run) == eager decoding, and measures it against the bound.
It writes `results-gpu.json` and `RESULTS-gpu.md` (the section benchmarks/report.py also renders
into RESULTS.md) to --out (default: benchmarks/), after every phase. A phase that raises is recorded
as failed and the others still run; a phase that would start past --budget-s is skipped and says
so. Exit status 1 when any check failed. Runs on what is installed (no network, no pip): absent
backends are listed with the reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels
import looplm
from benchmarks.bandwidth import bytes_per_token
from benchmarks.checkpoints import SHAPES, write_random_checkpoint
from looplm import LoopConfig

HERE = Path(__file__).resolve().parent
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
            max_position_embeddings=512, rope_theta=1e4, total_ut_steps=4, eos_token_id=None)
ATTN_TOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}  # max |backend - reference|
# per-loop ||logits - reference logits|| / ||reference||; bf16: the bound tests/looplm/test_dtypes.py states for bf16 vs float32
LOGITS_TOL = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 0.02}


class Run:
    """One run's settings, results and failed checks; `phase` guards each step."""

    def __init__(self, dry_run: bool, dtype: torch.dtype, budget_s: float, backends: list[str] | None = None):
        self.dry, self.dtype, self.budget_s = dry_run, dtype, budget_s
        self.backends = backends  # None: every available backend
        self.device = "cpu" if dry_run else "cuda"
        self.t0 = time.perf_counter()
        self.results: dict = {"phases": {}}
        self.failures: list[str] = []
        self.engines: dict[str, looplm.Engine] = {}
        self.sizes = {  # name -> (config, new tokens of a decode measurement)
            "random-1.4b": (SHAPES["random-1.4b"], 64),
            "random-2.6b": (SHAPES["random-2.6b"], 64),
        } if not dry_run else {
            "tiny-2l": (LoopConfig(num_hidden_layers=2, **TINY), 8),
            "tiny-4l": (LoopConfig(num_hidden_layers=4, **TINY), 8),
        }
        self.main = next(iter(self.sizes))

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @contextmanager
    def phase(self, name: str):
        """Yields the phase's result dict (or None when over budget: skip); records an exception as a failure."""
        if self.elapsed() > self.budget_s:
            self.results["phases"][name] = {"skipped": f"over the {self.budget_s:.0f} s budget at {self.elapsed():.0f} s"}
            print(f"[{name}] skipped: over budget", flush=True)
            yield None
            return
        out = self.results["phases"][name] = {}
        t = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            yield out
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"
            out["traceback"] = traceback.format_exc(limit=6)
            self.failures.append(f"{name}: {out['error']}")
            print(out["traceback"], file=sys.stderr, flush=True)
        out["seconds"] = time.perf_counter() - t
        print(f"[{name}] {out['seconds']:.1f} s", flush=True)

    def check(self, out: dict, name: str, ok: bool, detail: str) -> None:
        out.setdefault("checks", {})[name] = {"ok": bool(ok), "detail": detail}
        if not ok:
            self.failures.append(f"{name}: {detail}")

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def _prompts(vocab: int, n: int, seed: int = 0, length: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (length + i % 5,), generator=g).tolist() for i in range(n)]


def environment(run: Run) -> dict:
    """The device, the software, and which optional attention backends are absent (and why)."""
    info = {
        "device": torch.cuda.get_device_name(0) if run.device == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "dry_run": run.dry, "dtype": str(run.dtype).removeprefix("torch."), "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "backends_available": kernels.available_backends(run.device),
        "backends_absent": {n: kernels.unavailable_reason(n, run.device) for n in kernels.BACKENDS if kernels.unavailable_reason(n, run.device)},
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # absent, or installed without a usable backend
        info["triton"] = f"unavailable ({type(e).__name__})"
    if run.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = p.total_memory / 2**30
    return info


def write_checkpoints(run: Run, root: Path, out: dict) -> None:
    for name, (cfg, _) in run.sizes.items():
        t = time.perf_counter()
        path = write_random_checkpoint(cfg, root / name, device=run.device)
        written = time.perf_counter() - t
        t = time.perf_counter()
        engine = looplm.load(path, dtype=run.dtype, device=run.device)
        run.sync()
        run.engines[name] = engine
        out[name] = {"write_s": written, "load_s": time.perf_counter() - t, "params": sum(p.numel() for p in engine.model.parameters()),
                     "gib": sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30}


def _attention_inputs(run: Run, n, hq, hkv, s, skv, d, q_pos):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(n, hq, s, d, generator=g)
    k, v = torch.randn(n, hkv, skv, d, generator=g), torch.randn(n, hkv, skv, d, generator=g)
    to = dict(dtype=run.dtype, device=run.device)
    return q.to(**to), k.to(**to), v.to(**to), torch.tensor(q_pos, device=run.device).view(n, s), torch.arange(skv, device=run.device).expand(n, -1)


def check_backends(run: Run, out: dict) -> None:
    cfg = run.engines[run.main].config
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    cases = {"prefill": (2, 16, 16, [list(range(16))] * 2), "decode": (3, 1, 40, [[5], [17], [39]])}
    engine = run.engines[run.main]
    ids = torch.tensor(_prompts(cfg.vocab_size, 1)[:1], device=run.device)
    prompt = ids[0].tolist()
    with torch.inference_mode():
        kernels.use(engine, "reference")
        ref_logits = engine.model.per_loop_logits(ids).float()
        ref_tokens = engine.generate(prompt, max_new_tokens=16, stop=[]).tokens
    out["reference_tokens"] = ref_tokens
    for name in kernels.available_backends(run.device):
        if run.backends is not None and name not in run.backends:
            out[name] = {"skipped": "not in --backends"}
            continue
        fn, res = kernels.get_backend(name, run.device), {}
        for case, (n, s, skv, q_pos) in cases.items():
            q, k, v, qp, kp = _attention_inputs(run, n, hq, hkv, s, skv, d, q_pos)
            want = kernels.reference_attention(q.float(), k.float(), v.float(), qp, kp)
            err = float((fn(q, k, v, qp, kp).float() - want).abs().max())
            res[f"{case}_max_abs_err"] = err
            run.check(res, f"{name} {case} attention", err <= ATTN_TOL[run.dtype], f"max |err| {err:.2e} (tolerance {ATTN_TOL[run.dtype]:g})")
        with torch.inference_mode():
            kernels.use(engine, name)
            logits = engine.model.per_loop_logits(ids).float()
            rel = ((logits - ref_logits).flatten(1).norm(dim=-1) / ref_logits.flatten(1).norm(dim=-1)).tolist()
            tokens = engine.generate(prompt, max_new_tokens=16, stop=[]).tokens
        res["per_loop_logits_rel_err"] = rel
        tol = LOGITS_TOL[run.dtype]
        run.check(res, f"{name} per-loop logits", max(rel) <= tol, f"per-loop relative error {max(rel):.2e} (tolerance {tol:g})")
        res["decode_token_agreement"] = sum(a == b for a, b in zip(tokens, ref_tokens)) / len(ref_tokens)
        out[name] = res
    kernels.use(engine, "auto")
    out["paged_reads"] = "not checked by this command"


def device_bandwidth(run: Run) -> dict:
    """Bytes/s of a (1, K) x (N, K)^T matvec of the run's dtype and of a device-to-device copy, best of 10."""
    nbytes = (2 * 2**30) if run.device == "cuda" else 64 * 2**20
    k = 8192
    el = torch.empty((), dtype=run.dtype).element_size()
    w = torch.randn(nbytes // (k * el), k, device=run.device, dtype=run.dtype)
    x = torch.randn(1, k, device=run.device, dtype=run.dtype)
    src, dst = torch.empty(nbytes, dtype=torch.uint8, device=run.device), torch.empty(nbytes, dtype=torch.uint8, device=run.device)

    def best(fn) -> float:
        fn()
        run.sync()
        times = []
        for _ in range(10):
            t = time.perf_counter()
            fn()
            run.sync()
            times.append(time.perf_counter() - t)
        return min(times)

    mv = w.numel() * el / best(lambda: F.linear(x, w))
    copy = 2 * nbytes / best(lambda: dst.copy_(src))  # read + write
    del w, src, dst
    return {"matvec_bytes_per_s": mv, "copy_bytes_per_s": copy, "matrix_bytes": nbytes}


def _decode(run: Run, engine, prompt, new_tokens, **options):
    """(tokens, decode tokens/s over the steps after the first) of one greedy batch-1 call, after a warm-up call."""
    engine.generate(prompt, max_new_tokens=new_tokens, stop=[], **options)
    run.sync()
    gen = engine.generate(prompt, max_new_tokens=new_tokens, stop=[], **options)
    ms = sum(s.latency_ms for s in gen.steps[1:])
    return list(gen.tokens), (len(gen.tokens) - 1) / (ms / 1e3)


def measure_decode(run: Run, out: dict) -> None:
    """Eager batch-1 decode of every model against the device's bandwidth bound."""
    bw = out["bandwidth"] = device_bandwidth(run)
    for name, (cfg, new_tokens) in run.sizes.items():
        if run.elapsed() > run.budget_s:
            out[name] = {"skipped": "over budget"}
            continue
        engine = run.engines[name]
        prompt = _prompts(cfg.vocab_size, 1, seed=1)[0]
        acc = bytes_per_token(engine.model, list(range(len(prompt), len(prompt) + new_tokens - 1)))
        bound = bw["matvec_bytes_per_s"] / acc["total"]
        tokens, tps = _decode(run, engine, prompt, new_tokens)
        out[name] = {"bytes_per_token": acc, "bound_tokens_per_s": bound, "prompt": prompt,
                     "eager": {"tokens_per_s": tps, "fraction_of_bound": tps / bound, "tokens": tokens}}


def check_compiled_step(run: Run, out: dict) -> None:
    """The main model's fixed-shape step (compiled on a GPU, uncompiled in a dry run) == eager, and its speed.

    Last phase: compiling the whole step takes long, and nothing else waits for it.
    """
    step = "compiled" if run.device == "cuda" else "fixed"
    eager = run.results["phases"].get("decode vs bandwidth", {}).get(run.main, {})
    if "eager" not in eager:
        raise RuntimeError("the eager decode of the main model did not run")
    new_tokens = run.sizes[run.main][1]
    tokens, tps = _decode(run, run.engines[run.main], eager["prompt"], new_tokens, step=step)
    out.update(model=run.main, step=step, tokens_per_s=tps, fraction_of_bound=tps / eager["bound_tokens_per_s"],
               speedup_over_eager=tps / eager["eager"]["tokens_per_s"], tokens=tokens)
    run.check(out, f"{run.main} {step} step == eager", tokens == eager["eager"]["tokens"], _agreement(tokens, eager["eager"]["tokens"]))


def _agreement(got: list[int], want: list[int]) -> str:
    if got == want:
        return f"{len(want)} tokens equal"
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"first difference at token {first} of {len(want)}"


def check_speculative(run: Run, out: dict) -> None:
    engine = run.engines[run.main]
    T = engine.model.num_loops
    mlp = engine.model.model.layers[0].mlp
    passes = [0]
    hook = mlp.register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))  # one call per weight pass
    try:
        new_tokens = run.sizes[run.main][1]
        prompt = _prompts(engine.config.vocab_size, 1, seed=2)[0]
        cases = {"full": {"mode": "full"}, "speculative k=1 g=4": {"mode": "speculative", "draft_loop": 1, "draft_len": 4}}
        if T % 2 == 0:
            cases["speculative k=2 pipelined"] = {"mode": "speculative", "draft_loop": 2, "pipeline": True}
        full = None
        for label, options in cases.items():
            engine.generate(prompt, max_new_tokens=new_tokens, stop=[], **options)  # warm-up
            run.sync()
            passes[0] = 0
            t = time.perf_counter()
            gen = engine.generate(prompt, max_new_tokens=new_tokens, stop=[], **options)
            run.sync()
            seconds = time.perf_counter() - t
            res = out[label] = {"tokens_per_s": new_tokens / seconds, "weight_passes_per_token": passes[0] / new_tokens,
                                "acceptance_rate": gen.stats.get("acceptance_rate"), "tokens": list(gen.tokens)}
            if full is None:
                full = res
                continue
            res["speedup_over_full"] = res["tokens_per_s"] / full["tokens_per_s"]
            run.check(res, f"{label} == full depth", res["tokens"] == full["tokens"], _agreement(res["tokens"], full["tokens"]))
    finally:
        hook.remove()


def measure_throughput(run: Run, out: dict) -> None:
    engine = run.engines[run.main]
    batches = (1, 2, 4, 8, 16, 32, 64) if run.device == "cuda" else (1, 2, 4)
    new_tokens = 32 if run.device == "cuda" else 4
    for b in batches:
        if run.elapsed() > run.budget_s:
            out[str(b)] = {"skipped": "over budget"}
            continue
        prompts = _prompts(engine.config.vocab_size, b, seed=3)
        engine.generate(prompts, max_new_tokens=2, stop=[])
        run.sync()
        t = time.perf_counter()
        gens = engine.generate(prompts, max_new_tokens=new_tokens, stop=[])
        run.sync()
        seconds = time.perf_counter() - t
        out[str(b)] = {"tokens_per_s": sum(len(g.tokens) for g in gens) / seconds, "new_tokens_per_request": new_tokens, "seconds": seconds}


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def render_section(data: dict) -> list[str]:
    """The RESULTS.md section of a results-gpu.json."""
    env, ph = data["environment"], data["phases"]
    title = "GPU" if not env["dry_run"] else "GPU command dry run (CPU, tiny shapes)"
    lines = [f"## {title}: {env['device']}", "",
             f"- `python -m benchmarks.gpu{' --dry-run' if env['dry_run'] else ''}`, {env['date_utc']}, {data['seconds']:.0f} s; "
             f"{env['dtype']}; torch {env['torch']} (CUDA {env['cuda']}), Triton {env['triton']}, Python {env['python']}.",
             f"- Attention backends available: {', '.join(env['backends_available'])}; absent: "
             + ("; ".join(f"{n} ({why})" for n, why in env["backends_absent"].items()) or "none") + ".",
             f"- Checks: {'all passed' if not data['failures'] else 'FAILED: ' + '; '.join(data['failures'])}.", ""]
    for name, res in ph.items():
        if "skipped" in res or "error" in res:
            lines.append(f"- {name}: {res.get('skipped') or 'error: ' + res['error']}")
    dec = ph.get("decode vs bandwidth", {})
    if "bandwidth" in dec:
        bw = dec["bandwidth"]
        lines += ["", f"Batch-1 full-depth decode against the bound (matvec {bw['matvec_bytes_per_s'] / 1e9:.0f} GB/s, "
                  f"copy {bw['copy_bytes_per_s'] / 1e9:.0f} GB/s read + write):", "",
                  "| model | bytes/token | bound tok/s | step | tok/s | of bound |", "|---|---|---|---|---|---|"]
        for name, res in dec.items():
            if isinstance(res, dict) and "eager" in res:
                r = res["eager"]
                lines.append(f"| {name} | {_size(res['bytes_per_token']['total'])} | {res['bound_tokens_per_s']:.1f} | eager | "
                             f"{r['tokens_per_s']:.1f} | {100 * r['fraction_of_bound']:.0f}% |")
        cs = ph.get("compiled step", {})
        if "tokens_per_s" in cs:
            lines.append(f"| {cs['model']} | | | {cs['step']} | {cs['tokens_per_s']:.1f} | {100 * cs['fraction_of_bound']:.0f}% |")
    spec = {k: v for k, v in ph.get("speculative", {}).items() if isinstance(v, dict) and "tokens_per_s" in v}
    if spec:
        lines += ["", "| decoder | tok/s | x full | weight passes/token | acceptance |", "|---|---|---|---|---|"]
        for label, r in spec.items():
            acc = r.get("acceptance_rate")
            lines.append(f"| {label} | {r['tokens_per_s']:.1f} | {r.get('speedup_over_full', 1.0):.2f} | {r['weight_passes_per_token']:.2f} | "
                         f"{'–' if acc is None else f'{acc:.2f}'} |")
    thr = {k: v for k, v in ph.get("throughput", {}).items() if isinstance(v, dict) and "tokens_per_s" in v}
    if thr:
        lines += ["", "Throughput (batch of prompts to `Engine.generate`): "
                  + ", ".join(f"{b} requests {r['tokens_per_s']:.0f} tok/s" for b, r in thr.items()) + "."]
    checks = [(n, c) for res in ph.values() for part in ([res] + [v for v in res.values() if isinstance(v, dict)]) for n, c in part.get("checks", {}).items()]
    if checks:
        lines += ["", "Checks:", ""] + [f"- {'ok' if c['ok'] else 'FAILED'}: {n}: {c['detail']}" for n, c in checks]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (float32): the logic without a GPU")
    ap.add_argument("--out", type=Path, default=HERE, help="where results-gpu.json and RESULTS-gpu.md go (default benchmarks/)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None, help="default: bfloat16 on a GPU, float32 in a dry run")
    ap.add_argument("--backends", default=None, help="comma-separated attention backends to check (default: every available one)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="phases that would start later than this are skipped (default 420)")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(f"benchmarks.gpu: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              "this command validates a GPU. Use --dry-run to run its logic on the CPU.", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype or ("float32" if args.dry_run else "bfloat16"))
    run = Run(args.dry_run, dtype, args.budget_s, args.backends.split(",") if args.backends else None)
    run.results["environment"] = environment(run)
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every phase: a run cut short (a timeout) still leaves its results
        run.results.update(seconds=run.elapsed(), failures=run.failures)
        (args.out / "results-gpu.json").write_text(json.dumps(run.results, indent=1) + "\n")
        (args.out / "RESULTS-gpu.md").write_text("\n".join(render_section(run.results)))

    root = Path(tempfile.mkdtemp(prefix="looplm-gpu-"))
    try:
        with run.phase("checkpoints") as out:
            if out is not None:
                write_checkpoints(run, root, out)
        save()
        if run.main in run.engines:
            for name, fn in (("attention backends", check_backends), ("decode vs bandwidth", measure_decode), ("speculative", check_speculative),
                             ("throughput", measure_throughput), ("compiled step", check_compiled_step)):
                with run.phase(name) as out:
                    if out is not None:
                        fn(run, out)
                save()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    save()
    print("\n".join(render_section(run.results)))
    print(f"wrote {args.out / 'results-gpu.json'} and {args.out / 'RESULTS-gpu.md'}")
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
