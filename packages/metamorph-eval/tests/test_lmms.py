"""The ``metamorph`` model for lmms-eval, offline: lmms-eval's own command runs local tasks (its
YAML task format over JSONL files we write, with PNG images) on a tiny trained checkpoint, and
its answers and scores must equal ``metamorph eval understanding``'s on the same file; the
model's ``loglikelihood`` must equal the model's training loss on the same tokens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance, unwrap_generation_output  # noqa: E402
from PIL import Image  # noqa: E402

from metamorph_core import MetaMorphModel  # noqa: E402
from metamorph_core.cli import main as metamorph_main  # noqa: E402
from metamorph_core.conversation import Conversation, ImageFeatures, Turn  # noqa: E402
from metamorph_core.testing.tiny import save_tiny_backbone, tiny_model_config  # noqa: E402
from metamorph_core.testing.trained import train  # noqa: E402
from metamorph_core.vision import to_tensor  # noqa: E402
from metamorph_eval import lmms as lmms_plugin  # noqa: E402
from metamorph_eval.lmms.inputs import (  # noqa: E402
    as_images,
    generation_options,
    plan_batches,
    prompt_text,
)
from metamorph_eval.lmms.model import MetaMorphLMMS  # noqa: E402

HERE = Path(__file__).resolve().parent
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
COLOURS = {"red": (230, 25, 25), "blue": (25, 50, 230), "green": (25, 200, 50)}

# metamorph-eval's JSONL layout; "images" is a list in every record so the JSON loader of
# lmms-eval (HF datasets) sees one schema
EXACT = [
    {"id": "r", "question": "what colour is the shape?", "images": ["red.png"],
     "answer": "the shape is red."},
    {"id": "b", "question": "what colour is the shape?", "images": ["blue.png"],
     "answer": "the shape is blue."},
    {"id": "g", "question": "look: <image> what colour is the shape?", "images": ["green.png"],
     "answer": "the shape is green."},
    {"id": "two", "question": "<image> and <image>: what colour is the shape?",
     "images": ["red.png", "blue.png"], "answer": "red"},
    {"id": "sum", "question": "two plus three", "images": [], "answer": "five"},
    {"id": "sides", "question": "a square has how many sides", "images": [], "answer": "four"},
]  # fmt: skip
CHOICE = [
    {"id": "c1", "question": "two plus three", "images": [], "options": ["five", "six"],
     "answer": "A"},
    {"id": "c2", "question": "what colour is the shape?", "images": ["red.png"],
     "options": ["the shape is blue.", "the shape is red.", "green"], "answer": "B"},
    {"id": "c3", "question": "what colour is the shape?", "images": ["blue.png"],
     "options": ["the shape is blue.", "the shape is red."], "answer": "A"},
]  # fmt: skip


def _yaml(task: str, data: Path, body: str) -> str:
    return (
        f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(data))}\ntest_split: test\n"
        "doc_to_visual: !function lmms_task_utils.doc_to_visual\ndoc_to_text: question\n"
        f"{body}metadata:\n  version: 0.0\n"
    )


EXACT_BODY = """output_type: generate_until
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 32
  until: []
  temperature: 0
  do_sample: false
process_results: !function lmms_task_utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""
CHOICE_BODY = """output_type: multiple_choice
doc_to_choice: options
doc_to_target: !function lmms_task_utils.answer_index
target_delimiter: ""
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny trained checkpoint and a task directory: the records as JSONL, their PNG images,
    the lmms-eval task YAML files over the same JSONL and their task functions."""
    root = tmp_path_factory.mktemp("lmms")
    torch.manual_seed(0)
    model = MetaMorphModel.from_config(tiny_model_config(save_tiny_backbone(root / "backbone")))
    ckpt = train(model, steps=30).save_pretrained(root / "ckpt")
    tasks = root / "tasks"
    (tasks / "images").mkdir(parents=True)
    for name, rgb in COLOURS.items():
        pixels = np.zeros((20, 20, 3), np.uint8)
        pixels[4:16, 4:16] = rgb  # a square on black, not the encoder's size: it resizes
        Image.fromarray(pixels).save(tasks / "images" / f"{name}.png")
    for name, rows, body in (("exact", EXACT, EXACT_BODY), ("choice", CHOICE, CHOICE_BODY)):
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"mm_{name}.yaml").write_text(_yaml(f"mm_{name}", data, body))
    shutil.copy(HERE / "lmms_task_utils.py", tasks / "lmms_task_utils.py")
    return {"root": root, "ckpt": ckpt, "tasks": tasks}


