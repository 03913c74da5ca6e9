"""Start-up cost (issue #8, part 4): every figure is the wall time of a *fresh* Python process
(interpreter start included), runs interleaved, medians.

- ``import metamorph_core`` must be within 0.5 s of ``import torch`` alone (core loads its
  torch-backed names on first use, so the import itself should cost next to nothing), and so
  must ``from metamorph_core import MetaMorphModel`` (what building a model needs first:
  torch and the model's modules);
- ``metamorph --help`` (the installed console script) must take under 1 s and import no
  torch: a second process runs the CLI's ``main`` with ``--help`` (and ``plugins``) and
  reports which heavy libraries ended up in ``sys.modules``.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 5] [--smoke] [--no-wait]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from harness import Case, Suite, add_common_arguments, command_line, results_dir

HEAVY = ("torch", "transformers", "diffusers", "timm", "peft", "numpy", "safetensors")
IMPORT_MARGIN_S, HELP_LIMIT_S = 0.5, 1.0

# run in a fresh process: which heavy modules does the CLI load for these arguments?
_PROBE = """
import json, sys
from metamorph_core.cli import main
loaded = {}
for argv in (["--help"], ["plugins"]):
    sys.argv = ["metamorph", *argv]
    try:
        main()
    except SystemExit:
        pass
    loaded[" ".join(argv)] = sorted(m for m in %r if m in sys.modules)
print(json.dumps(loaded))
"""


def run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def cli_command() -> list[str]:
    """The installed ``metamorph`` script next to this interpreter, else ``python -m``."""
    script = Path(sys.executable).parent / "metamorph"
    return [str(script)] if script.exists() else [sys.executable, "-m", "metamorph_core.cli"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, repeats=5)
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    suite = Suite("startup", command_line("bench_startup.py"), wait=not args.no_wait)
    py = sys.executable
    cli = cli_command()
    cases = [
        Case("import torch", lambda: run([py, "-c", "import torch"])),
        Case("import metamorph_core", lambda: run([py, "-c", "import metamorph_core"])),
        Case(
            "from metamorph_core import MetaMorphModel",
            lambda: run([py, "-c", "from metamorph_core import MetaMorphModel"]),
        ),
        Case("python -c pass (interpreter alone)", lambda: run([py, "-c", "pass"])),
        Case("metamorph --help", lambda: run([*cli, "--help"]), {"command": " ".join(cli)}),
    ]
    torch_r, core_r, model_r, _, help_r = suite.measure(
        *cases, warmup=0 if args.smoke else 1, repeats=args.repeats
    )
    probe = subprocess.run(
        [py, "-c", _PROBE % (HEAVY,)], check=True, stdout=subprocess.PIPE, text=True
    )
    loaded = json.loads(probe.stdout.strip().splitlines()[-1])
    extra = core_r.median_s - torch_r.median_s
    suite.target(
        "`import metamorph_core` within 0.5 s of `import torch` alone",
        extra <= IMPORT_MARGIN_S,
        f"{core_r.median_s:.2f} s vs {torch_r.median_s:.2f} s ({extra:+.2f} s)",
    )
    extra = model_r.median_s - torch_r.median_s  # what building a model needs first
    suite.target(
        "`from metamorph_core import MetaMorphModel` within 0.5 s of `import torch` alone",
        extra <= IMPORT_MARGIN_S,
        f"{model_r.median_s:.2f} s vs {torch_r.median_s:.2f} s ({extra:+.2f} s)",
    )
    suite.target(
        "`metamorph --help` under 1 s", help_r.median_s < HELP_LIMIT_S, _s(help_r.median_s)
    )
    for argv, modules in loaded.items():
        suite.target(
            f"`metamorph {argv}` imports no torch",
            "torch" not in modules,
            f"heavy modules loaded: {', '.join(modules) or 'none'} (checked: {', '.join(HEAVY)})",
        )
    json_path, md_path = suite.write(results_dir(args))
    print(f"wrote {json_path} and {md_path}")
    return 0


def _s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


if __name__ == "__main__":
    sys.exit(main())
