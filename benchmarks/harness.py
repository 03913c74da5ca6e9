"""The benchmark harness: one way to time, one results format.

A :class:`Suite` times :class:`Case` s (warm-up runs, then repeated runs; the median counts),
turns counts into rates (``{"visual tokens": 64}`` -> ``visual tokens/s``), relates each case
to a baseline measured in the same process (``speed-up = baseline median / median``) and
writes ``results/<suite>.json`` and ``results/<suite>.md`` (a table for BENCHMARKS.md), both
with the command, the machine and the library versions.

Our CPU machines are shared, and two busy threads slow down many times over when another
process takes a core. So cases compared with each other run interleaved (A B A B ...), and on
Linux every timed run records how many cores *other* processes kept busy meanwhile
(``/proc/stat`` less this process). Before each run the harness waits (up to ``quiet_wait_s``)
for the others to fall below ``max_other_cores``; a run above it is thrown away and run again
(at most ``retries`` times, then kept and flagged). Tests never assert timings; this is where
speed is recorded.

Besides timed cases a suite holds *values* (figures not timed by the harness: a peak memory
measured in a subprocess, a start-up check) and *notes* (one line per target: what was
compared, the figure, met or missed), rendered under the table. Every script shares the
command-line options of :func:`add_common_arguments` (``--repeats``, ``--smoke`` for a fast
run of the code path on tiny shapes, ``--no-wait``, ``--out``); ``METAMORPH_BENCH_NO_WAIT=1``
turns the quiet-wait off as ``--no-wait`` does (development on a busy machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
#: processes whose work counts as the benchmark's own, not as other load (a server the
#: benchmark started and drives; remove a pid once it has exited)
OWN_PIDS: set[int] = set()
LIBRARIES = ("torch", "transformers", "diffusers", "peft", "metamorph-core")
NO_WAIT_ENV = "METAMORPH_BENCH_NO_WAIT"


@dataclass
class Case:
    """Something to time: ``fn`` does one run; ``counts`` (unit -> how many one run makes)
    become per-second figures."""

    name: str
    fn: Callable[[], Any]
    config: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)


@dataclass
class Result:
    """One timed case. ``runs``: seconds of each kept run; ``other_cores``: cores other
    processes kept busy during each (``None`` where unknown); ``discarded``: runs thrown away
    for that; ``figures``: rates (unit -> per second at the median); ``speedup``:
    ``baseline``'s median over this median."""

    name: str
    config: dict[str, Any]
    median_s: float
    runs: list[float]
    other_cores: list[float | None]
    discarded: int
    figures: dict[str, float] = field(default_factory=dict)
    baseline: str | None = None
    speedup: float | None = None


@dataclass
class Value:
    """A figure the harness did not time itself (a peak memory from a subprocess, a measured
    start-up): ``figures`` unit -> value, as in :class:`Result`."""

    name: str
    config: dict[str, Any]
    figures: dict[str, float]


class _OtherLoad:
    """Cores kept busy by other processes between :meth:`start` and :meth:`stop` (Linux)."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start: tuple[float, int, int] | None = None

    @staticmethod
    def _ticks() -> tuple[int, int] | None:
        """(busy ticks of the whole machine, ticks of this process and its waited-for
        children) or ``None``."""
        try:
            cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            helpers = [
                Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                for pid in sorted(OWN_PIDS)
            ]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal [guest guest_nice, inside user/nice]
        busy = sum(cpu[:8]) - cpu[3] - cpu[4]
        # utime + stime (all threads) + cutime + cstime: a case that runs a subprocess and
        # waits for it (the start-up benchmark) counts the child as its own work; so does a
        # process the benchmark runs beside itself (a server it drives, in OWN_PIDS)
        helper_ticks = sum(int(x) for h in helpers for x in h[11:13])
        return busy, sum(int(x) for x in own[11:15]) + helper_ticks

    def start(self) -> None:
        ticks = self._ticks()
        self._start = (time.perf_counter(), *ticks) if ticks else None

    def stop(self) -> float | None:
        ticks = self._ticks()
        if self._start is None or ticks is None:
            return None
        t0, busy0, own0 = self._start
        seconds = time.perf_counter() - t0
        return max(0.0, (ticks[0] - busy0) - (ticks[1] - own0)) / self.tick / seconds

    def wait_quiet(self, max_cores: float, timeout_s: float, window_s: float = 2.0) -> None:
        """Return once other processes kept at most ``max_cores`` busy for ``window_s``, or
        after ``timeout_s``."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            self.start()
            time.sleep(window_s)
            other = self.stop()
            if other is None or other <= max_cores:
                return


def _cuda_sync() -> Callable[[], None]:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.synchronize
    return lambda: None


