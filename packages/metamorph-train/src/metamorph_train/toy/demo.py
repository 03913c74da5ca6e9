"""`metamorph demo`: the whole method on the toy world, offline, on a CPU, measured.

Stages, each through the library's own CLI and recipes (the code paths real checkpoints use):

1. ``world``: render the data (``OUT/data``): image-caption pairs, text, VPiT conversations.
2. ``judge``: train and validate the independent judge (pixels -> attributes).
3. ``encoder``: ``metamorph train`` with recipe ``encoder-pretrain`` (a small SigLIP).
4. ``center`` and ``cache``: the encoder's mean token (encoder option ``center``), then
   ``metamorph cache-features`` with that encoder over every image.
5. ``decoder``: recipe ``decoder`` on the cached tokens (pixel-space diffusion UNet).
6. ``lm``: recipe ``lm-pretrain`` on the world's text, with a tokenizer trained on it.
7. ``vpit``: recipe ``full``: understanding, generation and text-only conversations.
8. ``eval``: metrics with 95% intervals and chance baselines (``metrics.json``) and a
   ``report.md`` with PNG grids.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from metamorph_train.toy import world as W


@dataclass(frozen=True)
class Preset:
    """Sizes and step counts of one demo run."""

    images: int  # renders for encoder and decoder training
    encoder_steps: int
    decoder_steps: int
    decoder_channels: tuple[int, ...]
    lm_steps: int
    lm_hidden: int
    lm_layers: int
    vpit_steps: int
    understanding: int  # VPiT training conversations of each kind
    generation: int
    text_repeats: int  # copies of each text-only conversation
    judge_steps: int
    vqa_test: int
    generation_test: int
    reasoning_test: int
    sample_steps: int  # decoder sampling steps at evaluation
    decoder_guidance: float = 2.0  # classifier-free guidance of the decoder at evaluation
    # the small SigLIP: patch 8 gives the 4x4 token grid directly (no reduction), and a patch's
    # linear embedding sees most of a shape (measured: shape from the nearest scene prototype
    # of ground-truth tokens 0.54 vs 0.41 with patch 4, width 64 and the grid reduced 8x8->4x4)
    encoder_patch: int = 8
    encoder_hidden: int = 128
    encoder_lr: float = 1e-3
    encoder_batch: int = 64
    num_tokens: int = 16
    batch_size: int = 32
    held_out: float = 0.35


PRESETS = {
    "micro": Preset(
        images=512,
        encoder_steps=150,
        decoder_steps=20,
        decoder_channels=(16, 32),
        lm_steps=150,
        lm_hidden=64,
        lm_layers=2,
        vpit_steps=450,
        understanding=1024,
        generation=256,
        text_repeats=1,
        judge_steps=100,
        vqa_test=96,
        generation_test=24,
        reasoning_test=24,
        sample_steps=4,
        batch_size=16,
        encoder_batch=32,
    ),
    "quick": Preset(
        images=3000,
        encoder_steps=800,
        decoder_steps=700,
        decoder_channels=(32, 64, 64),
        lm_steps=300,
        lm_hidden=128,
        lm_layers=4,
        vpit_steps=700,
        understanding=4000,
        generation=3000,
        text_repeats=4,
        judge_steps=400,
        vqa_test=400,
        generation_test=300,
        reasoning_test=200,
        sample_steps=10,
    ),
    "full": Preset(
        images=8000,
        encoder_steps=2000,
        decoder_steps=3000,
        decoder_channels=(32, 64, 64),
        lm_steps=1000,
        lm_hidden=192,
        lm_layers=6,
        vpit_steps=2500,
        understanding=12000,
        generation=8000,
        text_repeats=8,
        judge_steps=800,
        vqa_test=600,
        generation_test=540,
        reasoning_test=300,
        sample_steps=20,
    ),
}


@dataclass
class Options:
    """What varies between runs of a preset (the ablations switch data off)."""

    seed: int = 0
    understanding_data: bool = True
    text_facts: bool = True
    generation: int | None = None  # override the preset's generation conversations


@dataclass
class StageClock:
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], Any], log: Callable[[str], None]) -> Any:
        log(f"[demo] {name} ...")
        began = time.perf_counter()
        out = fn()
        self.seconds[name] = round(time.perf_counter() - began, 2)
        log(f"[demo] {name} done in {self.seconds[name]:.1f} s")
        return out


# -- stage 1: the world's data -----------------------------------------------------------------
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
    if options.understanding_data:
        for k in range(preset.understanding):
            s = pick(scenes)
            attribute = W.ATTRIBUTES[k % len(W.ATTRIBUTES)]
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
        template = W.GENERATION_TEMPLATES[k % len(W.GENERATION_TEMPLATES)]
        generation.append(
            {
                "id": f"g{k}",
                "image": _save(W.render(s, rng), images, f"g-{k:05d}.png"),
                "conversations": [
                    {"from": "human", "value": template.format(caption=s.caption())},
                    {"from": "gpt", "value": f"{W.ANSWER_PREFIX}<image>"},
                ],
            }
        )
    text = _text_conversations(options, rng) * preset.text_repeats
    lm_text = [{"text": t} for t in W.facts()] if options.text_facts else []
    lm_text += [{"text": f"{s.caption()}."} for s in scenes]
    lm_text += [
        {"text": f"{q} {v}."} for q in W.QUESTIONS.values() for v in W.SHAPES + tuple(W.COLOURS)
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


def _text_conversations(options: Options, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Text-only VPiT conversations: the facts as questions and answers, and descriptions that
    resolve concepts into attributes. No image ever comes with them."""
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
    for s in W.all_scenes():  # concept descriptions -> the plain caption, in text only
        colour = W.COLOUR_CONCEPTS[s.colour][int(rng.integers(2))]
        shape = W.SHAPE_CONCEPTS[s.shape][int(rng.integers(2))]
        where = "in the centre" if s.position == "centre" else f"at the {s.position}"
        rows.append(
            (f"Describe a {s.size} {shape} in the colour of {colour} {where}.", f"{s.caption()}.")
        )
    return [
        {
            "id": f"t{k}",
            "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
        }
        for k, (q, a) in enumerate(rows)
    ]


