"""Recipes and `metamorph train`: YAML + dotted overrides, unknown keys named, a run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from metamorph_core import MetaMorphModel
from metamorph_core.testing import free_port, run_torchrun, save_tiny_backbone
from metamorph_train.recipe import load_recipe

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220)}


@pytest.fixture
def project(tmp_path):
    """A user's own data: images on disk, LLaVA JSONL records, and a recipe."""
    (tmp_path / "images").mkdir()
    records = []
    for name, rgb in COLOURS.items():
        Image.fromarray(np.tile(np.array(rgb, np.uint8), (16, 16, 1))).save(
            tmp_path / "images" / f"{name}.png"
        )
        records.append(
            {
                "id": f"u-{name}",
                "image": f"{name}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is this?"},
                    {"from": "gpt", "value": name},
                ],
            }
        )
        records.append(
            {
                "id": f"g-{name}",
                "image": f"{name}.png",
                "conversations": [
                    {"from": "human", "value": f"Generate an image of the colour {name}."},
                    {"from": "gpt", "value": "Here is an image based on your request: <image>"},
                ],
            }
        )
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    backbone = save_tiny_backbone(tmp_path / "llm", "qwen2")
    recipe = {
        "objective": {"name": "vpit", "policy": "full"},
        "model": {
            "encoder": {
                "name": "tiny-patch",
                "kwargs": {"image_size": 16, "hidden_size": 24, "num_tokens": 4},
            },
            "backbone": {"name": "qwen2", "kwargs": {"pretrained": str(backbone)}},
            "template": "chatml",
        },
        "data": {
            "sources": [
                {"path": str(tmp_path / "train.jsonl"), "image_root": str(tmp_path / "images")}
            ]
        },
        "train": {"output_dir": str(tmp_path / "run"), "steps": 50, "batch_size": 6, "lr": 3e-3},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path


def test_overrides_and_unknown_keys(project):
    recipe = load_recipe(
        project / "recipe.yaml", ["train.lr=1e-4", "train.bf16=true", "data.on_error=skip"]
    )
    assert recipe.train.lr == 1e-4 and recipe.train.bf16 is True and recipe.data.on_error == "skip"
    with pytest.raises(ValueError, match=r"unknown recipe key\(s\) \['train.learning_rate'\]"):
        load_recipe(project / "recipe.yaml", ["train.learning_rate=1"])
    with pytest.raises(ValueError, match=r"unknown recipe key\(s\) \['data.sources\[0\].root'\]"):
        load_recipe(project / "recipe.yaml", ["data.sources=[{path: x, root: y}]"])
    with pytest.raises(ValueError, match="recipe key 'train.steps' = 'many' is not a int"):
        load_recipe(project / "recipe.yaml", ["train.steps=many"])
    with pytest.raises(ValueError, match="'objective.policy' = 'lora2' is not a VPiT policy"):
        load_recipe(project / "recipe.yaml", ["objective.policy=lora2"])
    with pytest.raises(ValueError, match="unknown objective 'vpit2'. Known objectives: "):
        load_recipe(project / "recipe.yaml", ["objective.name=vpit2"])
    with pytest.raises(ValueError, match=r"unknown recipe key\(s\) \['objective.pack'\]"):
        load_recipe(project / "recipe.yaml", ["objective.pack=4"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("recipe=lora", "'recipe: lora' is now 'objective': write `objective: {name: vpit, "),
        ("recipe=lm-pretrain", "write `objective: causal-lm`"),
        ("init_from=ckpt", "recipe key 'init_from' moved to objective.init_from"),
        ("lora={r: 4}", "recipe key 'lora' moved to objective.lora"),
        (
            "train.prompt_dropout=0.1",
            r"\['train.prompt_dropout'\] moved to the VPiT objective's "
            "section: objective.prompt_dropout",
        ),
        ("train.pack_to=64", "objective.pack_to"),
    ],
)
def test_keys_of_the_old_layout_name_their_new_place(project, override, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(project / "recipe.yaml", [override])


def test_a_recipe_without_an_objective_names_the_known_ones(project):
    tree = yaml.safe_load((project / "recipe.yaml").read_text())
    del tree["objective"]
    (project / "bare.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ValueError, match=r"needs an objective.*'vpit'"):
        load_recipe(project / "bare.yaml")
    tree["objective"] = "vpit"  # a bare name: the objective's defaults, still overridable
    (project / "bare.yaml").write_text(yaml.safe_dump(tree))
    recipe = load_recipe(project / "bare.yaml", ["objective.policy=projector"])
    assert recipe.objective == "vpit" and recipe.options.policy == "projector"


def test_metamorph_train_runs_a_recipe_end_to_end(project):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "metamorph_core.cli",
            "train",
            str(project / "recipe.yaml"),
            "train.steps=6",
            "train.log_every=2",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout[res.stdout.index("{") :])["summary"]
    assert summary["step"] == 6 and summary["skipped"] == {}
    model = MetaMorphModel.from_pretrained(project / "run" / "final")
    assert model.config.template.name == "chatml"
    assert len((project / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_lora_recipe_trains_saves_reloads_and_merges(project):
    run = [sys.executable, "-m", "metamorph_core.cli"]
    res = subprocess.run(
        run
        + [
            "train",
            str(project / "recipe.yaml"),
            "objective.policy=lora",
            "objective.lora={r: 16, alpha: 64}",
            "train.steps=80",
            "train.lr=1e-2",
            "train.log_every=1",
            f"train.output_dir={project / 'lora'}",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(x) for x in (project / "lora" / "metrics.jsonl").read_text().splitlines()]
    ratios = {}
    for key in ("text_loss", "visual_loss"):
        ratios[key] = sum(r[key] for r in rows[-3:]) / sum(r[key] for r in rows[:3])
    # measured: text 0.86, visual 0.02 (LoRA on a random tiny LLM learns text slowly)
    assert ratios["text_loss"] < 0.95 and ratios["visual_loss"] < 0.5, ratios
    final = project / "lora" / "final"
    assert (final / "backbone" / "adapter_model.safetensors").is_file()
    assert not (final / "backbone" / "model.safetensors").exists()  # only the adapter
    merged = project / "merged"
    res = subprocess.run(
        run + ["merge-lora", str(final), str(merged)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (merged / "backbone" / "model.safetensors").is_file()
    import torch

    from metamorph_core.testing import samples

    a, b = (
        MetaMorphModel.from_pretrained(final).eval(),
        MetaMorphModel.from_pretrained(merged).eval(),
    )
    batch = a.prepare_batch([samples.understanding(size=16), samples.generation(size=16)])
    with torch.no_grad():
        la, lb = a(**batch), b(**batch)
    assert abs(la.loss.item() - lb.loss.item()) < 1e-4
    assert torch.allclose(la.logits, lb.logits, atol=1e-4)


@pytest.mark.parametrize(
    "strategy,recipe,meta",
    [("ddp", "full", False), ("fsdp", "lora", False), ("fsdp", "full", True)],
)
def test_metamorph_train_under_torchrun(project, strategy, recipe, meta):
    """Two processes write a final checkpoint equal to one process's on the same global batch;
    under FSDP2 + LoRA it is written from gathered weights (peft cannot save shards); with
    meta-device initialisation rank 1 never loads the weights itself."""
    args = [
        f"objective.policy={recipe}",
        "objective.lora={r: 8, alpha: 16}" if recipe == "lora" else "objective.lora=null",
        "train.steps=2",
        "train.lr=1e-2",
        f"train.strategy={strategy}",
        f"train.meta_init={str(meta).lower()}",
    ]
    res = run_torchrun(
        *("-m", "metamorph_core.cli", "train", project / "recipe.yaml", *args),
        *("train.batch_size=2", f"train.output_dir={project / 'two'}"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = (project / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1  # rank 0 alone writes metrics (logged at the last step)
    _matches_one_process(project, args, project / "two", lora=recipe == "lora")


def _matches_one_process(project, args, two, lora=False):
    import torch

    from metamorph_core.testing import samples
    from metamorph_train.recipe import load_recipe
    from metamorph_train.runner import run_recipe

    one = load_recipe(
        project / "recipe.yaml",
        [*args, "train.batch_size=4", f"train.output_dir={project / 'one'}"],
    )
    run_recipe(one, log=None)
    a = MetaMorphModel.from_pretrained(two / "final").eval()
    b = MetaMorphModel.from_pretrained(project / "one" / "final").eval()
    batch = a.prepare_batch([samples.understanding(size=16), samples.generation(size=16)])
    with torch.no_grad():
        la, lb = a(**batch), b(**batch)
    assert torch.allclose(la.logits, lb.logits, atol=1e-4)
    assert abs(la.visual_loss.item() - lb.visual_loss.item()) < 1e-4
    if lora:
        assert (two / "final" / "backbone" / "adapter_model.safetensors").is_file()
        a.merge_lora()
        with torch.no_grad():
            merged = a(**batch)
        assert torch.allclose(merged.logits, la.logits, atol=1e-4)


def test_two_nodes_meet_through_torchrun_rendezvous(project):
    """Multi-node as on a cluster (examples/slurm): two torchrun agents, one process each,
    find each other through the c10d rendezvous and train as one DDP job."""
    import os

    args = ["train.steps=2", "train.lr=1e-2"]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=metamorph-test",
                "-m",
                "metamorph_core.cli",
                "train",
                str(project / "recipe.yaml"),
                *args,
                "train.batch_size=2",
                f"train.output_dir={project / 'nodes'}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [a.communicate(timeout=300) for a in agents]
    for agent, (_, err) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, err[-3000:]
    assert sum('"summary"' in out for out, _ in outputs) == 2  # both nodes trained
    _matches_one_process(project, args, project / "nodes")


def test_the_trained_model_card_describes_the_run(project):
    """`output_dir/final` and `metamorph export` write a model card with the recipe's training
    settings, its data sources and the last validation's losses."""
    from metamorph_train.export import export_checkpoint
    from metamorph_train.runner import run_recipe

    held = {"path": str(project / "train.jsonl"), "image_root": str(project / "images")}
    recipe = load_recipe(
        project / "recipe.yaml",
        ["train.steps=4", "train.eval_every=2", f"data.eval_sources=[{json.dumps(held)}]"],
    )
    run_recipe(recipe, log=None)
    final = project / "run" / "final"
    card = (final / "README.md").read_text()
    assert f"- `{project / 'train.jsonl'}` (format jsonl, weight 1.0)" in card
    assert "| steps | 4 |" in card and "| objective.policy | full |" in card
    assert "| lr | 0.003 |" in card and "| batch_size | 6 |" in card
    assert "| validation.eval0/text_loss |" in card and "| validation.step | 4 |" in card
    model = MetaMorphModel.from_pretrained(final)
    assert model.card_data.training["objective"] == {
        "name": "vpit",
        "policy": "full",
        "prompt_dropout": 0.0,
        "visual_input_noise": 0.0,
    }
    exported = project / "exported"
    export_checkpoint(project / "run", exported)
    assert (exported / "README.md").read_text() == card
