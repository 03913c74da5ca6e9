"""Experiment tracking: TensorBoard, MLflow, W&B (offline) and JSONL loggers record a tiny VPiT
run (read back with their own readers), continue it on resume, and the run directory holds the
resolved recipe and the run information."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from metamorph_core.testing import samples, save_tiny_backbone, tiny_model_config
from metamorph_train.loggers import Logger, build_loggers, logger_specs
from metamorph_train.loggers.jsonl import JSONLLogger
from metamorph_train.recipe import load_recipe
from metamorph_train.runner import run_recipe

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220)}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Images, LLaVA records and a recipe of a tiny unified model."""
    root = tmp_path_factory.mktemp("project")
    (root / "images").mkdir()
    records = []
    for name, rgb in COLOURS.items():
        pixels = np.tile(np.array(rgb, np.uint8), (16, 16, 1))
        Image.fromarray(pixels).save(root / "images" / f"{name}.png")
        ask = {"from": "human", "value": "<image>\nWhat colour is this?"}
        records.append(
            {"image": f"{name}.png", "conversations": [ask, {"from": "gpt", "value": name}]}
        )
        prompt = {"from": "human", "value": f"Generate an image of the colour {name}."}
        answer = {"from": "gpt", "value": "Here is an image based on your request: <image>"}
        records.append({"image": f"{name}.png", "conversations": [prompt, answer]})
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    backbone = save_tiny_backbone(root / "llm", "qwen2")
    encoder = {"image_size": 16, "hidden_size": 24, "num_tokens": 4}
    recipe = {
        "objective": {"name": "vpit"},
        "model": {
            "encoder": {"name": "tiny-patch", "kwargs": encoder},
            "backbone": {"name": "qwen2", "kwargs": {"pretrained": str(backbone)}},
            "template": "chatml",
        },
        "data": {
            "sources": [{"path": str(root / "train.jsonl"), "image_root": str(root / "images")}]
        },
        "train": {"output_dir": str(root / "run"), "steps": 4, "batch_size": 3, "lr": 3e-3},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wandb_history(run_dir):
    """``(step, train/text_loss)`` of every history record in the offline runs' files."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    found = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        store = datastore.DataStore()
        store.open_for_scan(str(path))
        while (data := store.scan_data()) is not None:
            record = pb.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
                if "train/text_loss" in items:
                    found.append((int(items["_step"]), float(items["train/text_loss"])))
    return found


def test_every_logger_records_the_run_and_continues_it_on_resume(project, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    loggers = f"[jsonl, tensorboard, {{name: mlflow, kwargs: {{tracking_uri: '{uri}'}}}}, wandb]"
    args = [f"train.output_dir={out}", f"train.loggers={loggers}", "train.log_every=1"]
    args += ["train.save_every=2", "train.lr=0.002"]  # lr: an override the records must show
    run_recipe(load_recipe(project / "recipe.yaml", [*args, "train.steps=4"]), log=None)
    first = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    wandb_id = json.loads((out / "wandb_run.json").read_text())["id"]

    # a process killed after its step-4 checkpoint had logged step 5 already
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "text_loss": 99.0}) + "\n")
    stale = SummaryWriter(str(out / "tensorboard"))
    stale.add_scalar("train/text_loss", 99.0, 5)
    stale.close()

    # wandb names an offline run's directory by the second it started; a real resume comes
    # later than the same second, so this tiny run waits for the next one
    time.sleep(1.1)
    resumed = load_recipe(project / "recipe.yaml", [*args, "train.steps=6"])
    run_recipe(resumed, log=None)

    rows = _rows(out / "metrics.jsonl")  # each step once, the first four untouched
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[:4] == first
    assert list(rows[0]) == [
        "step", "text_loss", "text_tokens", "visual_loss", "visual_tokens", "lr", "tokens_per_s"
    ]  # fmt: skip
    losses = {r["step"]: r["text_loss"] for r in rows}
    assert 99.0 not in losses.values()

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Scalars("train/text_loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4, 5, 6]  # the stale step 5 was purged
    assert all(e.value == pytest.approx(losses[e.step], rel=1e-6) for e in scalars)
    assert {"train/visual_loss", "train/lr"} <= set(events.Tags()["scalars"])
    assert "recipe/text_summary" in events.Tags()["tensors"]

    client = MlflowClient(tracking_uri=uri)
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run_id  # one run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # artifacts next to the SQLite file, not in ./mlruns of the working directory
    assert run.info.artifact_uri.startswith((tmp_path / "mlflow-artifacts").as_uri())
    history = client.get_metric_history(run_id, "train/text_loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4, 5, 6]
    assert all(m.value == pytest.approx(losses[m.step], rel=1e-6) for m in history)
    assert run.data.params["train.lr"] == "0.002" and run.data.params["objective.name"] == "vpit"
    assert {"recipe.yaml", "run_info.json"} <= {a.path for a in client.list_artifacts(run_id)}
    logged = client.download_artifacts(run_id, "recipe.yaml", str(tmp_path / "dl"))
    assert yaml.safe_load(Path(logged).read_text()) == resumed.to_dict()  # the newest recipe

    assert json.loads((out / "wandb_run.json").read_text())["id"] == wandb_id
    assert len(list((out / "wandb").glob(f"offline-run-*-{wandb_id}"))) == 2  # one per start
    logged_steps = dict(_wandb_history(out))
    assert sorted(logged_steps) == [1, 2, 3, 4, 5, 6]
    assert all(v == pytest.approx(losses[s], rel=1e-6) for s, v in logged_steps.items())

    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe == resumed.to_dict()
    assert recipe["train"]["lr"] == 0.002 and recipe["train"]["steps"] == 6
    assert load_recipe(out / "recipe.yaml").to_dict() == resumed.to_dict()  # it reloads

    info = json.loads((out / "run_info.json").read_text())
    assert info["versions"]["torch"] == torch.__version__.split("+")[0]
    assert info["versions"]["metamorph-train"] is not None
    assert info["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", info["git_commit"])
    assert info["start_step"] == 4 and [p["start_step"] for p in info["previous"]] == [0]


def test_unknown_loggers_and_missing_extras_fail_clearly(monkeypatch):
    with pytest.raises(ValueError, match=r"train.loggers\[1\].*tensorbored.*tensorboard"):
        build_loggers(["jsonl", "tensorbored"])
    for name in ("tensorboard", "mlflow", "wandb"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
        with pytest.raises(ImportError, match=rf"pip install 'metamorph-train\[{name}\]'"):
            build_loggers([name])
    with pytest.raises(ValueError, match=r"'train.loggers\[0\]' has unknown key\(s\) \['kw'\]"):
        logger_specs([{"name": "jsonl", "kw": {}}])
    with pytest.raises(ValueError, match="names the logger 'jsonl' twice"):
        logger_specs(["jsonl", {"name": "jsonl"}])
    with pytest.raises(ValueError, match="must be a list of logger names"):
        logger_specs(3)
    with pytest.raises(ValueError, match="does not take kwargs"):
        build_loggers([{"name": "jsonl", "kwargs": {"colour": "red"}}])
    assert logger_specs("wandb") == [("wandb", {})]


class Broken(Logger):
    name = "broken"

    def log_metrics(self, step, metrics, namespace="train"):
        raise ConnectionError("tracking server unreachable")


def test_a_failing_logger_is_switched_off_and_training_goes_on(tmp_path):
    from metamorph_core import MetaMorphModel
    from metamorph_train.data import Mixture
    from metamorph_train.objectives import VPiTObjective
    from metamorph_train.trainer import Trainer, TrainerConfig

    backbone = save_tiny_backbone(tmp_path / "llama", "llama", seed=1)
    torch.manual_seed(0)
    objective = VPiTObjective(MetaMorphModel.from_config(tiny_model_config(backbone)))
    data = Mixture({"d": [samples.understanding(0), samples.generation(1)]}, {"d": 1.0})
    config = TrainerConfig(output_dir=str(tmp_path / "run"), steps=3, batch_size=2, log_every=1)
    lines: list[str] = []
    Trainer(objective, data, config, log=lines.append, loggers=[Broken(), JSONLLogger()]).run()
    assert [r["step"] for r in _rows(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    failed = [line for line in lines if "logger 'broken' failed in log_metrics" in line]
    assert len(failed) == 1 and "switched off" in failed[0]
    # without a recipe there is no recipe.yaml, but the run information is written
    assert not (tmp_path / "run" / "recipe.yaml").exists()
    assert (tmp_path / "run" / "run_info.json").is_file()
