"""Loading a damaged or unloadable checkpoint is a CheckpointError that names the checkpoint,
the file (relative and absolute) and the fix: each file a saved checkpoint holds is corrupted
in turn (truncated, header overwritten, invalid JSON, deleted); a component that is not
installed names the package; a newer format says to upgrade."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from metamorph_core import MetaMorphModel, create
from metamorph_core.errors import CheckpointError
from metamorph_core.plugins import registry
from metamorph_core.plugins.first_party import PROVIDED_BY
from metamorph_core.plugins.registry import get_registry, reset_registry
from metamorph_core.saving import FORMAT_VERSION
from metamorph_core.testing import populate_hub_cache, tiny_model_config

FIX = "save or download the checkpoint again"
# the files every checkpoint has; one with a decoder has these too
PLAIN_FILES = {
    "config.json",
    "model.safetensors",
    "README.md",
    "backbone/config.json",
    "backbone/model.safetensors",
    "backbone/tokenizer.json",
    "backbone/tokenizer_config.json",
}
DECODER_FILES = {
    "decoder/config.json",
    "decoder/adapter.safetensors",
    "decoder/unet/config.json",
    "decoder/unet/diffusion_pytorch_model.safetensors",
    "decoder/scheduler/scheduler_config.json",
}
NEVER_READ = {"README.md"}  # the model card


def _tiny_model(backbone_dir: Path) -> MetaMorphModel:
    torch.manual_seed(0)
    return MetaMorphModel.from_config(tiny_model_config(backbone_dir))


@pytest.fixture(scope="module")
def plain_checkpoint(backbone_dirs, tmp_path_factory) -> Path:
    model = _tiny_model(backbone_dirs["llama"])
    return model.save_pretrained(tmp_path_factory.mktemp("plain") / "ckpt")


@pytest.fixture(scope="module")
def decoder_checkpoint(backbone_dirs, tmp_path_factory) -> Path:
    decoders = pytest.importorskip("metamorph_decoders.testing")
    model = _tiny_model(backbone_dirs["llama"])
    model.attach_decoder(decoders.tiny_decoder(model))
    return model.save_pretrained(tmp_path_factory.mktemp("decoder") / "ckpt")


@pytest.fixture(params=["plain", "decoder"])
def checkpoint(request, tmp_path) -> Path:
    """A copy, free to damage, of a saved tiny checkpoint (without and with a decoder)."""
    saved = request.getfixturevalue(f"{request.param}_checkpoint")
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def files_of(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def error_of(path: Path | str) -> str:
    """The message of the error loading ``path`` raises; other exceptions are marked."""
    try:
        MetaMorphModel.from_pretrained(path)
    except CheckpointError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - reported as the wrong kind of error
        return f"<not a CheckpointError: {type(e).__name__}: {e}>"
    return "<loaded>"


def edit_config(path: Path, edit: Callable[[dict], None]) -> None:
    meta = json.loads((path / "config.json").read_text())
    edit(meta)
    (path / "config.json").write_text(json.dumps(meta))


def _header_garbage(data: bytes) -> bytes:
    """The 8-byte header length kept, the JSON header after it overwritten."""
    n = int.from_bytes(data[:8], "little")
    return data[:8] + (b"#garbage" * (n // 8 + 1))[:n] + data[8 + n :]


# mode -> (the files it applies to, how it damages their bytes (None: delete), what is said)
DAMAGE = {
    "truncated": (".safetensors", lambda d: d[: len(d) // 2], "is truncated"),
    "header-garbage": (".safetensors", _header_garbage, "has a corrupt header"),
    "not-safetensors": (
        ".safetensors",
        lambda d: b"\x89PNG\r\n\x1a\n" * 4 + d[32:],
        "is not a safetensors file",
    ),
    "invalid-json": (".json", lambda d: d[: len(d) // 2], "is not valid JSON"),
    "missing": ("", None, "is missing"),
}


@pytest.mark.parametrize("mode", list(DAMAGE))
def test_each_damaged_file_is_named(checkpoint, mode):
    files = files_of(checkpoint)
    assert set(files) >= PLAIN_FILES
    if (checkpoint / "decoder").is_dir():
        assert set(files) >= DECODER_FILES
    # every other file is safetensors or JSON, which the modes above cover; a new kind of file
    # needs a mode of its own
    assert {f for f in files if not f.endswith((".json", ".safetensors"))} == NEVER_READ
    suffix, damage, said = DAMAGE[mode]
    # a checkpoint without config.json is not one: test_checkpoint.py checks that message
    targets = [f for f in files if f.endswith(suffix) and f not in NEVER_READ]
    if mode == "missing":
        targets.remove("config.json")
    wrong = {}
    for name in targets:
        file = checkpoint / name
        data = file.read_bytes()
        if damage is None:
            file.unlink()
        else:
            file.write_bytes(damage(data))
        message = error_of(checkpoint)
        file.write_bytes(data)
        expected = [f"{name} {said}", f"'{file}'", f"checkpoint '{checkpoint}'", FIX]
        if not all(part in message for part in expected):
            wrong[name] = message
    assert not wrong, json.dumps(wrong, indent=1)
    assert error_of(checkpoint) == "<loaded>"  # every file was put back


def test_files_loading_never_reads_are_not_checked(plain_checkpoint, tmp_path):
    path = Path(shutil.copytree(plain_checkpoint, tmp_path / "ckpt"))
    (path / "README.md").write_bytes(b"\x00\xff garbage")
    MetaMorphModel.from_pretrained(path)
    (path / "README.md").unlink()
    MetaMorphModel.from_pretrained(path)


def test_every_damaged_file_is_named_at_once(plain_checkpoint, tmp_path):
    path = Path(shutil.copytree(plain_checkpoint, tmp_path / "ckpt"))
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:100])
    (path / "backbone" / "tokenizer.json").write_text("")
    message = error_of(path)
    assert "2 files are missing or damaged" in message
    assert "model.safetensors is truncated: 100 bytes, but its header" in message
    assert "backbone/tokenizer.json is empty" in message
    assert "restore them from a good copy" in message


def test_a_missing_folder_is_named_once(plain_checkpoint, tmp_path):
    path = Path(shutil.copytree(plain_checkpoint, tmp_path / "ckpt"))
    shutil.rmtree(path / "backbone")
    message = error_of(path)
    assert f"backbone folder is missing ('{path / 'backbone'}')" in message
    assert "backbone/config.json" not in message


def test_a_git_lfs_pointer_says_to_fetch_the_file(plain_checkpoint, tmp_path):
    path = Path(shutil.copytree(plain_checkpoint, tmp_path / "ckpt"))
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:0123abcd\nsize 158936\n"
    (path / "backbone" / "model.safetensors").write_text(pointer)
    message = error_of(path)
    assert "backbone/model.safetensors is a Git LFS pointer" in message
    assert "git lfs pull" in message


def test_a_hub_snapshot_missing_a_blob_names_the_file(plain_checkpoint, hub_cache):
    populate_hub_cache(hub_cache, "org/tiny", plain_checkpoint)
    snapshot = next((hub_cache / "models--org--tiny" / "snapshots").iterdir())
    (snapshot / "backbone" / "model.safetensors").resolve().unlink()  # the blob
    message = error_of("org/tiny")
    assert "backbone/model.safetensors is a link to" in message
    assert "which does not exist" in message and FIX in message


# -- components that are not installed ----------------------------------------------------


@pytest.fixture
def core_plugins_only(monkeypatch):
    """Call it to narrow the registry to metamorph-core's own plugin (as if no other package
    were installed) until the test ends."""

    def narrow() -> None:
        monkeypatch.setenv("METAMORPH_LOAD_PLUGINS", "core")
        reset_registry()

    yield narrow
    reset_registry()


def test_an_unknown_component_names_the_field_and_the_known_names(plain_checkpoint, tmp_path):
    path = Path(shutil.copytree(plain_checkpoint, tmp_path / "ckpt"))
    edit_config(path, lambda m: m["components"]["encoder"].update(name="not-installed-encoder"))
    message = error_of(path)
    assert f"checkpoint '{path}' needs the encoder 'not-installed-encoder'" in message
    assert "(config.json: components.encoder.name)" in message
    assert re.search(r"Known encoders: .*tiny-patch", message)
    assert "Install the plugin that provides it" in message


@pytest.mark.parametrize("installed", [True, False])
@pytest.mark.parametrize(
    ("which", "kind", "name", "package"),
    [
        ("plain", "encoder", "siglip", "metamorph-encoders"),
        ("decoder", "decoder", "sd-unet", "metamorph-decoders"),
    ],
)
def test_a_component_of_a_package_not_installed_names_the_package(
    request, tmp_path, monkeypatch, core_plugins_only, installed, which, kind, name, package
):
    path = Path(shutil.copytree(request.getfixturevalue(f"{which}_checkpoint"), tmp_path / "c"))
    core_plugins_only()  # after saving: the decoder checkpoint needs sd-unet to be saved
    if kind == "encoder":
        edit_config(path, lambda m: m["components"]["encoder"].update(name=name))
    monkeypatch.setattr(registry, "_installed", lambda distribution: installed)
    message = error_of(path)
    assert f"checkpoint '{path}' needs the {kind} '{name}'" in message
    assert f"(config.json: components.{kind}.name)" in message
    assert f"'{name}' comes with the {package} package" in message
    if installed:
        assert "installed but was not loaded: METAMORPH_LOAD_PLUGINS='core' limits" in message
    else:
        assert f"which is not installed (pip install {package})" in message


def test_the_first_party_table_lists_what_those_packages_register():
    """PROVIDED_BY lists, for each kind it names, every component that the repository's own
    packages (those installed here) register."""
    packages = Path(__file__).resolve().parents[2]
    ours = {
        re.search(r'(?m)^name = "(.+)"', p.read_text()).group(1)
        for p in packages.glob("*/pyproject.toml")
    } - {"metamorph-core"}
    kinds = {kind for kind, _ in PROVIDED_BY}
    registered = {
        (e.kind, e.name): e.distribution
        for e in get_registry().entries()
        if e.kind in kinds and e.distribution in ours
    }
    if not registered:
        pytest.skip("none of the packages that PROVIDED_BY names is installed")
    installed = set(registered.values())
    assert registered == {k: d for k, d in PROVIDED_BY.items() if d in installed}
    assert set(PROVIDED_BY.values()) <= ours


# -- format versions ----------------------------------------------------------------------


def test_a_newer_format_says_to_upgrade(plain_checkpoint, tmp_path):
    path = Path(shutil.copytree(plain_checkpoint, tmp_path / "ckpt"))
    newer = FORMAT_VERSION + 1

    def edit(meta):
        meta.update(format_version=newer, library_version="9.9.9")

    edit_config(path, edit)
    message = error_of(path)
    assert f"checkpoint '{path}' is format v{newer}, written by metamorph-core 9.9.9;" in message
    assert f"reads format v{FORMAT_VERSION}: upgrade it (pip install -U metamorph-core)" in message


def test_a_newer_writer_of_the_same_format_says_to_upgrade(plain_checkpoint, tmp_path):
    path = Path(shutil.copytree(plain_checkpoint, tmp_path / "ckpt"))

    def edit(meta):
        meta["model"]["a_future_setting"] = 1
        meta["library_version"] = "9.9.9"

    edit_config(path, edit)
    message = error_of(path)
    written = "(written by metamorph-core 9.9.9: upgrade, pip install -U metamorph-core)"
    assert f"checkpoint '{path}' {written}: the 'model' section of its config.json" in message
    assert "does not fit this metamorph-core" in message and "a_future_setting" in message


@pytest.mark.parametrize("version", [0, "1", None])
def test_an_unknown_format_version_says_what_it_is(plain_checkpoint, tmp_path, version):
    path = Path(shutil.copytree(plain_checkpoint, tmp_path / "ckpt"))
    edit_config(path, lambda m: m.update(format_version=version))
    message = error_of(path)
    assert f"config.json has format_version {version!r}, not a version that" in message
    assert FIX in message


def test_a_component_folder_is_not_a_checkpoint(plain_checkpoint):
    message = error_of(plain_checkpoint / "backbone")
    assert "is not a MetaMorph checkpoint" in message
    assert "a transformers model (model_type 'llama')" in message
    assert "load its parent" in message


def test_a_checkpoint_missing_a_field_says_which(plain_checkpoint, tmp_path):
    path = Path(shutil.copytree(plain_checkpoint, tmp_path / "ckpt"))
    edit_config(path, lambda m: m.pop("components"))
    assert "config.json lacks ['components']" in error_of(path)


# -- a decoder directory loaded on its own ------------------------------------------------


def test_a_saved_decoder_names_its_missing_or_damaged_files(decoder_checkpoint, tmp_path):
    path = Path(shutil.copytree(decoder_checkpoint / "decoder", tmp_path / "decoder"))
    (path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"decoder '.*': config.json is not valid JSON"):
        create("decoder", "sd-unet", pretrained=path)
    shutil.copy(decoder_checkpoint / "decoder" / "config.json", path / "config.json")
    (path / "adapter.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        create("decoder", "sd-unet", pretrained=path)
    assert f"adapter.safetensors is missing ('{path / 'adapter.safetensors'}')" in str(e.value)
    assert "save or download the decoder again" in str(e.value)