@pytest.fixture(scope="module")
def lmms_run(bench: dict[str, Path]) -> dict[str, object]:
    """lmms-eval's command line, as a user types it, on both local tasks: its results and
    logged samples per task."""
    out = bench["root"] / "lmms-out"
    args = [
        "--model", "metamorph", "--model_args", f"pretrained={bench['ckpt']},dtype=float32",
        "--tasks", "mm_exact,mm_choice", "--include_path", str(bench["tasks"]),
        "--batch_size", "2", "--device", "cpu", "--output_path", str(out), "--log_samples",
        "--verbosity", "WARNING", "--process_docs_parallel", "1",
    ]  # fmt: skip
    env = {**os.environ, **OFFLINE, "HF_HOME": str(bench["root"] / "hf")}
    began = time.perf_counter()
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lmms-eval")), *args],  # what users type
        cwd=bench["root"], env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    took = time.perf_counter() - began
    log = f"exit {done.returncode} after {took:.1f}s\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    results = sorted(out.rglob("*_results.json"))  # lmms-eval logs errors and exits 0
    assert done.returncode == 0 and results, log
    samples = {}
    for task in ("mm_exact", "mm_choice"):
        (path,) = out.rglob(f"*_samples_{task}.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        samples[task] = sorted(rows, key=lambda r: r["doc_id"])
    return {"results": json.loads(results[-1].read_text())["results"], "samples": samples}


@pytest.fixture(scope="module")
def our_run(bench: dict[str, Path]) -> dict[str, object]:
    """``metamorph eval understanding`` on the same JSONL: its scored samples and results."""
    out = bench["root"] / "ours"
    code = metamorph_main(
        ["eval", "understanding", "--model", str(bench["ckpt"]),
         "--tasks", f"exact-match={bench['tasks'] / 'exact.jsonl'}",
         "--image-root", str(bench["tasks"] / "images"), "--out", str(out), "--batch-size", "2"]
    )  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in (out / "exact-match" / "samples.jsonl").open()]
    return {"samples": rows, "results": json.loads((out / "results.json").read_text())}


@pytest.fixture(scope="module")
def lm(bench: dict[str, Path]) -> MetaMorphLMMS:
    """The lmms-eval model on the checkpoint, in this process."""
    return MetaMorphLMMS(pretrained=str(bench["ckpt"]), device="cpu", batch_size=2)


def test_lmms_eval_finds_the_model_through_our_entry_point():
    from lmms_eval import models

    assert models.get_model_manifest("metamorph") == lmms_plugin.manifest()
    assert models.get_model("metamorph") is MetaMorphLMMS


