"""`python -m benchmarks.versus REF [--rounds 5] [--tokens 64] [--cases full,speculative,...]`:
batch-1 decoding speed of this tree against an earlier commit, side by side on this machine.

Checks out REF into a temporary git worktree and starts one Python process per tree (this one's
and REF's, each importing its own `looplm`, 1 torch thread). Both load the bundled model and
warm every case up (the compiled step compiles there); then, round after round, the two processes
take turns running the same cases: each of the 16 benchmark prompts generated alone, greedy, for
`--tokens` new tokens. A case's figure is tokens/s over the whole round; its ratio is the median
over rounds of (this tree / REF), rounds being back to back, so that load drifting between them
cancels. With the full case in the run, each other case also gets each tree's own speed-up over
full depth (median over rounds of case / full within the tree's round): the two engines' speculative
and anytime speed-ups measured on the same machine at the same time. Prints a table and writes benchmarks/versus.json (read by benchmarks.report).

Only the public API both trees share is used (`looplm.load`, `Engine.generate` with a mode and its
options), so any commit since the engine's API settled can be the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .conftest import TEXT_PROMPTS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASES = {  # name -> (mode, options)
    "full": ("full", {}),
    "compiled": ("full", {"step": "compiled"}),
    "speculative": ("speculative", {}),  # the checkpoint's recommended draft settings
    "anytime_loops2": ("anytime", {"budget_loops": 2}),
}

# runs inside each tree's process: reads a line per round, answers with that round's tokens/s per case
WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(1)
import looplm
args = json.loads(sys.argv[1])
engine = looplm.load()
prompts = [engine.encode(t) for t in args["prompts"]]

def run(mode, options):
    t0 = time.perf_counter()
    n = 0
    for p in prompts:
        g = engine.generate(p, max_new_tokens=args["tokens"], stop=[], mode=mode, **options)
        n += len(g.tokens)
    return n / (time.perf_counter() - t0)

for mode, options in args["cases"].values():
    run(mode, options)  # warm-up (compilation included)
print(json.dumps({"ready": looplm.__file__}), flush=True)
for line in sys.stdin:
    print(json.dumps({name: run(mode, options) for name, (mode, options) in args["cases"].items()}), flush=True)
"""


def _start(tree: Path, args: dict) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "passive", "PYTHONPATH": str(tree)}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(args)], cwd=tree, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    ready = json.loads(proc.stdout.readline() or "{}")
    if "ready" not in ready or not ready["ready"].startswith(str(tree)):
        proc.kill()
        raise RuntimeError(f"the worker for {tree} did not start (or imported looplm from elsewhere: {ready})")
    return proc


def _round(proc: subprocess.Popen) -> dict[str, float]:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.versus", description=__doc__.split("\n\n")[0])
    ap.add_argument("ref", help="the commit (or branch, tag) to compare this tree against")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--out", type=Path, default=HERE / "versus.json")
    args = ap.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    sha = subprocess.run(["git", "rev-parse", "--short", args.ref], cwd=ROOT, capture_output=True, text=True)
    if sha.returncode:
        ap.error(f"git cannot resolve {args.ref!r}: {sha.stderr.strip()}")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # changed tracked files, not counting the benchmark outputs a run rewrites (RESULTS.md, JSON, plots)
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = any(not (f.startswith("benchmarks/") and f.endswith((".md", ".json", ".png")))
                for f in (line[3:] for line in changed.splitlines()))
    work = {"prompts": TEXT_PROMPTS, "tokens": args.tokens, "cases": {n: CASES[n] for n in names}}
    load = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="looplm-versus-") as tmp:
        ref_tree = Path(tmp) / "ref"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(ref_tree), args.ref], cwd=ROOT, check=True)
        try:
            print(f"warming up {head} (this tree) and {sha.stdout.strip()} ...", flush=True)
            procs = {"this": _start(ROOT, work), "ref": _start(ref_tree, work)}
            rounds = []
            for i in range(args.rounds):
                pair = {side: _round(procs[side]) for side in (("this", "ref") if i % 2 == 0 else ("ref", "this"))}
                rounds.append(pair)
                print(f"round {i + 1}: " + ", ".join(f"{n} {pair['this'][n]:.1f} vs {pair['ref'][n]:.1f}" for n in names), flush=True)
            for proc in procs.values():
                proc.stdin.close()
                proc.wait(timeout=60)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=ROOT)
    result = {
        "this": head + ("-dirty" if dirty else ""), "ref": sha.stdout.strip(), "tokens": args.tokens, "prompts": len(TEXT_PROMPTS),
        "rounds": len(rounds), "load_average_start": load, "load_average_end": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cases": {
            n: {
                "this_tokens_per_s": statistics.median(r["this"][n] for r in rounds),
                "ref_tokens_per_s": statistics.median(r["ref"][n] for r in rounds),
                "ratio": statistics.median(r["this"][n] / r["ref"][n] for r in rounds),
                # within each tree: this case's tokens/s over full depth's in the same round (the
                # speculative and anytime speed-ups of each engine, measured on one machine at one time)
                **({"this_x_full": statistics.median(r["this"][n] / r["this"]["full"] for r in rounds),
                    "ref_x_full": statistics.median(r["ref"][n] / r["ref"]["full"] for r in rounds)}
                   if "full" in names and n != "full" else {}),
            }
            for n in names
        },
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'case':<16} {'this':>9} {'ref':>9} {'ratio':>6} {'this x full':>12} {'ref x full':>11}")
    for n, c in result["cases"].items():
        xf = f" {c['this_x_full']:>12.3f} {c['ref_x_full']:>11.3f}" if "this_x_full" in c else ""
        print(f"{n:<16} {c['this_tokens_per_s']:>9.1f} {c['ref_tokens_per_s']:>9.1f} {c['ratio']:>6.3f}{xf}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
