"""Scoring a toy-world run (the demo's ``eval`` stage): the metrics of ``metrics.json``, each
accuracy with its Wilson 95% interval and chance level, and ``report.md`` with PNG grids.

Everything judged from pixels goes through the independent judge (:mod:`.judge`), with the
scoring of the ``toy-judge`` task of ``metamorph eval images`` (:func:`.eval_task.judged`);
answers to questions are scored as the ``exact-match`` task of ``metamorph eval
understanding`` does. Everything in token space is compared with per-scene prototypes of the
encoder's tokens. The model is loaded from the run's saved checkpoints, as a user would load
it. The test sets are written to ``OUT/eval/`` in the layouts of ``metamorph eval``
(``understanding.jsonl`` with its images, ``generation.jsonl``), so that the scores can be
rerun from the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from metamorph_toy import world as W

if TYPE_CHECKING:
    from metamorph_toy.presets import Options, Preset


def _metric(k: int, n: int, chance: float) -> dict[str, Any]:
    from metamorph_toy.stats import wilson_interval

    low, high = wilson_interval(k, n)
    return {"value": k / max(n, 1), "ci95": [low, high], "n": n, "chance": chance}


def to_pixels(images: list[np.ndarray]) -> Any:
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def _batches(items: list[Any], size: int) -> Any:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Evaluator:
    """Scores a trained run. Everything judged from pixels goes through the judge; everything
    in token space is compared with per-scene prototypes of the encoder's tokens."""

    def __init__(self, out: Path, preset: Preset, options: Options, judge: Any, log: Any) -> None:
        import torch

        from metamorph_core import MetaMorphModel, create

        self.out, self.preset, self.options, self.judge, self.log = out, preset, options, judge, log
        self.model = MetaMorphModel.from_pretrained(out / "vpit" / "final").eval()
        # the decoder trained on the encoder's tokens; the one fine-tuned on the LLM's
        # predictions (stage ``tune``), when there is one, draws the generated images
        self.base = create("decoder", "sd-unet", pretrained=str(out / "decoder" / "final"))
        tuned = out / "decoder-tuned" / "final"
        self.tuned = create("decoder", "sd-unet", pretrained=str(tuned)) if tuned.is_dir() else None
        self.model.attach_decoder(self.tuned or self.base)
        self.rng = np.random.default_rng(options.seed + 7919)
        self.scenes = W.all_scenes()
        with torch.no_grad():  # prototypes: mean normalised tokens of 2 fresh renders a scene
            renders = [W.render(s, self.rng) for s in self.scenes for _ in range(2)]
            tokens = self.encode(renders).reshape(
                len(self.scenes), 2, -1, self.model.encoder.hidden_size
            )
        proto = torch.nn.functional.normalize(tokens.mean(1), dim=-1)  # (540, n, c)
        self.prototypes = proto
        self.flat = torch.nn.functional.normalize(proto.flatten(1), dim=-1)

    def encode(self, images: list[np.ndarray]) -> Any:
        import torch

        enc = self.model.encoder
        with torch.no_grad():
            return torch.cat([enc(enc.preprocess(to_pixels(b))) for b in _batches(images, 256)])

    def decode(self, tokens: Any, decoder: Any = None) -> Any:
        """Pixels of ``tokens`` drawn by ``decoder`` (default: the model's, the tuned one
        when there is one)."""
        import torch

        decoder = decoder or self.model.require_decoder()
        outs = [
            decoder.decode(
                b,
                steps=self.preset.sample_steps,
                guidance_scale=self.preset.decoder_guidance,
                seed=self.options.seed,
            )
            for b in torch.split(tokens, 64)
        ]
        return torch.cat(outs)

    def understanding(self) -> tuple[dict[str, Any], list[tuple[np.ndarray, str, str, str]]]:
        from metamorph_core.conversation import Conversation, Turn
        from metamorph_eval.scoring import exact_match

        items = []
        for k in range(self.preset.vqa_test):
            s = self.scenes[int(self.rng.integers(len(self.scenes)))]
            attribute = W.ATTRIBUTES[k % len(W.ATTRIBUTES)]
            items.append((W.render(s, self.rng), attribute, W.answer(s, attribute)))
        self._write_understanding(items)
        right, shown = 0, []
        asked: dict[str, list[bool]] = {a: [] for a in W.ATTRIBUTES}
        for batch in _batches(items, 32):
            convs = [
                Conversation(
                    [Turn("user", f"<image>\n{W.QUESTIONS[a]}")], images=[to_pixels([img])[0]]
                )
                for img, a, _ in batch
            ]
            results = self.model.generate(convs, max_new_tokens=8)
            for (img, a, truth), r in zip(batch, results, strict=True):
                said = r.text.strip().strip(".").lower()
                hit = bool(exact_match(r.text, [truth]))
                right += hit
                asked[a].append(hit)
                shown.append((img, W.QUESTIONS[a], said, truth))
        values = {"shape": W.SHAPES, "colour": W.COLOURS, "size": W.SIZES, "position": W.POSITIONS}
        chance = float(np.mean([1 / len(values[W.ATTRIBUTES[k % 4]]) for k in range(len(items))]))
        metric = _metric(right, len(items), chance)
        metric["per_attribute"] = {a: float(np.mean(v)) for a, v in asked.items() if v}
        return metric, shown

    def generate(self, prompts: list[str]) -> tuple[Any, list[str | None]]:
        """Answers to generation requests, as the world's answers go: the model restates the
        request in its own words (greedy text after "Here is", up to the colon), then draws
        with that restatement as the answer's prefix. Returns the visual tokens and the
        restatements (what follows "Here is"; ``None`` without ``Preset.restate``, where the
        image follows the paper's fixed answer text)."""
        import torch

        from metamorph_core.conversation import IMAGE_PLACEHOLDER

        tokens, said = [], []
        for batch in _batches(prompts, 32):
            if not self.preset.restate:  # the paper's answers: the image straight away
                results = self.model.generate_image(batch, response_prefix=f"{W.PAPER_ANSWER} ")
                tokens += [r.images[0] for r in results]
                said += [None] * len(batch)
                continue
            texts = self.model.generate(
                batch, response_prefix=W.ANSWER_LEAD, stop=(":",), max_new_tokens=32
            )
            # an image the model drew before its colon is not part of the restatement
            restated = [" ".join(r.text.replace(IMAGE_PLACEHOLDER, " ").split()) for r in texts]
            results = self.model.generate_image(
                batch, response_prefix=[f"{W.ANSWER_LEAD} {r}: " for r in restated]
            )
            tokens += [r.images[0] for r in results]
            said += restated
        return torch.stack(tokens), said

    def judged(self, pixels: Any, scenes: list[W.Scene]) -> tuple[int, list[dict[str, str]]]:
        from metamorph_toy.eval_task import judged

        scored = judged(self.judge, pixels, scenes)
        return sum(right for right, _ in scored), [found for _, found in scored]

    def _write_understanding(self, items: list[tuple[np.ndarray, str, str]]) -> None:
        """The questions in the layout of ``metamorph eval understanding`` (``exact-match``):
        ``OUT/eval/understanding.jsonl`` and its images under ``OUT/eval/``."""
        import json

        folder = self.out / "eval" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for k, (img, attribute, truth) in enumerate(items):
            Image.fromarray(img).save(folder / f"u-{k:05d}.png")
            rows.append(
                {
                    "id": f"u{k}",
                    "question": W.QUESTIONS[attribute],
                    "image": f"images/u-{k:05d}.png",
                    "answer": truth,
                    "category": attribute,
                }
            )
        (self.out / "eval" / "understanding.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )

    def write_generation(self, scenes: list[W.Scene], prompts: list[str]) -> None:
        """The generation test set in the layout of ``metamorph eval images`` (``toy-judge``):
        each prompt with its scene, and as the answer's start the right restatement (the
        demo's own protocol lets the model restate first; this file asks it to draw from the
        right words)."""
        import json
        from dataclasses import asdict

        rows = [
            {
                "id": f"g{k}",
                "prompt": prompt,
                "response_prefix": W.restatement(scene, self.preset.restate) + " ",
                "scene": asdict(scene),
            }
            for k, (scene, prompt) in enumerate(zip(scenes, prompts, strict=True))
        ]
        (self.out / "eval").mkdir(exist_ok=True)
        (self.out / "eval" / "generation.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )

    @staticmethod
    def per_attribute(preds: list[dict[str, str]], scenes: list[W.Scene]) -> dict[str, float]:
        """The share of images the judge found right in each attribute alone (diagnostic)."""
        from metamorph_toy.judge import correct

        return {
            a: float(np.mean([correct(p, s, (a,)) for p, s in zip(preds, scenes, strict=True)]))
            for a in W.ATTRIBUTES
        }

    def token_scores(self, tokens: Any, scenes: list[W.Scene]) -> dict[str, Any]:
        import torch

        index = torch.tensor([self.scenes.index(s) for s in scenes])
        flat = torch.nn.functional.normalize(tokens.flatten(1), dim=-1)
        nearest = (flat @ self.flat.T).argmax(1)
        hits = int((nearest == index).sum())
        target = self.prototypes[index]  # (b, n, c)
        cos = torch.nn.functional.cosine_similarity(tokens, target, dim=-1).mean().item()
        mean_token = torch.nn.functional.normalize(self.prototypes.mean(0, keepdim=True), dim=-1)
        baseline = (
            torch.nn.functional.cosine_similarity(mean_token.expand_as(target), target, dim=-1)
            .mean()
            .item()
        )
        return {
            "nn": _metric(hits, len(scenes), 1 / len(self.scenes)),
            "cosine": {"value": cos, "mean_token_baseline": baseline, "n": len(scenes)},
        }


def evaluate(
    out: Path, preset: Preset, options: Options, splits: W.Splits, judge: Any, log: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics, and the material for the report."""
    import torch

    ev = Evaluator(out, preset, options, judge, log)
    chance_all = 1 / len(ev.scenes)
    metrics: dict[str, Any] = {}
    metrics["understanding_accuracy"], vqa = ev.understanding()

    test = [
        splits.test_generation[k % len(splits.test_generation)]
        for k in range(preset.generation_test)
    ]
    prompts = [W.generation_prompt(s, k) for k, s in enumerate(test)]
    ev.write_generation(test, prompts)
    tokens, said = ev.generate(prompts)
    if preset.restate:
        metrics["generation_restatement_accuracy"] = _restated(said, test)
    pixels = ev.decode(tokens)
    hits, preds = ev.judged(pixels, test)
    metrics["generation_accuracy"] = _metric(hits, len(test), chance_all)
    metrics["generation_accuracy"]["per_attribute"] = ev.per_attribute(preds, test)
    scores = ev.token_scores(tokens, test)
    metrics["token_nearest_neighbour_accuracy"] = scores["nn"]
    metrics["visual_token_cosine"] = scores["cosine"]

    reasoning = [
        ev.scenes[int(ev.rng.integers(len(ev.scenes)))] for _ in range(preset.reasoning_test)
    ]
    r_prompts = [W.reasoning_prompt(s, ev.rng) for s in reasoning]
    r_tokens, r_said = ev.generate(r_prompts)
    if preset.restate:
        metrics["reasoning_restatement_accuracy"] = _restated(r_said, reasoning)
    r_pixels = ev.decode(r_tokens)
    r_hits, r_preds = ev.judged(r_pixels, reasoning)
    metrics["reasoning_generation_accuracy"] = _metric(r_hits, len(reasoning), chance_all)
    metrics["reasoning_generation_accuracy"]["per_attribute"] = ev.per_attribute(r_preds, reasoning)

    renders = [W.render(s, ev.rng) for s in test]
    truth_tokens = ev.encode(renders)
    recon_hits, recon_preds = ev.judged(ev.decode(truth_tokens, ev.base), test)
    metrics["decoder_reconstruction_accuracy"] = _metric(recon_hits, len(test), chance_all)
    metrics["decoder_reconstruction_accuracy"]["per_attribute"] = ev.per_attribute(
        recon_preds, test
    )
    if ev.tuned is not None:  # the same tokens through the decoder that draws generations
        hits, tuned_preds = ev.judged(ev.decode(truth_tokens, ev.tuned), test)
        metrics["tuned_decoder_reconstruction_accuracy"] = _metric(hits, len(test), chance_all)
        metrics["tuned_decoder_reconstruction_accuracy"]["per_attribute"] = ev.per_attribute(
            tuned_preds, test
        )
    # negative control: tokens shuffled across images and positions, decoded, judged against
    # the scene the unshuffled tokens showed; a sound judge and decoder score ~chance
    g = torch.Generator().manual_seed(options.seed)
    flat = truth_tokens.reshape(-1, truth_tokens.shape[-1])
    shuffled = flat[torch.randperm(len(flat), generator=g)].reshape(truth_tokens.shape)
    shuffled_hits, _ = ev.judged(ev.decode(shuffled), test)
    metrics["control_shuffled_tokens_accuracy"] = _metric(shuffled_hits, len(test), chance_all)
    report = {
        "vqa": vqa[:16],
        "generation": list(zip(prompts[:16], said[:16], pixels[:16], preds[:16], strict=True)),
        "reasoning": list(
            zip(r_prompts[:16], r_said[:16], r_pixels[:16], r_preds[:16], strict=True)
        ),
        "reconstruction": (renders[:16], None),
    }
    return metrics, report


def _restated(said: list[str | None], scenes: list[W.Scene]) -> dict[str, Any]:
    """How often the model's restatement of a request is the scene's plain description,
    exactly (the text half of an answer; the picture is judged separately)."""
    hits = sum(s == scene.framed_caption() for s, scene in zip(said, scenes, strict=True))
    return _metric(hits, len(scenes), 1 / len(W.all_scenes()))


def _grid(images: list[Any], path: Path, scale: int = 3) -> str:
    """A row-major grid (8 wide) of images (tensors (3, h, w) in [0, 1] or uint8 arrays)."""
    arrays = []
    for img in images:
        if hasattr(img, "permute"):
            img = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        arrays.append(img)
    while len(arrays) % 8:
        arrays.append(np.full_like(arrays[0], 255))
    rows = [np.concatenate(arrays[i : i + 8], axis=1) for i in range(0, len(arrays), 8)]
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST
    ).save(path)
    return path.name


def write_report(out: Path, metrics: dict[str, Any], report: dict[str, Any]) -> Path:
    lines = [
        "# MetaMorph toy-world demo",
        "",
        f"Preset `{metrics['run']['preset']}`, seed {metrics['run']['seed']}.",
        "",
    ]
    lines += ["| metric | value | 95% CI | chance / baseline | n |", "|---|---|---|---|---|"]
    for key, m in metrics.items():
        if isinstance(m, dict) and "ci95" in m:
            lo, hi = m["ci95"]
            lines.append(
                f"| {key} | {m['value']:.3f} | {lo:.3f}–{hi:.3f} | {m['chance']:.3f} | {m['n']} |"
            )
    cos = metrics["visual_token_cosine"]
    lines.append(
        f"| visual_token_cosine | {cos['value']:.3f} | | mean token: {cos['mean_token_baseline']:.3f} | {cos['n']} |"
    )
    if "tuned_decoder_reconstruction_accuracy" in metrics:
        lines += [
            "",
            "Generated images are drawn by the decoder fine-tuned on the LLM's own predictions "
            "(`decoder-tuned`); `decoder_reconstruction_accuracy` is the decoder trained on the "
            "encoder's tokens, `tuned_decoder_reconstruction_accuracy` the tuned one, both from "
            "the encoder's tokens of fresh renders.",
        ]
    per = {
        k: m["per_attribute"]
        for k, m in metrics.items()
        if isinstance(m, dict) and "per_attribute" in m
    }
    if per:
        lines += [
            "",
            "Right in each attribute alone (understanding: by the attribute the question asks "
            "about; the others: judged from pixels):",
            "",
        ]
        lines += ["| metric | " + " | ".join(W.ATTRIBUTES) + " |", "|---" * 5 + "|"]
        lines += [
            f"| {k} | " + " | ".join(f"{v[a]:.3f}" for a in W.ATTRIBUTES) + " |"
            for k, v in per.items()
        ]
    lines += [
        "",
        "Seconds per stage: " + ", ".join(f"{k} {v}" for k, v in metrics["seconds"].items()),
    ]
    if "seconds_budget" in metrics:
        over = metrics["over_budget"]
        lines += [
            "",
            "Budget per stage (seconds): "
            + ", ".join(f"{k} {v}" for k, v in metrics["seconds_budget"].items())
            + (f"; over budget: {', '.join(over)}" if over else "; every stage within it"),
        ]
    lines.append("")
    for key, title in (
        ("generation", "Generation (held-out scenes)"),
        ("reasoning", "Reasoning into generation"),
    ):
        rows = report[key]
        name = _grid([p for _, _, p, _ in rows], out / f"{key}.png")
        lines += ["", f"## {title}", "", f"![{key}]({name})", ""]
        lines += [
            f"{i + 1}. {prompt} → "
            + (f"“{W.ANSWER_LEAD} {said}:” → " if said is not None else "")
            + f"judge: {_said(pred)}"
            for i, (prompt, said, _, pred) in enumerate(rows)
        ]
    vqa = report["vqa"]
    name = _grid([img for img, _, _, _ in vqa], out / "understanding.png")
    lines += ["", "## Understanding (held-out renders)", "", f"![understanding]({name})", ""]
    lines += [
        f"{i + 1}. {q} → {said!r} (truth: {truth})" for i, (_, q, said, truth) in enumerate(vqa)
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _said(pred: dict[str, str]) -> str:
    return ", ".join(pred[a] for a in W.ATTRIBUTES)


__all__ = ["Evaluator", "evaluate", "to_pixels", "write_report"]
