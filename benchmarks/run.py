"""Run every benchmark script here (``bench_*.py``) in turn, each with its defaults; each
writes ``results/<suite>.json`` and ``results/<suite>.md`` for BENCHMARKS.md.

    make bench      # or: .venv/bin/python benchmarks/run.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> int:
    for script in sorted(Path(__file__).parent.glob("bench_*.py")):
        print(f"== {script.name}", flush=True)
        subprocess.run([sys.executable, str(script)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
