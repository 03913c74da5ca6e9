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
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
LIBRARIES = ("torch", "transformers", "diffusers", "metamorph-core")


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


class _OtherLoad:
    """Cores kept busy by other processes between :meth:`start` and :meth:`stop` (Linux)."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start: tuple[float, int, int] | None = None

    @staticmethod
    def _ticks() -> tuple[int, int] | None:
        """(busy ticks of the whole machine, ticks of this process) or ``None``."""
        try:
            cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal [guest guest_nice, inside user/nice]
        busy = sum(cpu[:8]) - cpu[3] - cpu[4]
        return busy, int(own[11]) + int(own[12])  # utime + stime, all threads

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
    ) -> None:
        self.name, self.command = name, command
        self.max_other_cores, self.retries = max_other_cores, retries
        self.quiet_wait_s = quiet_wait_s
        self.results: list[Result] = []

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
        }
        json_path, md_path = directory / f"{self.name}.json", directory / f"{self.name}.md"
        json_path.write_text(json.dumps(data, indent=2) + "\n")
        md_path.write_text(self.markdown(info))
        return json_path, md_path

    def markdown(self, info: dict[str, Any]) -> str:
        libs = ", ".join(f"{k} {info[k]}" for k in LIBRARIES if info.get(k))
        where = info.get("gpu") or f"{info['cpu']}, {info['cores']} cores"
        lines = [
            f"Command: `{self.command}`; {info['date']}; {where}, {info.get('torch_threads')} "
            f"torch threads; Python {info['python']}, {libs}.",
            "",
            "| benchmark | median | runs | figures | speed-up | busy other cores (max) |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.results:
            figures = ", ".join(f"{v:,.1f} {k}" for k, v in r.figures.items())
            speedup = f"{r.speedup:.2f}x vs {r.baseline}" if r.speedup is not None else ""
            known = [x for x in r.other_cores if x is not None]
            other = f"{max(known):.2f}" if known else "?"
            if r.discarded:
                other += f" ({_runs(r.discarded)} redone)"
            lines.append(
                f"| {r.name} | {_seconds(r.median_s)} | {len(r.runs)} | {figures} | {speedup} "
                f"| {other} |"
            )
        return "\n".join(lines) + "\n"


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _seconds(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def _line(r: Result) -> str:
    figures = ", ".join(f"{v:,.1f} {k}" for k, v in r.figures.items())
    speedup = f", {r.speedup:.2f}x vs {r.baseline}" if r.speedup is not None else ""
    known = [x for x in r.other_cores if x is not None]
    other = f"; others busy <= {max(known):.2f} cores" if known else ""
    redone = f", {_runs(r.discarded)} redone" if r.discarded else ""
    return (
        f"{r.name:<38} median {_seconds(r.median_s):>9} ({_runs(len(r.runs))}{redone}) "
        f"{figures}{speedup}{other}"
    )
