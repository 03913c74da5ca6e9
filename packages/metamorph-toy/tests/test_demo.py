"""`metamorph demo --preset micro`: the whole toy-world pipeline (encoder pretraining, decoder,
LM pretraining, VPiT, the decoder tuned on VPiT's predictions, evaluation) runs through the CLI; every stage ran, every metric is there,
and understanding and the judge are clearly above their chance baselines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from metamorph_core.cli import main as cli
from metamorph_toy.ablation import ABLATIONS, _finished_run, ablation_vpit_steps
from metamorph_toy.demo import PRESETS, Options, remove_demo_run, run_demo
from metamorph_toy.presets import run_record, wall_budget
from metamorph_toy.stages import IMAGE_MEMORY_MB

STAGES = (
    "world", "judge", "encoder", "center", "cache", "decoder", "lm", "vpit", "predict", "tune",
    "eval",
)  # fmt: skip
METRICS = (
    "understanding_accuracy",
    "generation_accuracy",
    "reasoning_generation_accuracy",
    "decoder_reconstruction_accuracy",
    "tuned_decoder_reconstruction_accuracy",
    "token_nearest_neighbour_accuracy",
    "control_shuffled_tokens_accuracy",
)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro") / "demo"
    assert cli(["demo", "--preset", "micro", "--out", str(out)]) == 0
    return out


def test_micro_demo_runs_every_stage_and_learns(micro_run):
    out = micro_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(STAGES) <= set(metrics["seconds"])
    budget = metrics["seconds_budget"]  # recorded beside the seconds, never enforced
    assert set(STAGES) <= set(budget) and budget["total"] == wall_budget(
        PRESETS["micro"].stage_budget_s, metrics["lanes"]
    )
    assert set(metrics["over_budget"]) <= set(STAGES)
    for stage in ("encoder", "decoder", "lm", "vpit", "decoder-tuned"):
        assert (out / stage / "final").is_dir(), stage
    decoder_recipe = yaml.safe_load((out / "recipes" / "decoder.yaml").read_text())
    assert decoder_recipe["train"]["bf16"] is PRESETS["micro"].decoder_bf16 is True
    # the decoder learns at a constant rate and draws with its weights' moving average
    micro = PRESETS["micro"]
    assert (micro.decoder_schedule, micro.decoder_ema) == ("constant", 0.999)
    assert decoder_recipe["train"]["schedule"] == "constant"
    assert decoder_recipe["train"]["ema_decay"] == 0.999
    assert (out / "decoder" / f"step-{micro.decoder_steps:07d}" / "ema.safetensors").is_file()
    # drawn without guidance, it trains every sample on its tokens (no null context)
    assert micro.decoder_guidance == 1.0 and micro.decoder_cond_dropout == 0.0
    assert decoder_recipe["model"]["decoder"]["kwargs"]["cond_dropout"] == 0.0
    encoder_recipe = yaml.safe_load((out / "recipes" / "encoder.yaml").read_text())
    assert encoder_recipe["model"]["config"]["pooling"] == PRESETS["micro"].encoder_pooling
    # the renders, drawn for many epochs, are decoded once and kept in memory
    for recipe in (encoder_recipe, decoder_recipe):
        assert recipe["data"]["image_memory_mb"] == IMAGE_MEMORY_MB > 0
    assert PRESETS["micro"].encoder_pooling == "mean"
    predicted = json.loads((out / "cache-predicted" / "cache_config.json").read_text())
    assert predicted["predicted_by"] == str(out / "vpit" / "final")
    for key in METRICS:
        m = metrics[key]
        assert 0.0 <= m["value"] <= 1.0 and m["n"] > 0 and 0.0 < m["chance"] < 1.0, key
        assert m["ci95"][0] <= m["value"] <= m["ci95"][1], key
    for key in (
        "generation_accuracy",
        "reasoning_generation_accuracy",
        "decoder_reconstruction_accuracy",
        "tuned_decoder_reconstruction_accuracy",
    ):
        per = metrics[key]["per_attribute"]
        assert set(per) == {"shape", "colour", "size", "position"}, key
        assert all(0.0 <= v <= 1.0 for v in per.values()) and min(per.values()) >= (
            metrics[key]["value"] - 1e-9
        ), key  # all right implies each right
    cos = metrics["visual_token_cosine"]
    assert -1.0 <= cos["value"] <= 1.0 and -1.0 <= cos["mean_token_baseline"] <= 1.0
    understanding = metrics["understanding_accuracy"]  # measured 0.52 (CI 0.42-0.62)
    asked = understanding["per_attribute"]  # by the attribute asked about, asked equally often
    assert set(asked) == {"shape", "colour", "size", "position"}
    assert abs(sum(asked.values()) / 4 - understanding["value"]) < 1e-9, asked
    assert understanding["ci95"][0] > understanding["chance"], understanding
    judge = metrics["judge_accuracy"]
    assert judge["ci95"][0] > 0.5, judge  # measured 0.87 (CI 0.83-0.90) at 80 judge steps
    report = (out / "report.md").read_text()
    assert "understanding_accuracy" in report and "Budget per stage" in report
    for grid in ("generation.png", "reasoning.png", "understanding.png"):
        assert (out / grid).is_file() and grid in report


def test_metamorph_eval_scores_the_demos_test_sets_as_the_demo_does(micro_run, tmp_path):
    """The demo writes its test sets in the layouts of `metamorph eval`: the understanding
    questions rescored from the command line give the demo's number; the generation prompts
    run through the `toy-judge` image task with the demo's judge."""
    out = micro_run
    metrics = json.loads((out / "metrics.json").read_text())
    args = ["eval", "understanding", "--model", str(out / "vpit" / "final"), "--image-root"]
    args += [str(out / "eval"), "--out", str(tmp_path / "u"), "--batch-size", "16"]
    tasks = ["--tasks", f"exact-match={out / 'eval' / 'understanding.jsonl'}"]
    assert cli([*args, *tasks, "--max-new-tokens", "8"]) == 0
    rescored = json.loads((tmp_path / "u" / "exact-match" / "results.json").read_text())
    demo = metrics["understanding_accuracy"]
    assert rescored["metrics"]["accuracy"]["n"] == demo["n"]
    assert rescored["metrics"]["accuracy"]["value"] == pytest.approx(demo["value"])
    assert rescored["metrics"]["per_category"]["shape"]["value"] == pytest.approx(
        demo["per_attribute"]["shape"]
    )
    prompts = out / "eval" / "generation.jsonl"
    rows = [json.loads(x) for x in prompts.read_text().splitlines()]
    assert len(rows) == PRESETS["micro"].generation_test
    assert set(rows[0]["scene"]) == {"shape", "colour", "size", "position"}
    images = ["eval", "images", "--model", str(out / "vpit" / "final"), "--task", "toy-judge"]
    images += ["--task-option", f"judge={out / 'judge'}", "--prompts", str(prompts)]
    images += ["--decoder", str(out / "decoder" / "final"), "--out", str(tmp_path / "g")]
    assert cli([*images, "--decoder-steps", "4", "--decoder-guidance-scale", "1.0"]) == 0
    results = json.loads((tmp_path / "g" / "results.json").read_text())
    assert results["samples"] == len(rows) and 0.0 <= results["metrics"]["accuracy"]["value"] <= 1
    assert len(list((tmp_path / "g" / "images").glob("*.png"))) == len(rows)


