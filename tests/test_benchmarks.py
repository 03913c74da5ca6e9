"""`benchmarks/run.py --smoke`: every benchmark script, the GPU suite included (on the CPU),
runs its code path on tiny shapes (the comparisons' equality checks included) and writes its
results, so `make bench` and the GPU suite cannot rot between the sessions that run them. No
timing is asserted: the smoke figures mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = (
    "decoder",
    "generation",
    "startup",
    "training",
    "eval",
    "loader",
    "checkpoint",
    "gpu-smoke",
)


def test_every_benchmark_runs_on_tiny_shapes(tmp_path):
    before = (ROOT / "BENCHMARKS.md").read_text()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--no-wait"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (out,) = tmp_path.glob("metamorph-bench-smoke-*")
    for suite in SUITES:
        data = json.loads((out / f"{suite}.json").read_text())
        assert data["results"] or data["values"], suite
        assert all(r["median_s"] > 0 for r in data["results"]), suite
    assert (ROOT / "BENCHMARKS.md").read_text() == before  # a smoke run records nothing