def machine() -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, accelerator, Python and library versions, date."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }
    for lib in LIBRARIES:
        try:
            info[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            info[lib] = None
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Suite:
    """Results of one benchmark script, written together.

    ``max_other_cores``: each timed run waits up to ``quiet_wait_s`` for other processes to
    keep at most this many cores busy; a run during which they kept more busy is run again, up
    to ``retries`` times.
    """

    def __init__(
        self,
        name: str,
        command: str,
        max_other_cores: float = 0.2,
        retries: int = 3,
        quiet_wait_s: float = 300.0,
        wait: bool = True,
    ) -> None:
        self.name, self.command = name, command
        if not wait or os.environ.get(NO_WAIT_ENV, "") not in ("", "0"):
            quiet_wait_s, retries = 0.0, 0  # runs are still loaded-checked and the load shown
        self.max_other_cores, self.retries = max_other_cores, retries
        self.quiet_wait_s = quiet_wait_s
        self.results: list[Result] = []
        self.values: list[Value] = []
        self.notes: list[str] = []

    def measure(
        self, *cases: Case, baseline: str | None = None, warmup: int = 1, repeats: int = 5
    ) -> list[Result]:
        """Time ``cases``: ``warmup`` untimed rounds, then ``repeats`` rounds, each running
        every case once in turn. Each case after the first is compared with the first;
        ``baseline`` (an earlier result's name) compares the first one too."""
        sync, load = _cuda_sync(), _OtherLoad()
        for _ in range(warmup):
            for case in cases:
                case.fn()
        runs: list[list[float]] = [[] for _ in cases]
        others: list[list[float | None]] = [[] for _ in cases]
        discarded = [0] * len(cases)
        for _ in range(repeats):
            for k, case in enumerate(cases):
                for attempt in range(self.retries + 1):
                    if self.quiet_wait_s > 0:
                        load.wait_quiet(self.max_other_cores, self.quiet_wait_s)
                    sync()
                    load.start()
                    start = time.perf_counter()
                    case.fn()
                    sync()
                    seconds, other = time.perf_counter() - start, load.stop()
                    if other is None or other <= self.max_other_cores or attempt == self.retries:
                        break
                    discarded[k] += 1
                runs[k].append(seconds)
                others[k].append(other)
        results = []
        for k, case in enumerate(cases):
            median = statistics.median(runs[k])
            base = baseline if k == 0 else cases[0].name
            result = Result(
                case.name,
                case.config,
                median,
                runs[k],
                others[k],
                discarded[k],
                {f"{unit}/s": n / median for unit, n in case.counts.items()},
                base,
                self.get(base).median_s / median if base is not None else None,
            )
            self.results.append(result)
            results.append(result)
            print(_line(result), flush=True)
        return results

    def record(
        self, name: str, figures: dict[str, float], config: dict[str, Any] | None = None
    ) -> Value:
        """Keep a figure measured outside :meth:`measure` (shown in a second table)."""
        value = Value(name, config or {}, figures)
        self.values.append(value)
        print(f"{name:<38} " + _figures(figures), flush=True)
        return value

    def note(self, text: str) -> None:
        """A line shown under the tables (a target: the figure and whether it is met)."""
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def target(self, what: str, met: bool, detail: str) -> bool:
        """Note a target as met or missed; returns ``met``."""
        self.note(f"{what}: {detail} ({'met' if met else 'MISSED'})")
        return met

    def merge(self, path: Path) -> None:
        """Add the results, values and notes of a suite another process wrote to ``path``
        (a ``<suite>.json``), e.g. a configuration run in its own process."""
        data = json.loads(Path(path).read_text())
        self.results += [Result(**r) for r in data.get("results", [])]
        self.values += [Value(**v) for v in data.get("values", [])]
        self.notes += data.get("notes", [])

    def get(self, name: str) -> Result:
        for r in self.results:
            if r.name == name:
                return r
        known = ", ".join(r.name for r in self.results) or "none yet"
        raise KeyError(f"no result named '{name}' in suite '{self.name}' (known: {known})")

    def write(self, directory: Path = RESULTS) -> tuple[Path, Path]:
        """Write ``<name>.json`` and ``<name>.md``; returns both paths."""
        directory.mkdir(parents=True, exist_ok=True)
        info = machine()
        data = {
            "suite": self.name,
            "command": self.command,
            "machine": info,
            "max_other_cores": self.max_other_cores,
            "results": [asdict(r) for r in self.results],
            "values": [asdict(v) for v in self.values],
            "notes": self.notes,
        }
        json_path, md_path = directory / f"{self.name}.json", directory / f"{self.name}.md"
        json_path.write_text(json.dumps(data, indent=2) + "\n")
        md_path.write_text(self.markdown(info))
        return json_path, md_path

    def markdown(self, info: dict[str, Any]) -> str:
        libs = ", ".join(f"{k} {info[k]}" for k in LIBRARIES if info.get(k))
        where = info.get("gpu") or f"{info['cpu']}, {info['cores']} cores"
        if info.get("torch_threads"):
            where += f", {info['torch_threads']} torch threads"
        lines = [
            f"Command: `{self.command}`; {info['date']}; {where}; Python {info['python']}, {libs}."
        ]
        if self.results:
            lines += self._results_table()
        if self.values:
            lines += ["", "| measurement | figures |", "|---|---|"]
            lines += [f"| {v.name} | {_figures(v.figures)} |" for v in self.values]
        if self.notes:
            lines.append("")
            lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def _results_table(self) -> list[str]:
        lines = [
            "",
            "| benchmark | median | runs | figures | speed-up | busy other cores (max) |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.results:
            figures = _figures(r.figures)
            speedup = f"{r.speedup:.2f}x vs {r.baseline}" if r.speedup is not None else ""
            known = [x for x in r.other_cores if x is not None]
            other = f"{max(known):.2f}" if known else "?"
            if r.discarded:
                other += f" ({_runs(r.discarded)} redone)"
            lines.append(
                f"| {r.name} | {_seconds(r.median_s)} | {len(r.runs)} | {figures} | {speedup} "
                f"| {other} |"
            )
        return lines


def _figures(figures: dict[str, float]) -> str:
    return ", ".join(f"{_number(v)} {k}" for k, v in figures.items())


def _number(v: float) -> str:
    if isinstance(v, bool) or not isinstance(v, float) or not math.isfinite(v):
        return str(v)
    return f"{v:,.1f}" if abs(v) >= 1 else f"{v:.3g}"


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _seconds(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def _line(r: Result) -> str:
    parts = [_figures(r.figures)] if r.figures else []
    if r.speedup is not None:
        parts.append(f"{r.speedup:.2f}x vs {r.baseline}")
    known = [x for x in r.other_cores if x is not None]
    other = f"; others busy <= {max(known):.2f} cores" if known else ""
    redone = f", {_runs(r.discarded)} redone" if r.discarded else ""
    return (
        f"{r.name:<38} median {_seconds(r.median_s):>9} ({_runs(len(r.runs))}{redone}) "
        f"{', '.join(parts)}{other}"
    )


# -- shared by the scripts -------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser, repeats: int = 3) -> None:
    """The options every benchmark script takes."""
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs per case")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes and one run per case: checks the code path in seconds; the figures "
        "mean nothing (results go to a temporary directory unless --out is given)",
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help=f"do not wait for a quiet machine nor redo loaded runs (also {NO_WAIT_ENV}=1)",
    )
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )


def apply_threads(args: argparse.Namespace) -> None:
    """``--threads``: set torch's CPU thread count (recorded with the machine)."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def results_dir(args: argparse.Namespace) -> Path:
    """``--out``, else ``results/`` (a temporary directory under ``--smoke``)."""
    if args.out is not None:
        return Path(args.out)
    if args.smoke:
        import tempfile

        return Path(tempfile.mkdtemp(prefix="metamorph-bench-smoke-"))
    return RESULTS


def command_line(script: str) -> str:
    """How this run was started, for the tables (``python benchmarks/<script> ARGS``)."""
    return " ".join([f"python benchmarks/{script}", *sys.argv[1:]])


def run_json_subprocess(
    args: list[str], timeout_s: float | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python ARGS`` in a fresh process and return the JSON object printed on the last
    line of its stdout (a process's peak memory only grows, so each configuration whose peak
    is measured runs in its own). Its stderr passes through."""
    done = subprocess.run(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {done.returncode}")
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{' '.join(args)} printed nothing")
    return json.loads(lines[-1])


def peak_memory() -> dict[str, float]:
    """This process's peak resident memory (``ru_maxrss``: since it started), the peak since
    the last :func:`reset_peak_memory` (Linux ``VmHWM``) and, once CUDA is in use, the peak of
    tensors allocated on the current GPU since the last reset, in MiB."""
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    out = {"MiB peak RSS": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20}
    hwm = _status_mib("VmHWM")
    if hwm is not None:
        out["MiB peak RSS since reset"] = hwm
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["MiB peak CUDA allocated"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def reset_peak_memory() -> bool:
    """Restart the peaks :func:`peak_memory` reports "since reset" at the current usage (the
    RSS high-water mark through ``/proc/self/clear_refs``, Linux; CUDA's peak stats). Returns
    whether the RSS mark could be reset."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def current_rss_mib() -> float | None:
    """Resident memory now (Linux ``/proc/self/status``), in MiB."""
    return _status_mib("VmRSS")


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None
