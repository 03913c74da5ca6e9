"""Validation during training: held-out sources scored every N steps (normalised like
training, identical training with it on or off), prompts answered and drawn, a time budget,
and the same scores from two FSDP2 ranks as from one process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from metamorph_core import MetaMorphModel
from metamorph_core.testing import run_torchrun, samples, save_tiny_backbone, tiny_model_config
from metamorph_decoders.testing import tiny_decoder
from metamorph_train.data import ConversationDataset, Mixture
from metamorph_train.loggers.jsonl import JSONLLogger
from metamorph_train.loggers.tensorboard import TensorBoardLogger
from metamorph_train.objectives import VPiTObjective
from metamorph_train.recipe import load_recipe
from metamorph_train.runner import run_recipe
from metamorph_train.trainer import Trainer, TrainerConfig

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220)}
PROMPTS = "['Generate an image of the colour red.', 'What colour is a leaf?']"


def _records(colours, shapes=("square",)):
    out = []
    for name in colours:
        for shape in shapes:
            ask = {"from": "human", "value": f"<image>\nWhat colour is this {shape}?"}
            out.append(
                {"image": f"{name}.png", "conversations": [ask, {"from": "gpt", "value": name}]}
            )
            prompt = {"from": "human", "value": f"Generate an image of a {name} {shape}."}
            answer = {"from": "gpt", "value": "Here is an image based on your request: <image>"}
            out.append({"image": f"{name}.png", "conversations": [prompt, answer]})
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Training records, 5 held-out records (an odd count: short last batches) and a recipe."""
    root = tmp_path_factory.mktemp("project")
    (root / "images").mkdir()
    for name, rgb in COLOURS.items():
        pixels = np.tile(np.array(rgb, np.uint8), (16, 16, 1))
        Image.fromarray(pixels).save(root / "images" / f"{name}.png")
    train = _records(COLOURS)
    held = _records(COLOURS, ("circle",))[:5]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train) + "\n")
    (root / "held.jsonl").write_text("\n".join(json.dumps(r) for r in held) + "\n")
    backbone = save_tiny_backbone(root / "llm", "qwen2")
    images = str(root / "images")
    recipe = {
        "objective": {"name": "vpit"},
        "model": {
            "encoder": {
                "name": "tiny-patch",
                "kwargs": {"image_size": 16, "hidden_size": 24, "num_tokens": 4},
            },
            "backbone": {"name": "qwen2", "kwargs": {"pretrained": str(backbone)}},
            "template": "chatml",
        },
        "data": {
            "sources": [{"path": str(root / "train.jsonl"), "image_root": images}],
            "eval_sources": [
                {"path": str(root / "held.jsonl"), "image_root": images, "name": "held"}
            ],
        },
        "train": {"output_dir": str(root / "run"), "steps": 4, "batch_size": 2, "lr": 3e-3},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _held_out_losses(project, final):
    """The text and visual loss of a saved model over the whole held-out file, in one batch."""
    model = MetaMorphModel.from_pretrained(final).eval()
    held = ConversationDataset(project / "held.jsonl", project / "images")
    with torch.no_grad():
        out = model(**model.prepare_batch([held[i] for i in range(len(held))]))
    batch = model.prepare_batch([held[i] for i in range(len(held))])
    text = float((batch["labels"][:, 1:] != -100).sum())
    visual = float(batch["target_slot_mask"].sum())
    return out.text_loss_sum.item() / text, out.visual_loss_sum.item() / visual


def test_validation_scores_held_out_sources_and_leaves_training_unchanged(project, tmp_path):
    common = ["train.steps=4", "train.log_every=1", "train.eval_generation={max_new_tokens: 4}"]
    on = tmp_path / "on"
    lines: list[str] = []
    run_recipe(
        load_recipe(
            project / "recipe.yaml",
            [
                *common,
                f"train.output_dir={on}",
                "train.eval_every=2",
                f"train.eval_prompts={PROMPTS}",
            ],
        ),
        log=lines.append,
    )
    off = tmp_path / "off"
    run_recipe(load_recipe(project / "recipe.yaml", [*common, f"train.output_dir={off}"]), log=None)

    a, b = _rows(on / "metrics.jsonl"), _rows(off / "metrics.jsonl")
    keys = ("step", "text_loss", "visual_loss", "text_tokens", "visual_tokens", "lr")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]  # exactly
    assert not (off / "eval.jsonl").exists()

    evals = _rows(on / "eval.jsonl")
    assert [r["step"] for r in evals] == [2, 4]
    last = evals[-1]
    assert last["held/batches"] == 3 and last["batches_planned"] == 3  # 5 records, 2 a batch
    assert last["held/text_tokens"] > 0 and last["held/visual_tokens"] == 2 * 4
    assert last["budget_exceeded"] == 0 and last["prompts"] == 2
    # summed over batches and divided once: the loss of the whole held-out set at step 4
    text, visual = _held_out_losses(project, on / "final")
    assert last["held/text_loss"] == pytest.approx(text, rel=1e-4)
    assert last["held/visual_loss"] == pytest.approx(visual, rel=1e-4)
    assert evals[0]["held/text_loss"] != last["held/text_loss"]

    step2 = on / "eval" / "step-0000002"
    assert json.loads((step2 / "metrics.json").read_text()) == evals[0]
    answers = json.loads((step2 / "samples.json").read_text())
    assert [s["prompt"] for s in answers] == yaml.safe_load(PROMPTS)
    assert all(isinstance(s["text"], str) for s in answers)
    assert not (step2 / "images.png").exists()  # no decoder attached
    assert [r["name"] for r in _rows(on / "text.jsonl")] == ["eval/samples"] * 2
    reports = [line for line in lines if line.startswith("eval at step")]
    assert len(reports) == 2 and "held: text " in reports[0] and "2 prompt(s)" in reports[0]


