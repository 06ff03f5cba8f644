"""Throughput benchmarks of every looplm decoder (pytest-benchmark), and the report they feed.

Run `python -m benchmarks [--device cpu|cuda] [--quick]`: it runs `pytest benchmarks/
--benchmark-only`, writes `benchmarks/results.json` (`results-cuda.json` on a GPU) and renders
`benchmarks/RESULTS.md` with plots. The unit-test run never collects this folder
(`testpaths = ["tests"]` in pyproject.toml).
"""

import os

# On a shared CPU, OpenMP threads that spin while waiting for work make PyTorch up to 30x slower
# (measured here: 11.7 s vs 0.36 s for the same 32-token decode with 2 threads on a loaded 2-core
# machine). This must be set before torch loads libgomp, i.e. before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
