"""Stage ``world`` of a demo run: every training file of the run rendered from the toy world
(``OUT/data``): image-caption pairs for the encoder, images for the decoder, the VPiT
conversations (understanding, generation, text-only) and the language model's text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from metamorph_toy import world as W
from metamorph_toy.presets import Options, Preset


def _save(image: np.ndarray, root: Path, name: str) -> str:
    Image.fromarray(image).save(root / name)
    return name


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_world(out: Path, preset: Preset, options: Options) -> dict[str, Any]:
    """Render every training file of a run; returns the splits and file paths."""
    rng = np.random.default_rng(options.seed)
    splits = W.make_splits(options.seed, preset.held_out)
    data = out / "data"
    images = data / "images"
    images.mkdir(parents=True, exist_ok=True)
    scenes = W.all_scenes()
    allowed = splits.train_generation

    def pick(pool: list[W.Scene]) -> W.Scene:
        return pool[int(rng.integers(len(pool)))]

    # encoder pretraining: captions of any scene (understanding, not generation targets)
    pairs = []
    for k in range(preset.images):
        s = pick(scenes)
        pairs.append(
            {"image": _save(W.render(s, rng), images, f"pair-{k:05d}.png"), "caption": s.caption()}
        )
    # decoder training: images of the scenes allowed as generation targets only
    decoder = []
    for k in range(preset.images):
        s = pick(allowed)
        decoder.append({"image": _save(W.render(s, rng), images, f"dec-{k:05d}.png")})
    understanding = []
    asked = question_cycle(preset.question_mix)
    if options.understanding_data:
        for k in range(preset.understanding):
            s = pick(scenes)
            attribute = asked[k % len(asked)]
            understanding.append(
                {
                    "id": f"u{k}",
                    "image": _save(W.render(s, rng), images, f"u-{k:05d}.png"),
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{W.QUESTIONS[attribute]}"},
                        {"from": "gpt", "value": W.answer(s, attribute)},
                    ],
                }
            )
    generation = []
    for k in range(options.generation if options.generation is not None else preset.generation):
        s = pick(allowed)
        opened = preset.open_requests and rng.random() < preset.open_requests
        left = W.ATTRIBUTES[k % len(W.ATTRIBUTES)] if opened else None
        generation.append(
            {
                "id": f"g{k}",
                "image": _save(W.render(s, rng), images, f"g-{k:05d}.png"),
                "conversations": [
                    {"from": "human", "value": W.generation_prompt(s, k, left)},
                    {"from": "gpt", "value": W.generation_answer(s, preset.restate)},
                ],
            }
        )
    text = _text_conversations(options, preset.restate) * preset.text_repeats
    lm_text = []
    if options.text_facts:  # the facts, and requests by concept resolved into plain words
        lm_text += [{"text": t} for t in W.facts()]
        lm_text += [{"text": f"{q} {a}"} for q, a in W.concept_resolutions(preset.restate)]
    lm_text += [{"text": f"{c}."} for s in scenes for c in (s.caption(), s.framed_caption())]
    lm_text += [
        {"text": f"{q} {v}."} for q in W.QUESTIONS.values() for v in W.SHAPES + tuple(W.COLOURS)
    ]
    # the instructions' wording, as a pretrained LLM knows it: without it the tokenizer spells
    # "Generate" and the answer letter by letter and the LM has never read them (measured:
    # VPiT then ignored "top" / "bottom"; with it, position from generated tokens 0.53 ->
    # 1.00). Training-generation scenes only, and text alone: nothing held out leaks
    lm_text += [
        {"text": f"{W.generation_prompt(s, k)} {W.restatement(s, preset.restate)}"}
        for s in allowed
        for k in range(len(W.GENERATION_TEMPLATES))
    ]
    files = {
        "pairs": _jsonl(data / "pairs.jsonl", pairs),
        "decoder": _jsonl(data / "decoder.jsonl", decoder),
        "understanding": _jsonl(data / "understanding.jsonl", understanding),
        "generation": _jsonl(data / "generation.jsonl", generation),
        "text": _jsonl(data / "text.jsonl", text),
        "lm_text": _jsonl(data / "lm_text.jsonl", lm_text),
    }
    everything = [{"image": r["image"]} for r in pairs + decoder + understanding + generation]
    files["all_images"] = _jsonl(data / "all_images.jsonl", everything)
    return {"splits": splits, "files": files, "images": images}


def question_cycle(mix: tuple[int, ...]) -> list[str]:
    """The attributes the understanding questions ask about, in the order they cycle: ``mix``
    of each of :data:`~.world.ATTRIBUTES` (``(2, 1, 1, 3)``: shape, shape, colour, size,
    position, position, position)."""
    if len(mix) != len(W.ATTRIBUTES) or min(mix) < 0 or not sum(mix):
        raise ValueError(
            f"question_mix {mix!r}: give a count >= 0 for each of {W.ATTRIBUTES}, not all 0"
        )
    return [a for a, n in zip(W.ATTRIBUTES, mix, strict=True) for _ in range(n)]


def _text_conversations(options: Options, restate: bool) -> list[dict[str, Any]]:
    """Text-only VPiT conversations: the facts as questions and answers, and requests and
    descriptions by concept resolved into attributes (:func:`~.world.concept_resolutions`). No
    image ever comes with them."""
    if not options.text_facts:
        return []
    rows = []
    for colour, concepts in W.COLOUR_CONCEPTS.items():
        for c in concepts:
            rows.append((f"What colour is {c}?", colour))
    for shape, phrases in W.SHAPE_CONCEPTS.items():
        for p in phrases:
            rows.append((f"Which shape is a {p}?", shape))
    for fact in W.facts():
        rows.append(("Tell me a fact.", fact))
    rows += W.concept_resolutions(restate)
    return [
        {
            "id": f"t{k}",
            "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
        }
        for k, (q, a) in enumerate(rows)
    ]


__all__ = ["question_cycle", "write_world"]
