"""Package boundaries: core stands alone, dependencies point one way."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _deps(package: str) -> list[str]:
    data = tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())
    return data["project"]["dependencies"]


def test_core_declares_only_its_minimal_dependencies():
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in _deps("metamorph-core")}
    assert names == {"torch", "transformers", "pluggy", "einops", "safetensors"}
    data = tomllib.loads((ROOT / "packages/metamorph-core/pyproject.toml").read_text())
    assert any(d.startswith("peft") for d in data["project"]["optional-dependencies"]["lora"])


def test_packages_declare_compatible_ranges_of_each_other():
    packages = ("encoders", "decoders", "train", "eval", "toy")
    for package in (f"metamorph-{p}" for p in packages):
        core = [d for d in _deps(package) if d.startswith("metamorph-core")]
        assert core == ["metamorph-core>=0.1,<0.2"], package
    train = _deps("metamorph-train")
    assert "metamorph-encoders>=0.1,<0.2" in train and "metamorph-decoders>=0.1,<0.2" in train
    toy = _deps("metamorph-toy")
    assert "metamorph-train>=0.1,<0.2" in toy and "metamorph-eval>=0.1,<0.2" in toy
    # eval needs only core: encoders / decoders are created by name when a metric asks
    assert not [
        d for d in _deps("metamorph-eval") if d.startswith(("metamorph-train", "metamorph-toy"))
    ]


def _modules_after(code: str, env: dict[str, str]) -> set[str]:
    probe = code + "\nprint(' '.join(sorted(sys.modules)))\n"
    res = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert res.returncode == 0, res.stderr
    return set(res.stdout.split())


def test_core_never_imports_the_other_packages_or_their_heavy_dependencies():
    code = (
        "import sys, torch\n"
        "from metamorph_core import MetaMorphModel, create, get_registry\n"
        "get_registry().entries()\n"
        "create('encoder', 'tiny-patch'); create('head', 'mlp2x_gelu', in_dim=4, out_dim=2)\n"
    )
    heavy = {"diffusers", "timm", "peft", "torchvision"}
    core_only = _modules_after(code, {"METAMORPH_LOAD_PLUGINS": "core"})
    assert not core_only & (heavy | {"metamorph_encoders", "metamorph_decoders", "metamorph_train"})
    # with every plugin installed, listing them still imports no heavy library
    assert not _modules_after(code, {}) & heavy
    for path in (ROOT / "packages/metamorph-core/src").rglob("*.py"):
        text = path.read_text()
        for other in ("metamorph_encoders", "metamorph_decoders", "metamorph_train"):
            assert f"import {other}" not in text and f"from {other}" not in text, path


def test_importing_core_is_cheap():
    code = "import sys, metamorph_core\nassert 'torch' not in sys.modules\nprint(metamorph_core.__version__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
