"""Hugging Face Hub ids: loading a checkpoint from a pre-populated local Hub cache offline
(revision, cache_dir, errors), push_to_hub against a fake client, and the model card."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import yaml

from metamorph_core import MetaMorphModel
from metamorph_core.errors import CheckpointError
from metamorph_core.model_card import ModelCardData
from metamorph_core.testing import populate_hub_cache, tiny_model_config
from metamorph_core.testing.samples import generation, understanding

CARD = {
    "license": "apache-2.0",
    "tags": ["toy-world"],
    "training": {"objective": {"name": "vpit", "policy": "full"}, "steps": 3, "lr": 0.001},
    "data": [{"path": "data/train.jsonl", "weight": 1.0}],
    "metrics": {"held/text_loss": 1.25},
}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def nudged(model: MetaMorphModel) -> MetaMorphModel:
    """``model`` with different projector weights (another 'training run')."""
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(0.5)
    return model


def front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture
def saved(make_model, tmp_path):
    """A tiny model and its checkpoint directory."""
    model = make_model().eval()
    return model, model.save_pretrained(tmp_path / "saved")


def test_hub_id_loads_offline_from_the_cache(saved, hub_cache):
    model, path = saved
    populate_hub_cache(hub_cache, "org/tiny", path)
    loaded = MetaMorphModel.from_pretrained("org/tiny").eval()
    assert same_weights(model, loaded)
    batch = model.prepare_batch([understanding(), generation()])
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, loaded(**batch).loss)


def test_revision_picks_a_branch_or_tag(make_model, hub_cache, tmp_path):
    first, second = make_model(), nudged(make_model())
    populate_hub_cache(hub_cache, "org/tiny", first.save_pretrained(tmp_path / "first"))
    v2 = second.save_pretrained(tmp_path / "second")
    populate_hub_cache(hub_cache, "org/tiny", v2, revision="v2")
    assert same_weights(first, MetaMorphModel.from_pretrained("org/tiny"))
    assert same_weights(second, MetaMorphModel.from_pretrained("org/tiny", revision="v2"))
    assert not same_weights(first, second)


def test_cache_dir_is_where_the_snapshot_is_read(saved, hub_cache, tmp_path):
    model, path = saved
    elsewhere = tmp_path / "other-cache"
    populate_hub_cache(elsewhere, "org/tiny", path, symlinks=False)
    assert same_weights(model, MetaMorphModel.from_pretrained("org/tiny", cache_dir=elsewhere))
    with pytest.raises(CheckpointError, match="holds no complete snapshot"):
        MetaMorphModel.from_pretrained("org/tiny")  # not in the default cache


def test_missing_repo_or_revision_offline_names_the_repo_and_the_fix(saved, hub_cache):
    _, path = saved
    populate_hub_cache(hub_cache, "org/tiny", path)
    with pytest.raises(CheckpointError) as e:
        MetaMorphModel.from_pretrained("org/missing")
    message = str(e.value)
    assert "checkpoint 'org/missing'" in message and str(hub_cache) in message
    assert "hf download org/missing" in message and "cache_dir=" in message
    with pytest.raises(CheckpointError, match="org/tiny.*at revision 'nope'"):
        MetaMorphModel.from_pretrained("org/tiny", revision="nope")


def test_a_local_path_that_does_not_exist_says_where_it_looked(hub_cache, tmp_path, monkeypatch):
    """'runs/ckpt' is spelled like a repo id: the error says which local directory is missing
    (relative to the working directory) before the Hub advice."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as e:
        MetaMorphModel.from_pretrained("runs/ckpt")
    assert f"no local directory '{tmp_path / 'runs' / 'ckpt'}'" in str(e.value)
    assert "if it is a local path, check it" in str(e.value)
    with pytest.raises(CheckpointError, match="not a Hugging Face Hub repo id either"):
        MetaMorphModel.from_pretrained("./runs/ckpt")


def test_without_huggingface_hub_a_hub_id_asks_for_the_extra(saved, monkeypatch):
    model, path = saved
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'metamorph-core\[hub\]'"):
        MetaMorphModel.from_pretrained("org/tiny")
    assert same_weights(model, MetaMorphModel.from_pretrained(path))  # paths need no Hub client


def test_an_existing_local_path_wins_over_a_hub_id(make_model, hub_cache, tmp_path, monkeypatch):
    local = make_model()
    hub = nudged(make_model())
    populate_hub_cache(hub_cache, "org/tiny", hub.save_pretrained(tmp_path / "hub-copy"))
    monkeypatch.chdir(tmp_path)
    local.save_pretrained(Path("org") / "tiny")
    assert same_weights(local, MetaMorphModel.from_pretrained("org/tiny"))


