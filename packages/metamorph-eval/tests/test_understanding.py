"""`metamorph eval understanding`: the JSONL layout, the benchmarks' scoring rules, batched
answers equal one at a time, resume, refusal of changed settings, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from metamorph_core import MetaMorphModel
from metamorph_core.cli import main
from metamorph_core.testing import tiny_model_config
from metamorph_core.testing.trained import train
from metamorph_eval import scoring
from metamorph_eval.records import RecordError, read_records
from metamorph_eval.tasks import MultipleChoiceTask, guess_task


def test_vqa_accuracy_follows_the_vqa_rules():
    humans = ["two"] * 3 + ["2"] * 1 + ["three"] * 6  # "two" and "2" are one answer
    assert scoring.vqa_accuracy("2", humans) == 1.0
    assert scoring.vqa_accuracy("Three.", humans) == 1.0
    # one human said it: in 9 of the 10 leave-one-out subsets 1/3, in the other 0
    assert scoring.vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.9 / 3)
    assert scoring.vqa_accuracy("a dog", ["dog"]) == 1.0  # articles dropped
    assert scoring.normalize_vqa_answer("Yes, it isnt!") == "yes it isn't"
    assert scoring.normalize_vqa_answer("1,000 Cats.") == "1000 cats"


def test_vqa_normalisation_matches_lmms_evals_on_plain_answers():
    lmms = pytest.importorskip("lmms_eval.tasks._task_utils.vqa_eval_metric")
    ref = lmms.EvalAIAnswerProcessor()
    # EvalAI's processor also splits "'s" into its own word; the official VQA script (ours)
    # does not, so possessives are left out here
    for text in ["Two", "the Cat.", "dont know", "3.5", "1,000", "A red-car", "10 a.m.", "none"]:
        assert scoring.normalize_vqa_answer(text) == ref(text), text


@pytest.mark.parametrize(
    "output, choice",
    [
        ("B", "B"),
        ("(C) a dog", "C"),
        ("B. blue", "B"),
        ("The answer is A.", "A"),
        ("I think it is blue", "B"),  # the text of exactly one option
        ("red or blue", None),  # two options' texts
        ("E", None),  # not an option
        ("", None),
    ],
)
def test_choice_extraction(output, choice):
    assert scoring.extract_choice(output, {"A": "red", "B": "blue", "C": "a dog"}) == choice


def test_circular_evaluation_rotates_options_and_needs_every_rotation():
    variants = scoring.circular_variants({"A": "red", "B": "blue", "C": "green"}, "B")
    assert variants == [
        ({"A": "red", "B": "blue", "C": "green"}, "B"),
        ({"A": "blue", "B": "green", "C": "red"}, "A"),
        ({"A": "green", "B": "red", "C": "blue"}, "C"),
    ]
    assert scoring.circular_correct([True, True, True]) == 1.0
    assert scoring.circular_correct([True, False, True]) == 0.0


def _record(i, **kw):
    return {"id": f"q{i}", "question": "What colour is the shape?", "image": "red.png", **kw}


def test_the_jsonl_layout_and_its_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [
        _record(0, answer="red"),
        _record(1, answers=["red", "dark red"]),
        _record(2, options=["red", "blue"], answer="a"),  # a list: lettered A, B
        {"id": 3, "question": "two plus three?", "answer": 5},  # text only; numbers as text
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_records(path)
    assert [r.id for r in records] == ["q0", "q1", "q2", "3"]
    assert records[2].options == {"A": "red", "B": "blue"} and records[2].answers == ["A"]
    assert records[3].images == [] and records[3].answers == ["5"]
    assert guess_task(records[:1]) == "exact-match" and guess_task(records) == "multiple-choice"
    assert guess_task(records[:2]) == "vqa"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_record(0, answer="red")) + "\n" + json.dumps(_record(1)) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:2 \(id 'q1'\): no 'answer' or 'answers'"):
        read_records(bad)
    counts = {}
    assert [r.id for r in read_records(bad, "skip", counts)] == ["q0"]
    assert counts == {"bad_records": 1}
    bad.write_text(
        json.dumps(_record(0, answer="red")) * 1 + "\n" + json.dumps(_record(0, answer="x"))
    )
    with pytest.raises(RecordError, match="id 'q0' repeats"):
        read_records(bad, "skip")
    bad.write_text(json.dumps(_record(0, options=["a", "b"], answer="C")))
    with pytest.raises(RecordError, match="must be one of its option letters"):
        read_records(bad)


COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9)}


@pytest.fixture(scope="module")
def bench(tmp_path_factory, backbone_dirs):
    """A tiny trained checkpoint and a local benchmark: the trained model's own questions."""
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    model = train(MetaMorphModel.from_config(tiny_model_config(backbone_dirs["llama"])))
    ckpt = model.save_pretrained(root / "ckpt")
    (root / "images").mkdir()
    for name, rgb in COLOURS.items():
        arr = (np.array(rgb) * 255).astype(np.uint8)
        Image.fromarray(np.tile(arr, (16, 16, 1))).save(root / "images" / f"{name}.png")
    rows = [
        {"id": f"{name}", "question": "what colour is the shape?", "image": f"{name}.png",
         "answer": "the shape is red.", "category": "colour"}
        for name in COLOURS
    ]  # fmt: skip
    rows.append({"id": "sum", "question": "two plus three", "answer": "five"})  # text only
    (root / "exact.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mc = [
        {"id": f"m{k}", "question": "two plus three", "options": ["five", "six", "seven"],
         "answer": "A"}
        for k in range(2)
    ]  # fmt: skip
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    return root, ckpt


