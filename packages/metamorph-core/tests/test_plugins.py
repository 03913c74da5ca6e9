"""Plugin rules (docs/architecture.md), exercised through real entry-point discovery: each test
distribution below is a dist-info folder on sys.path, as pip would install it."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from metamorph_core import MetaMorphModel, hookimpl
from metamorph_core.errors import (
    ComponentNotFoundError,
    DuplicateComponentError,
    PluginLoadError,
    ShapeMismatchError,
)
from metamorph_core.plugins.registry import create, get_registry, reset_registry
from metamorph_core.testing import tiny_model_config
from metamorph_core.testing.samples import generation

THIRD_PARTY = """
import torch
from torch import nn
from metamorph_core import hookimpl
from metamorph_core.interfaces import Projector

class ScaledLinear(Projector):
    def __init__(self, in_dim, out_dim, scale=2.0):
        super().__init__()
        self.in_dim, self.out_dim, self.scale = in_dim, out_dim, scale
        self.proj = nn.Linear(in_dim, out_dim)
    def forward(self, x):
        return self.proj(x) * self.scale

@hookimpl
def register_projectors(register):
    register("scaled-linear", ScaledLinear, description="a third-party projector")
"""


def make_distribution(site: Path, dist: str, module: str, source: str, ep_name: str) -> None:
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[metamorph]\n{ep_name} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("METAMORPH_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("METAMORPH_LOAD_PLUGINS", raising=False)
    reset_registry()
    yield site
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", "") or "").startswith(str(site)):
            del sys.modules[name]
    importlib.invalidate_caches()
    reset_registry()


def test_first_party_components_come_through_the_entry_point_group(site):
    entries = {(e.kind, e.name): e.distribution for e in get_registry().entries()}
    for key in [
        ("encoder", "tiny-patch"),
        ("backbone", "hf-causal-lm"),
        ("projector", "mlp{depth}x_gelu"),
        ("head", "mlp"),
        ("loss", "cosine"),
        ("template", "llama3"),
    ]:
        assert entries[key] == "metamorph-core"


def test_third_party_component_by_name_without_editing_our_source(site, backbone_dirs):
    make_distribution(site, "mm-thirdparty", "mm_thirdparty", THIRD_PARTY, "thirdparty")
    entry, _ = get_registry().get("projector", "scaled-linear")
    assert entry.distribution == "mm-thirdparty"
    cfg = tiny_model_config(
        backbone_dirs["llama"], projector={"name": "scaled-linear", "kwargs": {"scale": 3.0}}
    )
    model = MetaMorphModel.from_config(cfg)
    assert type(model.projector).__name__ == "ScaledLinear" and model.projector.scale == 3.0
    out = model(**model.prepare_batch([generation()]))
    out.loss.backward()
    assert model.projector.proj.weight.grad is not None
    # and `metamorph plugins --json` lists it, in a fresh process
    env = {**os.environ, "PYTHONPATH": str(site)}
    res = subprocess.run(
        [sys.executable, "-m", "metamorph_core.cli", "plugins", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    rows = json.loads(res.stdout)
    assert {
        "kind": "projector",
        "name": "scaled-linear",
        "distribution": "mm-thirdparty",
    }.items() <= next(r for r in rows if r["name"] == "scaled-linear").items()
    assert all({"kind", "name", "distribution"} <= set(r) for r in rows)


def test_broken_plugin_is_reported_and_skipped(site, monkeypatch):
    make_distribution(
        site, "mm-broken", "mm_broken", "raise ImportError('needs libfoo')\n", "broken"
    )
    make_distribution(site, "mm-thirdparty", "mm_thirdparty", THIRD_PARTY, "thirdparty")
    with pytest.warns(
        RuntimeWarning,
        match=r"plugin 'broken' \(distribution 'mm-broken'\) was skipped.*needs libfoo",
    ):
        registry = get_registry()
        registry.entries()
    assert [(f.plugin, f.distribution) for f in registry.failures] == [("broken", "mm-broken")]
    assert (
        create("projector", "scaled-linear", in_dim=2, out_dim=3).out_dim == 3
    )  # others still work
    reset_registry()
    monkeypatch.setenv("METAMORPH_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="mm-broken.*needs libfoo.*METAMORPH_STRICT_PLUGINS"):
        get_registry().entries()
    with pytest.raises(PluginLoadError):  # and on every later use, never a half-loaded registry
        create("encoder", "tiny-patch")


def test_plugin_failing_during_registration_or_validation_is_rolled_back(site):
    registry = get_registry()

    class Raises:
        @hookimpl
        def register_heads(self, register):
            register("half-done", lambda **kw: None)
            raise RuntimeError("oops")

    class BadSignature:
        @hookimpl
        def register_heads(self, reg):  # the spec's argument is `register`
            pass

    with pytest.warns(RuntimeWarning, match="'raiser'.*registration raised RuntimeError: oops"):
        registry.register_plugin(Raises(), name="raiser", distribution="dist-a")
    with pytest.warns(RuntimeWarning, match="'bad-sig'"):
        registry.register_plugin(BadSignature(), name="bad-sig", distribution="dist-b")
    assert "half-done" not in registry.names("head")
    assert {f.plugin for f in registry.failures} == {"raiser", "bad-sig"}


def test_plugin_api_version_is_checked(site):
    class Future:
        METAMORPH_PLUGIN_API = 99

        @hookimpl
        def register_heads(self, register):
            register("from-the-future", lambda **kw: None)

    with pytest.warns(RuntimeWarning, match="targets plugin API 99"):
        get_registry().register_plugin(Future(), name="future", distribution="dist-f")
    assert "from-the-future" not in get_registry().names("head")


def test_load_plugins_environment_filter(site, monkeypatch):
    make_distribution(site, "mm-thirdparty", "mm_thirdparty", THIRD_PARTY, "thirdparty")
    monkeypatch.setenv("METAMORPH_LOAD_PLUGINS", "core")
    assert "scaled-linear" not in get_registry().names("projector")
    assert "tiny-patch" in get_registry().names("encoder")
    reset_registry()
    monkeypatch.setenv("METAMORPH_LOAD_PLUGINS", "")
    with pytest.raises(
        ComponentNotFoundError, match="Known encoders: none.*METAMORPH_LOAD_PLUGINS='' limits"
    ):
        create("encoder", "tiny-patch")


def test_duplicates_name_both_distributions(site):
    make_distribution(
        site,
        "mm-copycat",
        "mm_copycat",
        """
        from metamorph_core import hookimpl
        @hookimpl
        def register_encoders(register):
            register("tiny-patch", lambda **kw: None)
    """,
        "copycat",
    )
    with pytest.raises(
        DuplicateComponentError,
        match="encoder 'tiny-patch' is registered twice: by distribution 'metamorph-core'.*'mm-copycat'",
    ):
        get_registry().entries()
    with pytest.raises(DuplicateComponentError):  # the conflict is reported on every use
        create("encoder", "tiny-patch")


def test_duplicate_via_alias_or_pattern_and_programmatic_registration(site):
    registry = get_registry()

    class Alias:
        @hookimpl
        def register_backbones(self, register):
            register("my-lm", lambda **kw: None, aliases=("qwen2",))

    class Pattern:
        @hookimpl
        def register_heads(self, register):
            register("mlp7x_gelu", lambda **kw: None)

    with pytest.raises(DuplicateComponentError, match="'qwen2'.*'metamorph-core'.*'their-dist'"):
        registry.register_plugin(Alias(), name="alias", distribution="their-dist")

    class OverlappingPattern:
        @hookimpl
        def register_heads(self, register):
            register("mlp{layers}x_gelu", lambda **kw: None)

    class StringAliases:
        @hookimpl
        def register_heads(self, register):
            register("my-head", lambda **kw: None, aliases="myhead")

    with pytest.raises(DuplicateComponentError, match="'mlp7x_gelu'"):
        registry.register_plugin(Pattern(), name="pattern", distribution="their-dist")
    with pytest.raises(DuplicateComponentError, match=r"'mlp\{layers\}x_gelu'.*'metamorph-core'"):
        registry.register_plugin(OverlappingPattern(), name="overlap", distribution="their-dist")
    with pytest.warns(
        RuntimeWarning, match=r"aliases must be a list or tuple.*aliases=\('myhead',\)"
    ):
        registry.register_plugin(StringAliases(), name="str-alias", distribution="their-dist")
    assert "my-lm" not in registry.names("backbone") and "my-head" not in registry.names("head")


def test_unknown_names_list_the_known_ones(site):
    with pytest.raises(
        ComponentNotFoundError,
        match=r"unknown projector 'mlp_huge'. Known projectors: linear, mlp\{depth\}x_gelu",
    ):
        create("projector", "mlp_huge")
    with pytest.raises(
        ComponentNotFoundError, match=r"hf-causal-lm \(aliases: llama, qwen2, qwen3\)"
    ):
        create("backbone", "gpt-7")
    with pytest.raises(ValueError, match="unknown component kind 'widget'"):
        create("widget", "x")


def test_named_depths_build_the_papers_layer_stacks(site):
    proj = create("projector", "mlp3x_gelu", in_dim=4, out_dim=8)
    assert [type(m).__name__ for m in proj.net] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    head = create("head", "mlp2x_gelu", in_dim=8, out_dim=4)  # three linears
    assert [type(m).__name__ for m in head.net] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert head.net[-1].out_features == 4
    assert [type(m).__name__ for m in create("head", "mlp", in_dim=8, out_dim=4).net] == [
        "Linear",
        "GELU",
        "Linear",
    ]
    out = head(torch.randn(5, 8))
    assert torch.allclose(out.norm(dim=-1), torch.ones(5), atol=1e-5)
    with pytest.raises(ValueError, match="fixes depth=2 but depth=3"):
        create("head", "mlp2x_gelu", in_dim=8, out_dim=4, depth=3)


def test_mismatched_components_name_both_and_both_numbers(site, backbone_dirs):
    cfg = tiny_model_config(
        backbone_dirs["llama"], projector={"name": "linear", "kwargs": {"in_dim": 48}}
    )
    with pytest.raises(
        ShapeMismatchError,
        match="encoder 'tiny-patch' gives 24-d tokens but projector 'linear' was built for 48-d",
    ):
        MetaMorphModel.from_config(cfg)
    cfg = tiny_model_config(backbone_dirs["llama"], head={"name": "mlp", "kwargs": {"in_dim": 16}})
    with pytest.raises(
        ShapeMismatchError,
        match="head 'mlp' reads 16-d states but backbone 'hf-causal-lm' has hidden size 32",
    ):
        MetaMorphModel.from_config(cfg)


def test_cli_help_imports_no_torch():
    code = (
        "import sys\nfrom metamorph_core.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "main(['plugins'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "plugins" in res.stdout and "tiny-patch" in res.stdout


COMMANDS = """
from metamorph_core import hookimpl

