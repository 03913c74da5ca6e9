"""Run every benchmark script here (``bench_*.py``) in turn, each with its defaults (and
``gpu.py`` when a CUDA device is present); each writes ``results/<suite>.json`` and
``results/<suite>.md``. Then collect every ``results/<suite>.json`` into ``latest.json`` and
rewrite the tables of BENCHMARKS.md between their markers::

    <!-- bench:<suite> -->
    (generated: replaced on every run)
    <!-- /bench:<suite> -->

Text outside the markers is never touched. ``--smoke`` runs every script (``gpu.py`` too, on
the CPU) on tiny shapes into a temporary directory and leaves BENCHMARKS.md and
``latest.json`` alone: a fast check that the code paths work. ``--collect`` runs nothing and
only rebuilds ``latest.json`` and the tables from ``results/``.

    make bench      # or: .venv/bin/python benchmarks/run.py [--only training,decoder]
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
DOC = HERE.parent / "BENCHMARKS.md"
LATEST = HERE / "latest.json"
RUN_SUITE = "run"  # BENCHMARKS.md block with the last run's durations


def scripts(only: set[str] | None, gpu: bool) -> list[Path]:
    found = sorted(HERE.glob("bench_*.py"))
    if gpu:
        found.append(HERE / "gpu.py")
    names = {p.stem.removeprefix("bench_"): p for p in found}
    if only:
        unknown = only - set(names)
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; known: {sorted(names)}")
        return [names[n] for n in names if n in only]
    return found


def cuda_available() -> bool:
    probe = [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"]
    out = subprocess.run(probe, stdout=subprocess.PIPE, text=True, check=False)
    return out.stdout.strip() == "True"


def replace_block(text: str, suite: str, body: str) -> tuple[str, bool]:
    """``text`` with the block of ``suite`` replaced by ``body``; whether the markers exist."""
    pattern = re.compile(
        rf"(<!-- bench:{re.escape(suite)} -->\n).*?(<!-- /bench:{re.escape(suite)} -->)", re.S
    )
    if not pattern.search(text):
        return text, False
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text), True


def collect(durations: dict[str, float], command: str) -> None:
    """``latest.json`` from every suite's JSON; BENCHMARKS.md's blocks from their tables."""
    suites = {}
    for path in sorted(RESULTS.glob("*.json")):
        suites[path.stem] = json.loads(path.read_text())
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    latest = {"generated": now, "command": command, "seconds": durations, "suites": suites}
    if not durations and LATEST.exists():  # only collecting: keep the last run's record
        previous = json.loads(LATEST.read_text())
        latest.update(command=previous.get("command", ""), seconds=previous.get("seconds", {}))
    LATEST.write_text(json.dumps(latest, indent=2) + "\n")
    text = DOC.read_text()
    missing = []
    for name in suites:
        md = RESULTS / f"{name}.md"
        if md.exists():
            text, found = replace_block(text, name, md.read_text())
            if not found:
                missing.append(name)
    if durations:  # not when only collecting
        total = sum(durations.values())
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in durations.items())
        line = f"Last run: `{command}`, {now}: {total:.0f} s in all ({parts})."
        text, found = replace_block(text, RUN_SUITE, line)
        if not found:
            missing.append(RUN_SUITE)
    DOC.write_text(text)
    print(f"wrote {LATEST} and updated {DOC.name}")
    for name in missing:
        print(f"note: BENCHMARKS.md has no <!-- bench:{name} --> block; its table is not shown")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated names (generation, training, ...)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, temporary output")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    parser.add_argument("--threads", type=int, help="torch CPU threads for every script")
    parser.add_argument(
        "--collect", action="store_true", help="run nothing: only rebuild from results/"
    )
    args = parser.parse_args()
    if args.collect:
        collect({}, "")
        return 0
    only = set(args.only.split(",")) if args.only else None
    gpu = args.smoke or cuda_available()
    out = Path(tempfile.mkdtemp(prefix="metamorph-bench-smoke-")) if args.smoke else None
    durations: dict[str, float] = {}
    for script in scripts(only, gpu):
        command = [sys.executable, str(script)]
        command += ["--smoke", "--out", str(out)] if out else []
        command += ["--no-wait"] * args.no_wait
        command += ["--threads", str(args.threads)] if args.threads else []
        print(f"== {script.name}", flush=True)
        began = time.perf_counter()
        subprocess.run(command, check=True)
        durations[script.stem.removeprefix("bench_")] = time.perf_counter() - began
        print(f"== {script.name}: {durations[script.stem.removeprefix('bench_')]:.0f} s")
    if out is not None:
        print(f"smoke run: results in {out}; BENCHMARKS.md and latest.json left as they were")
        return 0
    collect(durations, " ".join(["python benchmarks/run.py", *sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