def _run(root, ckpt, out, *extra):
    return main(
        ["eval", "understanding", "--model", str(ckpt), "--image-root", str(root / "images"),
         "--out", str(out), *extra]
    )  # fmt: skip


def test_answers_are_scored_and_recorded(bench, tmp_path, capsys):
    root, ckpt = bench
    assert _run(root, ckpt, tmp_path / "o", "--tasks", str(root / "exact.jsonl")) == 0
    run = tmp_path / "o" / "exact-match"
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["id"] for s in samples] == ["red", "green", "blue", "sum"]
    model = MetaMorphModel.from_pretrained(ckpt).eval()
    for s in samples:  # the recorded answer is the model's greedy answer to that prompt
        images = [] if s["id"] == "sum" else [str(root / "images" / f"{s['id']}.png")]
        (want,) = model.generate(s["prompt"], images, max_new_tokens=32)
        assert s["output"] == want.text
        assert s["score"] == scoring.exact_match(s["output"], s["answers"])
    results = json.loads((run / "results.json").read_text())
    acc = results["metrics"]["accuracy"]
    assert acc["n"] == 4 and acc["value"] == sum(s["score"] for s in samples) / 4
    assert acc["ci95"][0] <= acc["value"] <= acc["ci95"][1]
    assert set(results["metrics"]["per_category"]) == {"colour"}
    recorded = json.loads((run / "run.json").read_text())
    assert recorded["model"]["fingerprint"] and recorded["versions"]["metamorph-eval"]
    assert "accuracy" in capsys.readouterr().out