def test_prompts_are_answered_and_drawn_with_a_decoder_attached(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    backbone = save_tiny_backbone(tmp_path / "llama", "llama", seed=1)
    torch.manual_seed(0)
    model = MetaMorphModel.from_config(tiny_model_config(backbone))
    model.attach_decoder(tiny_decoder(model))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\na blue circle\n")  # a file: one prompt per line
    config = TrainerConfig(
        output_dir=str(tmp_path / "run"),
        steps=1,
        batch_size=2,
        eval_every=1,
        eval_prompts=str(prompts),
        eval_generation={"max_new_tokens": 3, "decoding": {"steps": 2}},
    )
    data = Mixture({"d": [samples.understanding(0), samples.generation(1)]}, {"d": 1.0})
    lines: list[str] = []
    loggers = [JSONLLogger(), TensorBoardLogger()]
    Trainer(VPiTObjective(model), data, config, log=lines.append, loggers=loggers).run()
    where = tmp_path / "run" / "eval" / "step-0000001"
    answers = json.loads((where / "samples.json").read_text())
    assert [s["prompt"] for s in answers] == ["a red square", "a blue circle"]
    assert [s["image"] for s in answers] == [0, 1]
    with Image.open(where / "images.png") as grid:
        assert grid.size == (32, 16) and grid.mode == "RGB"  # two 16x16 images in a row
    assert any("2 prompt(s) answered, 2 image(s)" in line for line in lines)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("eval/images")] == [1]
    assert "eval/prompts" in events.Tags()["scalars"]


def test_the_time_budget_stops_validation_and_a_run_may_resume_with_it_on(project, tmp_path):
    out = [f"train.output_dir={tmp_path / 'run'}", "train.save_every=2"]
    run_recipe(load_recipe(project / "recipe.yaml", [*out, "train.steps=2"]), log=None)
    lines: list[str] = []
    args = ["train.steps=3", "train.eval_every=1", "train.eval_budget_s=1e-9"]
    args += [f"train.eval_prompts={PROMPTS}"]  # validation settings may change on resume
    run_recipe(load_recipe(project / "recipe.yaml", [*out, *args]), log=lines.append)
    (row,) = _rows(tmp_path / "run" / "eval.jsonl")
    assert row["step"] == 3 and row["budget_exceeded"] == 1
    assert row["batches"] == 0 and row["batches_planned"] == 3 and row["prompts"] == 0
    (report,) = [line for line in lines if line.startswith("eval at step 3")]
    assert (
        "time budget train.eval_budget_s=1e-09 s exceeded: stopped after 0 of 3 batches and 0 "
        "of 2 prompts" in report
    )


