"""Each package brings its own `metamorph` commands through its entry point: core `plugins`,
`generate`, `merge-lora`; train `train`, `cache-features`; toy `demo`. Checked on the installed
distributions' metadata, each plugin registered alone (as if only it and core were installed).
`make check-wheels` checks the same in fresh environments built from the wheels."""

from __future__ import annotations

import importlib.metadata as md

import pytest

from metamorph_core.plugins.registry import Registry

OWN_COMMANDS = {
    "metamorph-core": {"plugins", "generate", "merge-lora"},
    "metamorph-train": {"train", "cache-features", "convert-research", "export", "data"},
    "metamorph-toy": {"demo"},
    "metamorph-eval": {"eval"},
    "metamorph-serve": {"serve"},
    "metamorph-encoders": set(),
    "metamorph-decoders": set(),
}


@pytest.mark.parametrize("distribution", sorted(OWN_COMMANDS))
def test_each_distribution_registers_its_own_commands(distribution):
    eps = [ep for ep in md.distribution(distribution).entry_points if ep.group == "metamorph"]
    assert len(eps) == 1, eps
    registry = Registry(load_entry_points=False)
    registry.register_plugin(eps[0].load(), name=eps[0].name, distribution=distribution)
    assert set(registry.names("command")) == OWN_COMMANDS[distribution]
    assert not registry.failures


def test_the_metamorph_script_belongs_to_core():
    scripts = {
        ep.name: (dist.metadata["Name"], ep.value)
        for dist in md.distributions()
        for ep in dist.entry_points
        if ep.group == "console_scripts" and ep.name == "metamorph"
    }
    assert scripts == {"metamorph": ("metamorph-core", "metamorph_core.cli:main")}
