"""The toy world's data keeps every test item out of training (issue #7's rules)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metamorph_toy import world as W
from metamorph_toy.presets import PRESETS, Options, Preset
from metamorph_toy.run_files import question_cycle, write_world

CONCEPTS = [c for cs in W.COLOUR_CONCEPTS.values() for c in cs] + [
    p for ps in W.SHAPE_CONCEPTS.values() for p in ps
]
SMALL = Preset(
    **{**PRESETS["micro"].__dict__, "images": 64, "understanding": 128, "open_requests": 0.25}
)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def texts(row):
    return [row.get("caption", "")] + [t["value"] for t in row.get("conversations", [])]


@pytest.mark.parametrize("facts", [True, False])
def test_concepts_only_in_text_and_held_out_scenes_never_targets(tmp_path, facts):
    world = write_world(tmp_path, SMALL, Options(seed=3, text_facts=facts))
    files, splits = world["files"], world["splits"]
    with_images = [r for n in ("pairs", "understanding", "generation") for r in rows(files[n])]
    assert with_images and all("image" in r for r in with_images)
    for r in with_images:
        for t in texts(r):
            assert not [c for c in CONCEPTS if c in t], (r, t)
    text_only = rows(files["text"]) + rows(files["lm_text"])
    mentions = [
        c for r in text_only for t in texts(r) + [r.get("text", "")] for c in CONCEPTS if c in t
    ]
    assert (set(mentions) == set(CONCEPTS)) if facts else not mentions
    # text naming a concept never names both a size and a position: no reasoning test prompt
    # (which names both) or its resolution is among the training texts, even as text
    for r in text_only:
        for t in texts(r) + [r.get("text", "")]:
            if any(c in t for c in CONCEPTS):
                sized = any(f" {w} " in t for w in W.SIZES)
                placed = " at the " in t or " in the centre" in t
                assert not (sized and placed), t
    answers = {W.generation_answer(s) for s in splits.train_generation}
    for r in rows(files["generation"]):  # each answer restates its request, then draws
        assert r["conversations"][1]["value"] in answers
    prompts = [r["conversations"][0]["value"] for r in rows(files["generation"])]
    for s in splits.test_generation:
        for k in range(len(W.GENERATION_TEMPLATES)):  # every phrasing of a held-out request
            assert W.generation_prompt(s, k) not in prompts
    trained = {  # every request is for an allowed scene, some leaving one attribute open
        W.generation_prompt(s, k, left)
        for s in splits.train_generation
        for k in range(len(W.GENERATION_TEMPLATES))
        for left in (None, *W.ATTRIBUTES)
    }
    assert set(prompts) <= trained
    full = {
        W.generation_prompt(s, k)
        for s in W.all_scenes()
        for k in range(len(W.GENERATION_TEMPLATES))
    }
    assert 0 < len(set(prompts) - full) < len(prompts) / 2  # open requests: some, a minority


def test_reasoning_prompts_differ_from_requests_only_by_concepts():
    rng = np.random.default_rng(0)
    s = W.Scene("triangle", "green", "large", "top")
    prompt = W.reasoning_prompt(s, rng)
    framed = W.generation_prompt(s, len(W.GENERATION_TEMPLATES) - 1)
    assert framed == "Generate an image of a large triangle in the colour green at the top."
    colour = next(c for c in W.COLOUR_CONCEPTS["green"] if c in prompt)
    shape = next(p for p in W.SHAPE_CONCEPTS["triangle"] if p in prompt)
    plain = prompt.replace(f"of {colour}", "green").replace(shape, "triangle")
    assert plain == framed


def test_the_papers_answers_without_restatements(tmp_path):
    preset = Preset(**{**SMALL.__dict__, "restate": False})
    files = write_world(tmp_path, preset, Options(seed=1))["files"]
    answers = {r["conversations"][1]["value"] for r in rows(files["generation"])}
    assert answers == {f"{W.PAPER_ANSWER} <image>"}
    said = [r["conversations"][1]["value"] for r in rows(files["text"])]
    said += [r["text"] for r in rows(files["lm_text"])]
    assert not [t for t in said if f"{W.ANSWER_LEAD} a " in t]  # no restatement anywhere


def test_question_mix_sets_how_often_each_attribute_is_asked(tmp_path):
    preset = Preset(**{**SMALL.__dict__, "question_mix": (2, 1, 1, 3)})
    files = write_world(tmp_path / "mix", preset, Options(seed=0))["files"]
    asked = [r["conversations"][0]["value"].split("\n", 1)[1] for r in rows(files["understanding"])]
    counts = {a: asked.count(W.QUESTIONS[a]) for a in W.ATTRIBUTES}
    # 128 questions cycling shape, shape, colour, size, position x 3 (18 cycles and 2 more)
    assert counts == {"shape": 38, "colour": 18, "size": 18, "position": 54}
    plain = write_world(tmp_path / "plain", SMALL, Options(seed=0))["files"]
    # the same images and scenes: only the questions asked of them differ
    images = [r["image"] for r in rows(files["understanding"])]
    assert images == [r["image"] for r in rows(plain["understanding"])]
    with pytest.raises(ValueError, match="question_mix"):
        question_cycle((1, 1, 1))
    with pytest.raises(ValueError, match="question_mix"):
        question_cycle((0, 0, 0, 0))


def test_guidance_needs_a_decoder_trained_on_the_null_context():
    with pytest.raises(ValueError, match="decoder_cond_dropout"):
        Preset(**{**SMALL.__dict__, "decoder_guidance": 2.0, "decoder_cond_dropout": 0.0})
    guided = Preset(**{**SMALL.__dict__, "decoder_guidance": 2.0, "decoder_cond_dropout": 0.1})
    assert guided.decoder_cond_dropout == 0.1


def test_a_preset_without_the_system_prompt_trains_vpit_on_conversations_without_one(
    tmp_path, monkeypatch
):
    from metamorph_core import Conversation, create
    from metamorph_toy import stages

    world = write_world(tmp_path, SMALL, Options(seed=0))
    files = {**world["files"], "images": world["images"]}
    recipes = []
    monkeypatch.setattr(stages, "_train", lambda path, tree: recipes.append(tree))
    conversation = Conversation.from_llava(rows(files["generation"])[0])
    rendered = {}
    for system_prompt in (True, False):
        preset = Preset(**{**SMALL.__dict__, "system_prompt": system_prompt})
        stages.train_vpit(tmp_path, preset, files, 0, steps=1)
        spec = recipes[-1]["model"]["template"]
        name, kwargs = (spec, {}) if isinstance(spec, str) else (spec["name"], spec["kwargs"])
        assert name == "chatml"
        rendered[system_prompt] = create("template", name, **kwargs).render(conversation)
    assert rendered[True].startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert rendered[False].startswith("<|im_start|>user\n")
    assert rendered[True].endswith(rendered[False])  # the same conversation, nothing else lost