def test_held_out_batches_carry_no_training_noise(tmp_path):
    backbone = save_tiny_backbone(tmp_path / "llama", "llama", seed=1)
    model = MetaMorphModel.from_config(tiny_model_config(backbone))
    objective = VPiTObjective(model, visual_input_noise=1.0)
    items = [samples.generation(1)]
    assert "input_noise" in objective.batch(items, 0)
    assert "input_noise" not in objective.eval_batch(items, 0)


def test_validation_settings_are_checked(project, tmp_path):
    recipe = project / "recipe.yaml"
    with pytest.raises(ValueError, match="nothing to validate: give data.eval_sources"):
        run_recipe(load_recipe(recipe, ["train.eval_every=2", "data.eval_sources=[]"]), log=None)
    with pytest.raises(ValueError, match=r"data.eval_sources\[0\]' streams"):
        load_recipe(recipe, ["data.eval_sources=[{path: x, streaming: true}]"])
    with pytest.raises(
        ValueError, match=r"unknown recipe key\(s\) \['data.eval_sources\[0\].root'\]"
    ):
        load_recipe(recipe, ["data.eval_sources=[{path: x, root: y}]"])
    with pytest.raises(ValueError, match="'train.eval_prompts' = 'missing.txt' is no file"):
        run_recipe(load_recipe(recipe, ["train.eval_every=1", "train.eval_prompts=missing.txt"]))
    with pytest.raises(ValueError, match=r"train.eval_generation.*unknown generation option"):
        run_recipe(
            load_recipe(
                recipe,
                [
                    "train.eval_every=1",
                    "train.eval_prompts=[hi]",
                    "train.eval_generation={beams: 2}",
                ],
            )
        )


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_score_held_out_data_as_one_process_does(project, strategy):
    """Every rank scores its share of each held-out batch (a rank with none still runs a
    forward: FSDP2's are collective); the sums over ranks give one process's losses. Under
    DDP rank 0 alone answers the prompts; under FSDP2 they are skipped, as the log says."""
    args = ["train.steps=2", "train.lr=1e-2", "train.eval_every=2", f"train.strategy={strategy}"]
    args += [f"train.eval_prompts={PROMPTS}", "train.eval_generation={max_new_tokens: 3}"]
    two = project / f"two-{strategy}"
    res = run_torchrun(
        *("-m", "metamorph_core.cli", "train", project / "recipe.yaml", *args),
        *("train.batch_size=2", f"train.output_dir={two}"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (two_row,) = _rows(two / "eval.jsonl")
    if strategy == "fsdp":
        assert "prompts skipped under FSDP" in res.stdout + res.stderr
        assert two_row["prompts_planned"] == 0
    else:
        assert len(json.loads((two / "eval" / "step-0000002" / "samples.json").read_text())) == 2
    one_dir = project / f"one-{strategy}"
    one = [*args, "train.strategy=ddp", "train.batch_size=4", f"train.output_dir={one_dir}"]
    run_recipe(load_recipe(project / "recipe.yaml", one), log=None)
    (one_row,) = _rows(one_dir / "eval.jsonl")
    assert two_row["held/batches"] == one_row["held/batches"] == 2  # 4 + 1 records
    for key in ("held/text_loss", "held/visual_loss"):
        assert two_row[key] == pytest.approx(one_row[key], abs=1e-4), key
    for key in ("held/text_tokens", "held/visual_tokens"):
        assert two_row[key] == one_row[key]