def test_the_plugin_imports_without_lmms_eval_and_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
):
    script = (
        "import sys; sys.modules['lmms_eval'] = None\n"  # as if it were not installed
        "import metamorph_eval.lmms as m\n"
        "assert m.MODEL_ID == 'metamorph' and 'torch' not in sys.modules\n"
        "try:\n    m.MetaMorphLMMS\nexcept ImportError as e:\n    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "pip install 'metamorph-eval[lmms]'" in done.stdout
    monkeypatch.setitem(sys.modules, "lmms_eval", None)
    with pytest.raises(ImportError, match=r"pip install 'metamorph-eval\[lmms\]'"):
        lmms_plugin.manifest()


def test_lmms_eval_and_our_harness_give_the_same_answers_and_scores(lmms_run, our_run):
    ours = our_run["samples"]
    theirs = lmms_run["samples"]["mm_exact"]
    assert [r["id"] for r in ours] == [r["id"] for r in EXACT]  # our harness keeps file order
    for record, mine, row in zip(EXACT, ours, theirs, strict=True):
        # both routes ask the same: our task's prompt is the model's layout of lmms' context
        assert mine["prompt"] == prompt_text(row["input"], len(record["images"]))
        assert row["input"] == record["question"]
        assert row["filtered_resps"] == mine["output"], record["id"]
        assert row["accuracy"] == mine["score"]
    assert any(r["output"].strip() for r in ours)
    value = our_run["results"]["exact-match"]["metrics"]["accuracy"]["value"]
    assert lmms_run["results"]["mm_exact"]["accuracy,none"] == pytest.approx(value, abs=1e-12)
    assert 0 < value < 1  # the trained model gets some right, some wrong


def _answer_loss(model: MetaMorphModel, record: dict, answer: str, root: Path) -> float:
    """By hand, through the training forward: the mean loss of ``answer``'s tokens as the
    assistant's turn (its end-of-turn token left out)."""
    images = [to_tensor(root / p) for p in record["images"]]
    question = prompt_text(record["question"], len(images))
    conv = Conversation([Turn("user", question), Turn("assistant", answer)], images)
    batch = model.prepare_batch([conv])
    labels = batch["labels"]
    last = int((labels[0] != -100).nonzero().max())
    assert int(labels[0, last]) == model.backbone.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    labels[0, last] = -100
    with torch.no_grad():
        return float(model(**batch).text_loss)


def test_multiple_choice_through_lmms_eval_matches_the_training_loss(bench, lmms_run, lm):
    rows = lmms_run["samples"]["mm_choice"]
    right = []
    for record, row in zip(CHOICE, rows, strict=True):
        losses = [
            _answer_loss(lm.model, record, o, bench["tasks"] / "images") for o in record["options"]
        ]
        logged = [float(value) for value, _ in row["filtered_resps"]]
        assert logged == pytest.approx(losses, abs=1e-4)
        right.append(float(int(np.argmin(losses)) == "ABC".index(record["answer"])))
        assert row["acc"] == right[-1]
    assert lmms_run["results"]["mm_choice"]["acc,none"] == pytest.approx(np.mean(right))


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    meta = {"task": "t", "doc_id": 0, "repeats": 1}
    return [Instance(kind, a, idx=0, metadata=meta) for a in args]


def _docs(lm: MetaMorphLMMS, bench: dict[str, Path], records: list[dict]) -> None:
    root = bench["tasks"] / "images"
    lm.task_dict = {"t": {"test": [{**r, "_root": str(root)} for r in records]}}


def _visuals(doc: dict) -> list:
    return [Image.open(Path(doc["_root"]) / p).convert("RGB") for p in doc["images"]]


def test_loglikelihood_values_and_greedy_flags(bench, lm):
    _docs(lm, bench, EXACT)
    model = lm.model
    greedy = model.generate("two plus three", max_new_tokens=8)[0].text
    args = [
        ("two plus three", greedy, _visuals, 4, "t", "test"),
        ("two plus three", "six", _visuals, 4, "t", "test"),
        ("what colour is the shape?", "the shape is red.", _visuals, 0, "t", "test"),
        ("", "five"),  # lmms-eval's unconditional request: no document, no images
    ]
    got = [
        unwrap_generation_output(x)[0] for x in lm.loglikelihood(_requests("loglikelihood", args))
    ]
    records = [EXACT[4], EXACT[4], EXACT[0], {"question": "", "images": []}]
    root = bench["tasks"] / "images"
    for (_, cont, *_), record, (value, _) in zip(args, records, got, strict=True):
        assert value == pytest.approx(_answer_loss(model, record, cont, root), abs=1e-4)
    assert [g for _, g in got[:2]] == [True, False]
    lm.loglikelihood_value = "logprob"
    try:
        summed = [
            unwrap_generation_output(x)[0][0]
            for x in lm.loglikelihood(_requests("loglikelihood", args[:1]))
        ]
    finally:
        lm.loglikelihood_value = "loss"
    count = len(model.sequence_builder.text_ids(greedy))
    assert summed[0] == pytest.approx(-got[0][0] * count, abs=1e-4)


def test_generate_until_batches_in_any_order_and_stops_at_until(bench, lm):
    _docs(lm, bench, EXACT)
    greedy = {"max_new_tokens": 12, "temperature": 0, "do_sample": False, "top_p": 1.0}
    args = [(EXACT[i]["question"], dict(greedy), _visuals, i, "t", "test") for i in (4, 0, 2, 5, 3)]
    args.append(("two plus three", {**greedy, "until": ["v"]}, _visuals, 4, "t", "test"))
    got = lm.generate_until(_requests("generate_until", args))
    for (context, _, _, i, *_), text in zip(args[:-1], got[:-1], strict=True):
        images = [to_tensor(bench["tasks"] / "images" / p) for p in EXACT[i]["images"]]
        conv = Conversation([Turn("user", prompt_text(context, len(images)))], images)
        assert text == lm.model.generate([conv], max_new_tokens=12)[0].text
    assert got[0] == "five" and got[-1] == "fi"  # cut before the stop string


def test_multi_round_asks_each_round_and_can_keep_the_history(bench, lm):
    _docs(lm, bench, EXACT)

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        if round_idx == 2:
            return None, None, True, previous_output, None
        return [], "two plus three", False, previous_output, {"seen": previous_output}

    greedy = {"max_new_tokens": 8, "temperature": 0}
    args = [(EXACT[0]["question"], greedy, _visuals, doc_to_text, 0, "t", "test")]
    (answers,) = lm.generate_until_multi_round(_requests("generate_until_multi_round", args))
    first = lm.generate_until(_requests("generate_until", [(*args[0][:3], 0, "t", "test")]))
    assert answers == [first[0], "five"]
    lm.multi_round_history = True
    try:
        (kept,) = lm.generate_until_multi_round(_requests("generate_until_multi_round", args))
    finally:
        lm.multi_round_history = False
    image = to_tensor(bench["tasks"] / "images" / "red.png")
    turns = [Turn("user", prompt_text(EXACT[0]["question"], 1))]
    result = lm.model.generate([Conversation(turns, [image])], max_new_tokens=8)[0]
    turns += [Turn("assistant", result.text), Turn("user", "two plus three")]
    made = [ImageFeatures(t) for t in result.images]
    second = lm.model.generate([Conversation(turns, [image, *made])], max_new_tokens=8)[0]
    assert kept == [result.text, second.text]


def test_generation_options_and_batch_order():
    base = {"max_new_tokens": 5, "temperature": 0, "top_p": 1.0, "num_beams": 1, "until": "\n\n"}
    assert generation_options(base, 64) == {
        "max_new_tokens": 5,
        "stop": ("\n\n",),
        "do_sample": False,
    }
    assert generation_options({"do_sample": True, "temperature": 0}, 64)["do_sample"] is False
    sampled = generation_options({"temperature": 0.7, "top_p": 0, "until": ["", "x"]}, 64, seed=3)
    assert sampled == {
        "max_new_tokens": 64, "stop": ("x",), "do_sample": True, "temperature": 0.7, "seed": 3
    }  # fmt: skip
    assert generation_options({"do_sample": True}, 64)["temperature"] == 1.0
    with pytest.raises(ValueError, match="num_beams=4"):
        generation_options({"num_beams": 4}, 64)
    assert plan_batches([3, 9, 5, 9, 1], ["a", "a", "b", "a", "b"], 2) == [[1, 3], [0], [2, 4]]
    with pytest.raises(ValueError, match="not an image file"):
        as_images(["clip.mp4"], "task 't' doc 0")
    with pytest.raises(ValueError, match="task 't' doc 0: the question has 2 <image>"):
        prompt_text("<image><image> two", 1, "task 't' doc 0")