def test_overwrite_replaces_only_a_demo_run(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "vpit" / "final").mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    remove_demo_run(run)
    assert not run.exists()
    remove_demo_run(run)  # nothing there: nothing to do

    mine = tmp_path / "mine"
    (mine / "vpit").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        remove_demo_run(mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert cli(["demo", "--preset", "micro", "--out", str(mine)]) == 2  # bad input: no traceback
    assert "pick a new --out" in capsys.readouterr().err
    assert cli(["demo", "--preset", "micro", "--out", str(mine), "--overwrite"]) == 2
    assert "notes.txt" in capsys.readouterr().err and (mine / "notes.txt").exists()
    assert cli(["demo", "--ablation", "--overwrite", "--out", str(mine)]) == 2
    assert "--ablation" in capsys.readouterr().err


def test_a_run_reuses_what_its_data_leaves_unchanged(micro_run, tmp_path):
    """The ablation's later conditions copy the first one's judge, encoder and decoder (their
    data is the same file for file) and train what differs: here the language model, whose
    text loses the facts."""
    out = tmp_path / "no-facts"
    m = run_demo("micro", out, Options(seed=0, text_facts=False), reuse=micro_run, lanes=2)
    assert m["reused"]["stages"] == ["decoder", "encoder", "judge"]
    assert "center" not in m["seconds"] and {"lm", "vpit", "eval"} <= set(m["seconds"])
    for entry in ("encoder/token_mean.safetensors", "decoder/final/config.json"):
        assert (out / entry).read_bytes() == (micro_run / entry).read_bytes(), entry
    assert (out / "lm" / "final").is_dir()
    assert json.loads((out / "metrics.json").read_text())["run"]["text_facts"] is False
    other_seed = tmp_path / "seed-1"
    with pytest.raises(ValueError, match="seed"):
        run_demo("micro", other_seed, Options(seed=1), reuse=micro_run)


def test_a_setting_a_run_did_not_record_is_read_at_its_default(micro_run, tmp_path):
    """A run made before a preset setting existed records nothing for it: reuse and the
    ablation's read-back take it at the setting's default (the behaviour that run had) and
    refuse any other recorded value."""
    from metamorph_toy.demo import reusable_stages
    from metamorph_toy.run_files import write_world

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "data").symlink_to(micro_run / "data")
    metrics = json.loads((micro_run / "metrics.json").read_text())
    assert PRESETS["micro"].encoder_center_per_token is True  # the setting's default
    del metrics["run"]["encoder_center_per_token"]
    (earlier / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "new"
    write_world(out, PRESETS["micro"], Options(seed=0))
    assert "encoder" in reusable_stages(out, earlier, PRESETS["micro"], Options(seed=0))
    assert _finished_run(earlier, PRESETS["micro"], Options(seed=0), print) == metrics
    metrics["run"]["encoder_center_per_token"] = False
    (earlier / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match="encoder_center_per_token"):
        reusable_stages(out, earlier, PRESETS["micro"], Options(seed=0))
    with pytest.raises(FileExistsError, match="encoder_center_per_token"):
        _finished_run(earlier, PRESETS["micro"], Options(seed=0), print)


def test_one_lane_runs_the_stages_one_after_another(micro_run, tmp_path):
    """``lanes=1`` (``metamorph demo --lanes 1``): the same stages, one after another in this
    process (here everything but VPiT copied from the two-lane micro run)."""
    logged: list[str] = []
    m = run_demo("micro", tmp_path / "one", Options(seed=0), logged.append, micro_run, lanes=1)
    assert m["reused"]["stages"] == ["decoder", "encoder", "judge", "lm"]
    assert not any("two lanes" in line for line in logged)
    started = [line.removesuffix(" ...") for line in logged if line.endswith(" ...")]
    order = ["world", "judge", "encoder", "cache", "decoder", "lm", "vpit", "predict", "tune"]
    assert started == [f"[demo] {name}" for name in [*order, "eval"]]


def test_an_ablation_reads_back_finished_runs_and_redoes_unfinished_ones(tmp_path):
    logged = []
    preset, options = PRESETS["micro"], Options(seed=3, generation=25)
    unfinished = tmp_path / "unfinished"
    (unfinished / "vpit").mkdir(parents=True)
    assert _finished_run(unfinished, preset, options, logged.append) is None
    assert not unfinished.exists() and "unfinished run" in logged[-1]

    done = tmp_path / "done"
    done.mkdir()
    run = {**run_record(preset, options), "preset": "micro"}  # as run_demo records it
    assert run["generation"] == 25 and run["vpit_steps"] == preset.vpit_steps
    (done / "metrics.json").write_text(json.dumps({"run": run, "generation_accuracy": {}}))
    assert _finished_run(done, preset, options, logged.append)["run"]["seed"] == 3
    with pytest.raises(FileExistsError, match="generation"):
        _finished_run(done, preset, Options(seed=3), logged.append)


def test_an_ablation_reuses_each_seeds_demo_run(tmp_path, monkeypatch, capsys):
    """``--reuse runs/demo-s{seed}``: each seed's first condition copies from that seed's demo
    run, the later conditions from the first, also when the first was finished earlier (what
    they copy is run_demo's reuse, tested above); every seed's run is checked before anything
    trains; a pattern without {seed} for several seeds, or --reuse without --ablation, is
    refused."""
    from metamorph_toy import ablation

    calls = []

    def fake_run_demo(preset, out, options, log, reuse, lanes):
        calls.append((options.seed, Path(out).name, reuse))
        value = {"all_data": 0.5 + 0.1 * options.seed, "no_understanding": 0.4}
        metric = {"value": value.get(Path(out).name, 0.2)}
        metrics = {m: metric for m in ablation._ABLATION_METRICS.values()}
        metrics["run"] = {**run_record(PRESETS["micro"], options), "preset": "micro"}
        metrics["reused"] = {"from": str(reuse)}
        Path(out).mkdir(parents=True)
        (Path(out) / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(ablation, "run_demo", fake_run_demo)
    for seed in (0, 1):  # the seeds' finished demo runs
        (tmp_path / f"d-s{seed}").mkdir()
        (tmp_path / f"d-s{seed}" / "metrics.json").write_text(json.dumps({"run": {"seed": seed}}))
    pattern, out = str(tmp_path / "d-s{seed}"), tmp_path / "abl"
    summary = ablation.run_ablation("micro", out, (0, 1), lambda m: None, reuse=pattern)
    # the findings, paired by seed, with their t-intervals over the two seeds
    added = summary["findings"]["understanding_data_on_generation"]
    assert added["runs"] == pytest.approx([0.1, 0.2]) and added["mean"] == pytest.approx(0.15)
    assert added["ci95"] == pytest.approx([0.15 - 12.706 * 0.05, 0.15 + 12.706 * 0.05])
    assert summary["findings"]["text_facts_on_reasoning"]["runs"] == pytest.approx([0.3, 0.4])
    for seed in (0, 1):
        first = out / f"seed-{seed}" / "all_data"
        assert calls[3 * seed : 3 * seed + 3] == [
            (seed, "all_data", tmp_path / f"d-s{seed}"),
            (seed, "no_understanding", first),
            (seed, "no_text_facts", first),
        ]
    assert summary["reused"]["all_data"] == [{"from": str(tmp_path / f"d-s{s}")} for s in (0, 1)]
    # resumed: the finished conditions are read back, the missing one copies from the first
    calls.clear()
    (out / "seed-1" / "no_text_facts" / "metrics.json").unlink()
    ablation.run_ablation("micro", out, (0, 1), lambda m: None, reuse=pattern)
    assert calls == [(1, "no_text_facts", out / "seed-1" / "all_data")]

    with pytest.raises(FileNotFoundError, match="seed 2"):  # before anything trains
        ablation.run_ablation("micro", tmp_path / "b", (0, 2), reuse=pattern)
    with pytest.raises(ValueError, match="seed 0, not seed 1"):
        ablation.run_ablation("micro", tmp_path / "b", (1,), reuse=str(tmp_path / "d-s0"))
    with pytest.raises(ValueError, match="seed"):
        ablation.run_ablation("micro", tmp_path / "b", (0, 1), reuse="runs/one")
    assert len(calls) == 1 and not (tmp_path / "b").exists()
    assert cli(["demo", "--preset", "micro", "--out", str(tmp_path / "c"), "--reuse", "x"]) == 2
    assert "--ablation" in capsys.readouterr().err


def test_ablation_conditions_draw_the_same_generation_conversations():
    # quick: 1300 steps draw 1300 * 2/5 = 520 generation batches with every source (weights
    # understanding 2, generation 2, text 1); 520 / (2/3) without understanding, / (2/4) without
    # the text-only facts
    steps = {c: ablation_vpit_steps(1300, s) for c, s in ABLATIONS.items()}
    assert steps == {"all_data": 1300, "no_understanding": 780, "no_text_facts": 1040}


def test_the_wall_budget_of_two_lanes_overlaps_the_encoder_side_with_the_lm_side(tmp_path):
    budget = {"world": 1, "judge": 2, "lm": 3, "encoder": 10, "center": 1, "cache": 1}
    budget |= {"decoder": 20, "vpit": 30, "eval": 4}
    assert wall_budget(budget, 1) == 72
    # VPiT waits for the cache (12 s in), the decoder follows it in the other lane
    assert wall_budget(budget, 2) == 1 + max(12 + 30, 12 + 20) + 4
    assert wall_budget({**budget, "decoder": 50}, 2) == 1 + 12 + 50 + 4
    assert wall_budget({"vpit": 30, "decoder": 20}, 2) == 30  # stages not given take none
    with pytest.raises(ValueError, match="lanes=3"):
        run_demo("micro", tmp_path / "three", lanes=3)
    assert not (tmp_path / "three").exists()


def test_a_second_lane_that_dies_is_a_clear_error():
    """The lane's process dying (here it exits at once; in a script without a main guard it
    fails to start) is named, with the way out, instead of a bare BrokenProcessPool."""
    import os

    from metamorph_toy.demo import StageClock, _two_lanes

    nothing = ("lm", print, ())
    with pytest.raises(RuntimeError, match="second lane .* died.*__main__"):
        _two_lanes(
            StageClock(), lambda m: None, lambda: "judge", [("encoder", os._exit, (3,))],
            ("decoder", print, ()), nothing, ("vpit", print, ()), 2,
        )  # fmt: skip


LANE_SCRIPT = """
import os, sys, time
from metamorph_toy.demo import StageClock, _two_lanes

if __name__ == "__main__":
    marker = sys.argv[1]
    wait = ("lm", time.sleep, (120,))
    _two_lanes(
        StageClock(), print, lambda: "judge", [("encoder", open, (marker, "w")), wait],
        ("decoder", print, ()), ("lm", print, ()), ("vpit", print, ()), 2,
    )
"""


@pytest.mark.skipif(
    not any(Path("/proc/self/task").glob("*/children")), reason="reads /proc's children (Linux)"
)
def test_a_demo_killed_without_warning_takes_its_second_lane_with_it(tmp_path):
    """``kill -9`` of the demo (no chance to stop its lane) ends the lane's process too,
    instead of leaving it to train on as an orphan."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script, marker = tmp_path / "lanes.py", tmp_path / "lane-started"
    script.write_text(LANE_SCRIPT)
    demo = subprocess.Popen([sys.executable, str(script), str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():  # the lane's process is up and in its stages
            assert demo.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        children = Path(f"/proc/{demo.pid}/task/{demo.pid}/children").read_text().split()
        lanes = [int(c) for c in children]
        assert lanes
    finally:
        demo.send_signal(signal.SIGKILL)
        demo.wait()

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state != "Z"  # a zombie has ended (its parent has not reaped it yet)

    deadline = time.monotonic() + 15
    while any(alive(p) for p in lanes) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in lanes if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, "the second lane outlived the demo's process"