class FakeHfApi:
    """Records what ``push_to_hub`` asks of the Hub client; copies the uploaded folder (a
    temporary directory, gone after the call)."""

    calls: list[tuple[str, dict]] = []
    uploaded: Path

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))
        shutil.copytree(kw["folder_path"], FakeHfApi.uploaded)
        return "commit-info"


def test_push_to_hub_uploads_the_checkpoint_in_one_commit(make_model, tmp_path, monkeypatch):
    FakeHfApi.calls = []
    FakeHfApi.uploaded = tmp_path / "uploaded"
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    model = make_model()
    out = model.push_to_hub("org/tiny", private=True, revision="exp", card_data=CARD)
    assert out == "commit-info"
    calls = dict(FakeHfApi.calls)
    assert calls["create_repo"]["repo_id"] == "org/tiny" and calls["create_repo"]["private"]
    assert calls["create_branch"]["branch"] == "exp"
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "org/tiny" and upload["revision"] == "exp"
    assert {"backbone/*", "*.safetensors"} <= set(upload["delete_patterns"])
    files = {p.name for p in FakeHfApi.uploaded.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "backbone"} <= files
    # the card's usage example loads the repo it was pushed to
    assert 'from_pretrained("org/tiny")' in (FakeHfApi.uploaded / "README.md").read_text()
    assert same_weights(model, MetaMorphModel.from_pretrained(FakeHfApi.uploaded))


def test_model_card_front_matter_and_sections(make_model, hub_cache, backbone_dirs, tmp_path):
    bare = make_model().save_pretrained(tmp_path / "bare")
    meta = front_matter(bare / "README.md")
    assert meta["library_name"] == "metamorph" and "metamorph" in meta["tags"]
    assert "license" not in meta and "base_model" not in meta  # a local backbone, no license
    text = (bare / "README.md").read_text()
    for kind, name in (("encoder", "tiny-patch"), ("backbone", "hf-causal-lm"), ("head", "mlp")):
        assert f"| {kind} | `{name}` |" in text
    assert "## Training" not in text and "## Metrics" not in text

    populate_hub_cache(hub_cache, "org/base", backbone_dirs["llama"])
    torch.manual_seed(0)
    config = tiny_model_config(backbone_dirs["llama"])
    config.backbone.kwargs.update(pretrained="org/base", revision="main", cache_dir=str(hub_cache))
    model = MetaMorphModel.from_config(config)
    path = model.save_pretrained(tmp_path / "card", card_data=CARD)
    meta = front_matter(path / "README.md")
    assert meta["base_model"] == "org/base" and meta["license"] == "apache-2.0"
    assert "toy-world" in meta["tags"]
    text = (path / "README.md").read_text()
    assert "`org/base` (revision `main`)" in text
    assert str(hub_cache) not in text  # where this machine caches it is not the model's
    assert "| objective.policy | full |" in text and "| steps | 3 |" in text
    assert "## Data\n\n- `data/train.jsonl` (weight 1.0)" in text
    assert "| held/text_loss | 1.25 |" in text
    first = (path / "README.md").read_bytes()
    model.save_pretrained(path, card_data=CARD)
    assert (path / "README.md").read_bytes() == first  # deterministic: no dates, no hosts
    loaded = MetaMorphModel.from_pretrained(path)
    assert loaded.card_data == ModelCardData.of(CARD)
    again = loaded.save_pretrained(tmp_path / "again")  # the card data travels on
    assert json.loads((again / "config.json").read_text())["card_data"] == CARD


def test_model_card_licence_from_the_components(make_model, tmp_path):
    model = make_model()
    for kind in model.present_kinds():
        getattr(model, kind).license = "mit"
    assert front_matter(model.save_pretrained(tmp_path / "a") / "README.md")["license"] == "mit"
    model.backbone.license = "llama3.1"
    path = model.save_pretrained(tmp_path / "b")
    assert front_matter(path / "README.md")["license"] == "other"
    assert "backbone: llama3.1" in (path / "README.md").read_text()


def test_unknown_model_card_field_is_an_error(make_model, tmp_path):
    with pytest.raises(ValueError, match=r"unknown model card fields \['licence'\]; known"):
        make_model().save_pretrained(tmp_path / "x", card_data={"licence": "mit"})
    assert not (tmp_path / "x").exists()


def test_card_fields_of_a_newer_writer_are_ignored_on_loading(make_model, tmp_path, caplog):
    path = make_model().save_pretrained(tmp_path / "x", card_data={"title": "mine"})
    meta = json.loads((path / "config.json").read_text())
    meta["card_data"]["evaluation_results"] = [{"task": "later"}]
    (path / "config.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="metamorph"):
        loaded = MetaMorphModel.from_pretrained(path)
    assert loaded.card_data.title == "mine"
    assert "['evaluation_results'] are not known here" in caplog.text