def test_batched_equals_one_at_a_time_and_resume_skips_finished(bench, tmp_path):
    root, ckpt = bench
    tasks = ["--tasks", f"exact-match={root / 'exact.jsonl'}"]
    assert _run(root, ckpt, tmp_path / "b4", *tasks, "--batch-size", "4") == 0
    assert _run(root, ckpt, tmp_path / "b1", *tasks, "--batch-size", "1") == 0
    read = lambda d: [  # noqa: E731
        json.loads(x) for x in (d / "exact-match" / "samples.jsonl").read_text().splitlines()
    ]
    assert [s["output"] for s in read(tmp_path / "b4")] == [
        s["output"] for s in read(tmp_path / "b1")
    ]
    # a run stopped after two samples: the rerun asks only the other two
    import shutil

    from metamorph_eval.harness import evaluate_understanding
    from metamorph_eval.tasks import ExactMatchTask

    shutil.copytree(tmp_path / "b4", tmp_path / "part")
    lines = (tmp_path / "part" / "exact-match" / "samples.jsonl").read_text().splitlines()
    (tmp_path / "part" / "exact-match" / "samples.jsonl").write_text("\n".join(lines[:2]) + "\n")
    model = MetaMorphModel.from_pretrained(ckpt).eval()
    asked = []

    class Counting:
        def generate(self, convs, **kw):
            asked.extend(c.id for c in convs)
            return model.generate(convs, **kw)

    recorded = json.loads((tmp_path / "part" / "exact-match" / "run.json").read_text())
    evaluate_understanding(
        Counting(),
        ExactMatchTask(),
        read_records(root / "exact.jsonl"),
        tmp_path / "part" / "exact-match",
        image_root=root / "images",
        batch_size=4,
        model_id=recorded["model"],
        data_id=recorded["data"],
        log=None,
    )
    assert asked == ["blue", "sum"]
    assert read(tmp_path / "part") == read(tmp_path / "b4")
    # the number of records asked is part of the run: another --limit is refused
    assert _run(root, ckpt, tmp_path / "part", *tasks, "--limit", "2") == 2


def test_a_rerun_with_other_settings_is_refused(bench, tmp_path, capsys):
    root, ckpt = bench
    tasks = ["--tasks", f"exact-match={root / 'exact.jsonl'}"]
    assert _run(root, ckpt, tmp_path / "o", *tasks) == 0
    assert _run(root, ckpt, tmp_path / "o", *tasks, "--max-new-tokens", "4") == 2
    err = capsys.readouterr().err
    assert "holds an evaluation run with other settings" in err and "max_new_tokens" in err


def test_multiple_choice_is_circular(bench, tmp_path):
    root, ckpt = bench
    assert _run(root, ckpt, tmp_path / "mc", "--tasks", str(root / "mc.jsonl")) == 0
    run = tmp_path / "mc" / "multiple-choice"
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["id"] for s in samples] == ["m0@0", "m0@1", "m0@2", "m1@0", "m1@1", "m1@2"]
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    by_question = {}
    for s in samples:
        by_question.setdefault(s["record_id"], []).append(s["score"] == 1.0)
    want = sum(all(v) for v in by_question.values()) / 2
    assert metrics["accuracy"]["value"] == want == metrics["circular_accuracy"]["value"]
    assert metrics["accuracy_of_rotations"]["n"] == 6
    task = MultipleChoiceTask(circular=False)
    records = read_records(root / "mc.jsonl")
    assert [s.id for s in task.samples(records[0])] == ["m0"]


def test_bad_input_is_named_or_skipped(bench, tmp_path, capsys):
    root, ckpt = bench
    rows = [
        {"id": "ok", "question": "two plus three", "answer": "five"},
        {"id": "lost", "question": "what colour?", "image": "missing.png", "answer": "red"},
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--tasks", str(tmp_path / "t.jsonl")]
    assert _run(root, ckpt, tmp_path / "a", *args) == 2
    assert "record 'lost': image 'missing.png' not found" in capsys.readouterr().err
    assert _run(root, ckpt, tmp_path / "b", *args, "--on-error", "skip") == 0
    results = json.loads((tmp_path / "b" / "exact-match" / "results.json").read_text())
    assert results["skipped"] == {"bad_images": 1} and results["samples"] == 1
    assert _run(root, ckpt, tmp_path / "c", "--tasks", f"nope={tmp_path / 't.jsonl'}") == 2
    assert "unknown eval_task 'nope'. Known eval_tasks:" in capsys.readouterr().err
