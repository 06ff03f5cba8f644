"""`python -m benchmarks.gpu`: its dry run (the GPU command's logic, tiny shapes on the CPU) and its refusal without CUDA."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry")
    # the Triton kernel runs on the CPU only interpreted (~45 s here; tests/kernels checks it): reference and sdpa
    rc = gpu.main(["--dry-run", "--out", str(out), "--backends", "reference,sdpa"])
    return rc, json.loads((out / "results-gpu.json").read_text()), (out / "RESULTS-gpu.md").read_text()


def test_dry_run_passes_every_phase(dry_run):
    rc, data, _ = dry_run
    assert data["failures"] == [] and rc == 0
    phases = data["phases"]
    assert list(phases) == ["checkpoints", "attention backends", "decode vs bandwidth", "speculative", "throughput", "compiled step"]
    assert not any("error" in p or "skipped" in p for p in phases.values())
    env = data["environment"]
    assert env["dry_run"] and env["dtype"] == "float32"
    assert {"reference", "sdpa"} <= set(env["backends_available"])
    assert set(env["backends_available"]) | set(env["backends_absent"]) == set(gpu.kernels.BACKENDS)


def test_dry_run_checks_what_it_claims(dry_run):
    _, data, _ = dry_run
    ph = data["phases"]
    assert {n for n, r in ph["attention backends"].items() if isinstance(r, dict) and "checks" in r} == {"reference", "sdpa"}
    for name in ("reference", "sdpa"):
        checks = ph["attention backends"][name]["checks"]
        assert set(checks) == {f"{name} prefill attention", f"{name} decode attention", f"{name} per-loop logits"}
        assert all(c["ok"] for c in checks.values())
    full = ph["speculative"]["full"]
    assert full["weight_passes_per_token"] == 4.0  # T = 4 loops, one weight pass each, per token
    for label in ("speculative k=1 g=4", "speculative k=2 pipelined"):
        assert ph["speculative"][label]["tokens"] == full["tokens"]
    cs = ph["compiled step"]
    assert cs["step"] == "fixed" and cs["tokens"] == ph["decode vs bandwidth"][cs["model"]]["eager"]["tokens"]
    thr = {b: r for b, r in ph["throughput"].items() if isinstance(r, dict)}
    assert list(thr) == ["1", "2", "4"] and all(r["tokens_per_s"] > 0 for r in thr.values())


def test_dry_run_accounts_bytes_per_token(dry_run):
    _, data, _ = dry_run
    dec = data["phases"]["decode vs bandwidth"]
    for name, (cfg, new_tokens) in gpu.Run(True, torch.float32, 1.0).sizes.items():
        b = dec[name]["bytes_per_token"]
        assert b["total"] == b["weights_per_loop"] * cfg.total_ut_steps + b["head"] + b["kv"]
        assert dec[name]["bound_tokens_per_s"] == pytest.approx(dec["bandwidth"]["matvec_bytes_per_s"] / b["total"])
        assert len(dec[name]["eager"]["tokens"]) == new_tokens


def test_dry_run_renders_a_section(dry_run):
    _, data, md = dry_run
    assert md.startswith(f"## GPU command dry run (CPU, tiny shapes): {data['environment']['device']}")
    assert "Checks: all passed." in md and "FAILED" not in md
    assert md.count("| tiny-") == 3  # two models eager, the main one with the fixed step


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_fails_loudly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "results-gpu.json").exists()
