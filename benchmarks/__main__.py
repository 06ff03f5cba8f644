"""`python -m benchmarks [--device cpu|cuda] [--quick] [--render-only] [-- pytest args]`.

Runs `pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results.json` (on CUDA:
results-cuda.json, so GPU results sit beside the CPU ones), then renders benchmarks/RESULTS.md
and its PNG plots from every results JSON present.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from . import report

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer new tokens and rounds")
    ap.add_argument("--checkpoint", default=None, help="benchmark this Ouro checkpoint in place of the bundled default model")
    ap.add_argument("--render-only", action="store_true", help="only re-render RESULTS.md from the existing JSON")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --), e.g. -- -k speculative")
    args = ap.parse_args(argv)

    json_path = HERE / ("results.json" if args.device == "cpu" else f"results-{args.device}.json")
    rc = 0
    if not args.render_only:
        cmd = [
            sys.executable, "-m", "pytest", str(HERE), "--benchmark-only", f"--benchmark-json={json_path}",
            f"--bench-device={args.device}", "-p", "no:cacheprovider", "-q", "-rs",
        ]
        if args.quick:
            cmd.append("--bench-quick")
        if args.checkpoint:
            cmd.append(f"--bench-checkpoint={args.checkpoint}")
        cmd += args.pytest_args
        # the same settings as environment variables, for the benchmark files that read those
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "passive"), "LOOPLM_BENCH_DEVICE": args.device}
        if args.quick:
            env["LOOPLM_BENCH_QUICK"] = "1"
        if args.checkpoint:
            for var in ("LOOPLM_BENCH_CHECKPOINT", "LOOPLM_BENCH_DEFAULT", "ANYTIME_BENCH_CHECKPOINT", "LOOPLM_SPEC_CHECKPOINT"):
                env[var] = args.checkpoint
        print("+", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=HERE.parent, env=env)
        if not json_path.is_file():
            print(f"pytest wrote no {json_path}; nothing to render", file=sys.stderr)
            return rc or 1
    out = report.render()
    print(f"wrote {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