# -- the recipes -------------------------------------------------------------------------------
def _recipe(path: Path, tree: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def _train(recipe: Path, log: Callable[[str], None]) -> None:
    from metamorph_train.cli import main as cli

    code = cli(["train", str(recipe)])
    if code != 0:
        raise RuntimeError(f"`metamorph train {recipe}` failed with exit code {code}")


def encoder_spec(out: Path, preset: Preset) -> dict[str, Any]:
    return {
        "name": "siglip",
        "kwargs": {
            "pretrained": str(out / "encoder" / "final"),
            "num_tokens": preset.num_tokens,
            "center": str(out / "encoder" / "token_mean.safetensors"),
        },
    }


def center_encoder(out: Path, preset: Preset, files: dict[str, Path]) -> None:
    """The small pretrained encoder's tokens share one dominant direction (measured: a mean
    cosine of 0.99 between different images), which drowns what tells images apart; its mean
    token over the training images is subtracted before normalisation (encoder option
    ``center``)."""
    from metamorph_core import create
    from metamorph_encoders.base import token_mean

    kwargs = dict(encoder_spec(out, preset)["kwargs"], center=None, normalize=False)
    encoder = create("encoder", "siglip", **kwargs)
    rows = [json.loads(x) for x in files["pairs"].read_text().splitlines()[:2048]]
    images = [np.asarray(Image.open(files["images"] / r["image"]).convert("RGB")) for r in rows]
    token_mean(encoder, _pixels(images), out / "encoder" / "token_mean.safetensors")


def train_encoder(out: Path, preset: Preset, files: dict[str, Path], seed: int, log: Any) -> None:
    _train(
        _recipe(
            out / "recipes" / "encoder.yaml",
            {
                "recipe": "encoder-pretrain",
                "model": {
                    "config": {
                        "image_size": W.IMAGE_SIZE,
                        "patch_size": preset.encoder_patch,
                        "hidden_size": preset.encoder_hidden,
                        "num_layers": 2,
                        "num_heads": 4,
                        "max_text_length": 16,
                    },
                    "vocab_size": 400,
                    "seed": seed,
                },
                "data": {
                    "sources": [{"path": str(files["pairs"]), "image_root": str(files["images"])}]
                },
                "train": _train_section(
                    out / "encoder",
                    preset.encoder_steps,
                    preset.encoder_batch,
                    preset.encoder_lr,
                    seed,
                ),
            },
        ),
        log,
    )


def _train_section(output: Path, steps: int, batch: int, lr: float, seed: int, **kw: Any) -> dict:
    return {
        "output_dir": str(output),
        "steps": steps,
        "batch_size": batch,
        "lr": lr,
        "seed": seed,
        "warmup_ratio": 0.05,
        "log_every": max(steps // 5, 1),
        "save_every": 0,
        "keep_last": 1,
        **kw,
    }


def cache_features(out: Path, preset: Preset, files: dict[str, Path]) -> None:
    from metamorph_train.cli import main as cli

    spec = encoder_spec(out, preset)
    args = [
        "cache-features",
        "--data",
        str(files["all_images"]),
        "--image-root",
        str(files["images"]),
        "--encoder",
        spec["name"],
        "--encoder-kwargs",
        json.dumps(spec["kwargs"]),
        "--out",
        str(out / "cache"),
        "--batch-size",
        "256",
    ]
    if cli(args) != 0:
        raise RuntimeError("`metamorph cache-features` failed")


def train_decoder(out: Path, preset: Preset, files: dict[str, Path], seed: int, log: Any) -> None:
    channels = list(preset.decoder_channels)
    depth = len(channels)
    _train(
        _recipe(
            out / "recipes" / "decoder.yaml",
            {
                "recipe": "decoder",
                "model": {
                    "encoder": encoder_spec(out, preset),
                    "decoder": {
                        "name": "sd-unet",
                        "kwargs": {
                            "unet_config": {
                                "sample_size": W.IMAGE_SIZE,
                                "in_channels": 3,
                                "out_channels": 3,
                                "layers_per_block": 1,
                                "block_out_channels": channels,
                                "cross_attention_dim": 64,
                                "attention_head_dim": 8,
                                "norm_num_groups": 8,
                                # cross-attention only at the lowest resolution (CPU cost)
                                "down_block_types": ["DownBlock2D"] * (depth - 1)
                                + ["CrossAttnDownBlock2D"],
                                "up_block_types": ["CrossAttnUpBlock2D"]
                                + ["UpBlock2D"] * (depth - 1),
                            },
                            "adapter": {"name": "mlp", "kwargs": {"hidden_dims": [128]}},
                            "context_length": preset.num_tokens,
                            "prediction_type": "sample",
                            "cond_dropout": 0.1,
                            "seed": seed,
                        },
                    },
                },
                "data": {
                    "sources": [
                        {"path": str(files["decoder"]), "image_root": str(files["images"])}
                    ],
                    "feature_cache": str(out / "cache"),
                },
                "train": _train_section(
                    out / "decoder", preset.decoder_steps, preset.batch_size, 1e-3, seed
                ),
            },
        ),
        log,
    )


def train_lm(out: Path, preset: Preset, files: dict[str, Path], seed: int, log: Any) -> None:
    h = preset.lm_hidden
    _train(
        _recipe(
            out / "recipes" / "lm.yaml",
            {
                "recipe": "lm-pretrain",
                "model": {
                    "architecture": "llama",
                    "config": {
                        "hidden_size": h,
                        "intermediate_size": 4 * h,
                        "num_hidden_layers": preset.lm_layers,
                        "num_attention_heads": 4,
                        "num_key_value_heads": 4,
                        "tie_word_embeddings": False,
                    },
                    "vocab_size": 600,
                    "max_length": 192,
                    "seed": seed,
                },
                "data": {"sources": [{"path": str(files["lm_text"])}]},
                "train": _train_section(out / "lm", preset.lm_steps, 32, 3e-3, seed),
            },
        ),
        log,
    )


def train_vpit(out: Path, preset: Preset, files: dict[str, Path], seed: int, log: Any) -> None:
    sources = []
    for name, weight in (("understanding", 2.0), ("generation", 2.0), ("text", 1.0)):
        if files[name].stat().st_size:
            sources.append(
                {
                    "path": str(files[name]),
                    "image_root": str(files["images"]),
                    "weight": weight,
                    "name": name,
                }
            )
    _train(
        _recipe(
            out / "recipes" / "vpit.yaml",
            {
                "recipe": "full",
                "model": {
                    "encoder": encoder_spec(out, preset),
                    "backbone": {
                        "name": "llama",
                        "kwargs": {"pretrained": str(out / "lm" / "final")},
                    },
                    "projector": "mlp2x_gelu",
                    "head": "mlp2x_gelu",
                    "template": "chatml",
                },
                "data": {"sources": sources, "feature_cache": str(out / "cache")},
                "train": _train_section(
                    out / "vpit",
                    preset.vpit_steps,
                    preset.batch_size,
                    2e-3,
                    seed,
                    prompt_dropout=0.1,
                ),
            },
        ),
        log,
    )


# -- evaluation --------------------------------------------------------------------------------
def _metric(k: int, n: int, chance: float) -> dict[str, Any]:
    from metamorph_train.toy.stats import wilson_interval

    low, high = wilson_interval(k, n)
    return {"value": k / max(n, 1), "ci95": [low, high], "n": n, "chance": chance}


def _pixels(images: list[np.ndarray]) -> Any:
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
        self.model.attach_decoder(
            create("decoder", "sd-unet", pretrained=str(out / "decoder" / "final"))
        )
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
            return torch.cat([enc(enc.preprocess(_pixels(b))) for b in _batches(images, 256)])

    def decode(self, tokens: Any) -> Any:
        import torch

        outs = [
            self.model.decode_images(
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

        items = []
        for k in range(self.preset.vqa_test):
            s = self.scenes[int(self.rng.integers(len(self.scenes)))]
            attribute = W.ATTRIBUTES[k % len(W.ATTRIBUTES)]
            items.append((W.render(s, self.rng), attribute, W.answer(s, attribute)))
        right, shown = 0, []
        for batch in _batches(items, 32):
            convs = [
                Conversation(
                    [Turn("user", f"<image>\n{W.QUESTIONS[a]}")], images=[_pixels([img])[0]]
                )
                for img, a, _ in batch
            ]
            results = self.model.generate(convs, max_new_tokens=8)
            for (img, a, truth), r in zip(batch, results, strict=True):
                said = r.text.strip().strip(".").lower()
                right += said == truth
                shown.append((img, W.QUESTIONS[a], said, truth))
        values = {"shape": W.SHAPES, "colour": W.COLOURS, "size": W.SIZES, "position": W.POSITIONS}
        chance = float(np.mean([1 / len(values[W.ATTRIBUTES[k % 4]]) for k in range(len(items))]))
        return _metric(right, len(items), chance), shown

    def generate(self, prompts: list[str]) -> Any:
        import torch

        tokens = []
        for batch in _batches(prompts, 32):
            results = self.model.generate_image(batch, response_prefix=W.ANSWER_PREFIX)
            tokens += [r.images[0] for r in results]
        return torch.stack(tokens)

    def judged(self, pixels: Any, scenes: list[W.Scene]) -> tuple[int, list[dict[str, str]]]:
        from metamorph_train.toy.judge import correct

        preds = self.judge.predict(pixels)
        return sum(correct(p, s) for p, s in zip(preds, scenes, strict=True)), preds

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
    prompts = [
        W.GENERATION_TEMPLATES[k % len(W.GENERATION_TEMPLATES)].format(caption=s.caption())
        for k, s in enumerate(test)
    ]
    tokens = ev.generate(prompts)
    pixels = ev.decode(tokens)
    hits, preds = ev.judged(pixels, test)
    metrics["generation_accuracy"] = _metric(hits, len(test), chance_all)
    scores = ev.token_scores(tokens, test)
    metrics["token_nearest_neighbour_accuracy"] = scores["nn"]
    metrics["visual_token_cosine"] = scores["cosine"]

    reasoning = [
        ev.scenes[int(ev.rng.integers(len(ev.scenes)))] for _ in range(preset.reasoning_test)
    ]
    r_prompts = [W.reasoning_prompt(s, ev.rng) for s in reasoning]
    r_pixels = ev.decode(ev.generate(r_prompts))
    r_hits, r_preds = ev.judged(r_pixels, reasoning)
    metrics["reasoning_generation_accuracy"] = _metric(r_hits, len(reasoning), chance_all)

    renders = [W.render(s, ev.rng) for s in test]
    truth_tokens = ev.encode(renders)
    recon_hits, _ = ev.judged(ev.decode(truth_tokens), test)
    metrics["decoder_reconstruction_accuracy"] = _metric(recon_hits, len(test), chance_all)
    # negative control: tokens shuffled across images and positions, decoded, judged against
    # the scene the unshuffled tokens showed; a sound judge and decoder score ~chance
    g = torch.Generator().manual_seed(options.seed)
    flat = truth_tokens.reshape(-1, truth_tokens.shape[-1])
    shuffled = flat[torch.randperm(len(flat), generator=g)].reshape(truth_tokens.shape)
    shuffled_hits, _ = ev.judged(ev.decode(shuffled), test)
    metrics["control_shuffled_tokens_accuracy"] = _metric(shuffled_hits, len(test), chance_all)
    report = {
        "vqa": vqa[:16],
        "generation": list(zip(prompts[:16], pixels[:16], preds[:16], strict=True)),
        "reasoning": list(zip(r_prompts[:16], r_pixels[:16], r_preds[:16], strict=True)),
        "reconstruction": (renders[:16], None),
    }
    return metrics, report


# -- the run -----------------------------------------------------------------------------------
_RUN_ENTRIES = {
    "data", "judge", "encoder", "cache", "decoder", "lm", "vpit", "recipes", "metrics.json",
    "report.md", "generation.png", "reasoning.png", "understanding.png",
}  # fmt: skip


def remove_demo_run(out: str | Path) -> None:
    """Delete an earlier demo run in ``out`` (``metamorph demo --overwrite``, ``make demo``).
    Refuses a directory holding anything a demo run does not write, so nothing else is lost."""
    import shutil

    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"'{out}' is a file, not a demo run; pick another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _RUN_ENTRIES)
    if foreign:
        raise FileExistsError(
            f"'{out}' holds {foreign[:5]}, which a demo run does not write; "
            "move them away or pick another --out"
        )
    shutil.rmtree(out)


def run_demo(
    preset: str | Preset = "quick",
    out: str | Path = "runs/demo",
    options: Options | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every stage into ``out``; returns the metrics (also in ``out/metrics.json``)."""
    import torch

    from metamorph_train.toy.judge import Judge, train_judge, validate_judge

    name = preset if isinstance(preset, str) else "custom"
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown demo preset '{preset}'; use one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    options = options or Options()
    out = Path(out)
    if (out / "metrics.json").exists() or (out / "vpit").exists():
        raise FileExistsError(
            f"'{out}' holds an earlier demo run; pick a new --out directory or remove it"
        )
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    clock = StageClock()
    world = clock.run("world", lambda: write_world(out, preset, options), log)
    files = {**world["files"], "images": world["images"]}
    judge_dir = out / "judge"

    def make_judge() -> Any:
        judge = train_judge(seed=options.seed, steps=preset.judge_steps)
        judge.save(judge_dir)
        return Judge.load(judge_dir)

    judge = clock.run("judge", make_judge, log)
    validation = validate_judge(judge, seed=options.seed + 1)
    seed = options.seed
    clock.run("encoder", lambda: train_encoder(out, preset, files, seed, log), log)
    clock.run("center", lambda: center_encoder(out, preset, files), log)
    clock.run("cache", lambda: cache_features(out, preset, files), log)
    clock.run("decoder", lambda: train_decoder(out, preset, files, seed, log), log)
    clock.run("lm", lambda: train_lm(out, preset, files, seed, log), log)
    clock.run("vpit", lambda: train_vpit(out, preset, files, seed, log), log)
    metrics, report = clock.run(
        "eval", lambda: evaluate(out, preset, options, world["splits"], judge, log), log
    )
    clean = validation["clean"]["accuracy"]  # all four attributes right, fresh renders
    metrics["judge_accuracy"] = {
        "value": clean["rate"],
        "ci95": list(clean["ci95"]),
        "n": clean["n"],
        "chance": 1 / len(W.all_scenes()),
    }
    metrics["judge_validation"] = validation
    metrics["seconds"] = {**clock.seconds, "total": round(sum(clock.seconds.values()), 2)}
    metrics["run"] = {"preset": name, **asdict(preset), **asdict(options)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    write_report(out, metrics, report)
    log(f"[demo] report: {out / 'report.md'}  metrics: {out / 'metrics.json'}")
    return metrics


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
    lines += [
        "",
        "Seconds per stage: " + ", ".join(f"{k} {v}" for k, v in metrics["seconds"].items()),
        "",
    ]
    gen = report["generation"]
    name = _grid([p for _, p, _ in gen], out / "generation.png")
    lines += ["## Generation (held-out scenes)", "", f"![generation]({name})", ""]
    lines += [
        f"{i + 1}. {prompt} → judge: {_said(pred)}" for i, (prompt, _, pred) in enumerate(gen)
    ]
    rea = report["reasoning"]
    name = _grid([p for _, p, _ in rea], out / "reasoning.png")
    lines += ["", "## Reasoning into generation", "", f"![reasoning]({name})", ""]
    lines += [
        f"{i + 1}. {prompt} → judge: {_said(pred)}" for i, (prompt, _, pred) in enumerate(rea)
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


ABLATIONS = {
    # condition -> options; generation data is cut to a tenth (the low-data regime)
    "all_data": {},
    "no_understanding": {"understanding_data": False},
    "no_text_facts": {"text_facts": False},
}


def run_ablation(
    preset: str = "quick",
    out: str | Path = "runs/demo-ablation",
    seeds: tuple[int, ...] = (0, 1, 2),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The paper's findings on the toy world, over ``seeds``: generation accuracy with and
    without understanding data at equal (low) generation data, and reasoning accuracy with and
    without the text-only facts (removed from language-model pretraining and from VPiT). Each
    condition is a whole run (every stage) in ``out/seed-N/CONDITION``."""
    base = PRESETS[preset]
    low = max(base.generation // 10, 16)
    results: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:
        for condition, switches in ABLATIONS.items():
            options = Options(seed=seed, generation=low, **switches)
            m = run_demo(base, Path(out) / f"seed-{seed}" / condition, options, log)
            row = results.setdefault(condition, {"generation": [], "reasoning": []})
            row["generation"].append(m["generation_accuracy"]["value"])
            row["reasoning"].append(m["reasoning_generation_accuracy"]["value"])
    summary = {
        "preset": preset,
        "seeds": list(seeds),
        "generation_conversations": low,
        "conditions": {
            c: {
                k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "runs": v}
                for k, v in row.items()
            }
            for c, row in results.items()
        },
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "ablation.json").write_text(json.dumps(summary, indent=2))
    log(f"[demo] ablation summary: {Path(out) / 'ablation.json'}")
    return summary


__all__ = [
    "ABLATIONS",
    "PRESETS",
    "Options",
    "Preset",
    "remove_demo_run",
    "run_ablation",
    "run_demo",
]