def configure(parser):
    parser.add_argument("--times", type=int, default=1)
    return lambda args: print("hello " * args.times) or 0

@hookimpl
def register_commands(register):
    register("hello", "mm_cmd:configure", description="say hello")
    register("ghost", "mm_cmd_missing:configure", description="points nowhere")
"""


def _metamorph(site, *args, env=None):
    base = {k: v for k, v in os.environ.items() if not k.startswith("METAMORPH_")}
    env = {**base, "PYTHONPATH": str(site), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "metamorph_core.cli", *args],
        capture_output=True,
        text=True,
        env=env,
    )


def test_a_third_party_command_joins_metamorph(site):
    make_distribution(site, "mm-cmd", "mm_cmd", COMMANDS, "cmd")
    res = _metamorph(site, "--help")
    assert res.returncode == 0, res.stderr
    assert "hello" in res.stdout and "say hello [mm-cmd]" in res.stdout
    assert "generate" in res.stdout and "[metamorph-core]" in res.stdout
    res = _metamorph(site, "hello", "--times", "2")
    assert res.returncode == 0 and res.stdout.strip() == "hello hello"
    # a command whose module is missing fails alone, naming its distribution
    res = _metamorph(site, "ghost")
    assert res.returncode == 2
    assert "'mm_cmd_missing:configure', which cannot be imported" in res.stderr
    assert "mm-cmd" in res.stderr
    assert _metamorph(site, "plugins").returncode == 0


def test_a_broken_command_plugin_is_reported_and_skipped(site):
    make_distribution(
        site, "mm-broken", "mm_broken", "raise ImportError('needs libfoo')\n", "broken"
    )
    res = _metamorph(site, "--help")
    assert res.returncode == 0
    assert "skipped plugin 'broken' (mm-broken)" in res.stderr and "needs libfoo" in res.stderr
    assert "generate" in res.stdout  # the other commands are all there
    strict = _metamorph(site, "--help", env={"METAMORPH_STRICT_PLUGINS": "1"})
    assert strict.returncode == 2 and "mm-broken" in strict.stderr


def test_only_cores_commands_without_the_other_packages(site):
    """With core's entry point alone (as when only metamorph-core is installed), `metamorph`
    has core's commands and names the package that brings a missing first-party one."""
    res = _metamorph(site, "plugins", "--json", env={"METAMORPH_LOAD_PLUGINS": "core"})
    commands = {r["name"] for r in json.loads(res.stdout) if r["kind"] == "command"}
    assert commands == {"plugins", "generate", "merge-lora"}
    res = _metamorph(site, "train", "r.yaml", env={"METAMORPH_LOAD_PLUGINS": "core"})
    assert res.returncode == 2
    assert "'train' comes with the metamorph-train package" in res.stderr
