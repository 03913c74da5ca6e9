"""An independent judge for the toy world: names the shape, colour, size and position of the one
shape in an image from its pixels, or answers ``"unrecognised"``.

It scores images *generated* by the model under test, so it must not be fooled by noise, blank
canvases or mush. Two stages must both accept an image before any attribute is named:

1. **Foreground gate** (classical, no learning; :mod:`metamorph_toy.foreground`). Background =
   per-channel median of the border of the 3x3-box-blurred image; foreground = pixels farther
   than ``fg_threshold`` from it. The image is rejected (every attribute unrecognised) if the
   largest 8-connected foreground blob is too small, the foreground too large, or split into
   several pieces.
2. **CNN** on a 16x16 window centred on the largest blob, with heads for shape, colour and
   size (each with an extra "none" class) and a "scene" head (one object vs anything else).
   It is trained (on images from :mod:`metamorph_toy.judge_images`) on fresh
   :func:`~metamorph_toy.world.render` scenes under decoder-like
   degradations (blur, down-up sampling, noise, colour shifts, small shifts), on negatives that
   the gate lets through (smears, several blobs, two shapes, patch-shuffled scenes: "scene" no
   and every head "none") and on near misses wrong in one attribute (a colour off the palette
   or halfway between two palette colours; an ellipse, oval, tilted square, bar, ring, half
   disc, L or T; a size between or beyond small and large) that teach that head "none". The image is unrecognised if the scene head is not sure (``threshold``) it shows
   one object; an attribute is unrecognised if its head answers "none" or is less sure than
   ``threshold``.

The position is read classically from the blob's centroid: the 3x3 cell it falls in, or
unrecognised within ``position_margin`` pixels of a boundary between cells.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from metamorph_toy.foreground import (
    CROP,
    UNRECOGNISED,
    Foreground,
    as_batch,
    crop_around,
    find_foreground,
    position_of,
)
from metamorph_toy.judge_images import (
    CLASSES,
    IGNORE,
    LEARNED,
    Synth,
    add_noise,
    blank_canvas,
    degrade,
    gaussian_blur,
)
from metamorph_toy.stats import wilson_interval
from metamorph_toy.world import (
    ATTRIBUTES,
    IMAGE_SIZE,
    Scene,
    all_scenes,
    render,
)

FORMAT = "metamorph-toy-judge"
CONFIG_FILE = "judge.json"
DEFAULT_STEPS = 300  # training steps for an accurate judge (see train_judge)
MICRO_STEPS = 80  # a rough judge for smoke runs: most clean renders, far fewer degraded ones
WEIGHTS_FILE = "judge.safetensors"
_TRAIN_STREAM, _VALIDATION_STREAM = 1, 2  # seeds feed distinct random streams per purpose


@dataclass
class JudgeConfig:
    """Architecture, decision thresholds and provenance of a :class:`Judge`."""

    widths: tuple[int, int, int] = (16, 32, 64)  # conv channels (crop at 16, 16, 8 pixels)
    hidden: int = 128
    threshold: float = 0.6  # least top probability for naming an attribute
    fg_threshold: float = 0.2  # RGB distance in [0, 1] units from the background
    min_area: int = 8  # pixels of the largest foreground blob
    max_area: int = 260  # pixels of all foreground
    min_main_fraction: float = 0.8  # share of the foreground in the largest blob
    position_margin: float = 1.5  # pixels around inner cell boundaries where no cell is named
    seed: int = 0
    steps: int = 0  # training steps taken
    classes: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in CLASSES.items()}
    )


# -- the judge -------------------------------------------------------------------------------
def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class Judge(nn.Module):
    """Recognises the toy-world attributes of an image, or answers ``"unrecognised"``.

    Build one with :func:`train_judge` or :meth:`load`; call :meth:`predict`.
    """

    def __init__(self, config: JudgeConfig | None = None) -> None:
        super().__init__()
        self.config = config or JudgeConfig()
        if self.config.classes != {k: list(v) for k, v in CLASSES.items()}:
            raise ValueError(
                f"this judge was made for the classes {self.config.classes}, but the toy world "
                f"has {CLASSES}; train a new judge with train_judge()"
            )
        w1, w2, w3 = self.config.widths
        hidden = self.config.hidden
        self.features = nn.Sequential(  # b 6 CROP CROP -> b hidden
            *_conv(6, w1),  # input: the crop's colours and its difference from the background
            *_conv(w1, w2),
            nn.MaxPool2d(2),
            *_conv(w2, w3),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(w3 * (CROP // 4) ** 2, hidden),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({a: nn.Linear(hidden, len(CLASSES[a]) + 1) for a in LEARNED})
        self.heads["scene"] = nn.Linear(hidden, 2)  # 0: not one object, 1: one object

    def forward(self, x: torch.Tensor, found: Foreground | None = None) -> dict[str, torch.Tensor]:
        """Logits for ``x`` ``(n, 3, 32, 32)`` in [0, 1]: ``(n, classes + 1)`` for each of
        ``LEARNED`` (last = "none") and ``(n, 2)`` for "scene"; ``found`` is
        :func:`find_foreground` of ``x`` if already computed."""
        if found is None:
            found = find_foreground(x, self.config)
        diff = crop_around(x, found.background, found.centre)
        colours = diff + found.background[:, :, None, None]
        h = self.features(torch.cat([colours - 0.5, diff], dim=1))
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor | np.ndarray, batch_size: int = 512
    ) -> list[dict[str, str]]:
        """One dict per image mapping every attribute in ``ATTRIBUTES`` to a value or
        ``"unrecognised"``. ``images``: float tensor ``(n, 3, h, w)`` in [0, 1] or uint8 array
        ``(n, 32, 32, 3)``."""
        x = as_batch(images)
        was_training = self.training
        self.eval()
        out: list[dict[str, str]] = []
        try:
            for start in range(0, x.shape[0], batch_size):
                chunk = x[start : start + batch_size]
                found = find_foreground(chunk, self.config)
                probs = {a: p.softmax(-1) for a, p in self(chunk, found).items()}
                scene = found.accepted & (probs["scene"][:, 1] >= self.config.threshold)
                positions = position_of(found.centre, self.config.position_margin)
                for i in range(chunk.shape[0]):
                    if not scene[i]:
                        out.append(dict.fromkeys(ATTRIBUTES, UNRECOGNISED))
                        continue
                    pred = {}
                    for a in LEARNED:
                        p, k = probs[a][i].max(-1)
                        known = k < len(CLASSES[a]) and p >= self.config.threshold
                        pred[a] = CLASSES[a][int(k)] if known else UNRECOGNISED
                    out.append({**pred, "position": positions[i]})
        finally:
            self.train(was_training)
        return out

    def save(self, path: str | Path) -> None:
        """Write ``judge.safetensors`` and ``judge.json`` into the directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE))
        config = {"format": FORMAT, "version": 1, "config": asdict(self.config)}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Judge:
        """A judge saved by :meth:`save`, in eval mode."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"'{path}' is not a saved judge: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                "(written by Judge.save)"
            )
        saved = json.loads((path / CONFIG_FILE).read_text())
        if saved.get("format") != FORMAT:
            raise ValueError(
                f"'{path / CONFIG_FILE}' has format {saved.get('format')!r}, not {FORMAT!r}"
            )
        config: dict[str, Any] = saved["config"]
        config["widths"] = tuple(config["widths"])
        judge = cls(JudgeConfig(**config))
        judge.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
        return judge.eval()


def train_judge(
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 128,
    log: Callable[[str], None] | None = None,
    lr: float = 3e-3,
    pool_size: int = 4096,
) -> Judge:
    """Train a judge on synthetic images (see the module docstring); deterministic given
    ``seed`` on one machine and thread count. Batches are drawn from a pool of ``pool_size``
    images, of which ``batch_size // 8`` are replaced by fresh ones after every step, and get
    fresh random degradations each time. Cost grows about linearly in ``steps * batch_size``."""
    if steps < 1 or batch_size < 1 or pool_size < 1:
        raise ValueError(
            "train_judge needs steps, batch_size and pool_size >= 1, got "
            f"{steps}, {batch_size}, {pool_size}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = Judge(JudgeConfig(seed=seed, steps=steps))
    synth = Synth(np.random.default_rng([seed, _TRAIN_STREAM]))
    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = synth.sample(n)
        return torch.from_numpy(images).permute(0, 3, 1, 2).div(255), torch.from_numpy(labels)

    pool_size = min(pool_size, steps * batch_size)
    pool_x, pool_y = draw(pool_size)  # b 3 32 32, b 4
    fresh = max(1, batch_size // 8)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4, foreach=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    judge.train()
    for step in range(steps):
        pick = torch.randint(pool_size, (batch_size,), generator=g)
        x, y = degrade(pool_x[pick].clone(), g), pool_y[pick].clone()
        with torch.no_grad():
            found = find_foreground(x, judge.config)
        y[~found.accepted] = IGNORE  # what the gate rejects never reaches the CNN
        logits = judge(x, found)
        loss = sum(
            F.cross_entropy(logits[a], y[:, j], ignore_index=IGNORE, reduction="sum")
            for j, a in enumerate((*LEARNED, "scene"))
        ) / max(1, int(found.accepted.sum()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        slots = torch.randint(pool_size, (fresh,), generator=g)
        pool_x[slots], pool_y[slots] = draw(fresh)
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(f"judge step {step + 1}/{steps} loss {loss.item():.3f}")
    return judge.eval()


def correct(pred: dict[str, str], scene: Scene, attributes: Sequence[str] = ATTRIBUTES) -> bool:
    """Whether ``pred`` names every one of ``attributes`` of ``scene`` rightly;
    ``"unrecognised"`` is never right."""
    for a in attributes:
        if a not in CLASSES:
            raise ValueError(f"unknown attribute '{a}'; the toy world has {ATTRIBUTES}")
        if a not in pred:
            raise ValueError(f"the prediction {pred} lacks attribute '{a}'")
    return all(pred[a] != UNRECOGNISED and pred[a] == getattr(scene, a) for a in attributes)


def _as_images(images: list[np.ndarray]) -> torch.Tensor:
    """``(n, 3, 32, 32)`` in [0, 1] from ``(32, 32, 3)`` arrays in 0..255, rounded as uint8."""
    return as_batch(np.stack(images).round().clip(0, 255).astype(np.uint8))


def _rate(k: int, n: int) -> dict[str, Any]:
    return {"rate": k / n, "ci95": wilson_interval(k, n), "k": k, "n": n}


def validate_judge(judge: Judge, seed: int, n: int = 300) -> dict[str, Any]:
    """Score ``judge`` on ``n`` fresh renders of random scenes (a random stream of ``seed``
    that training never draws from) and on negative controls.

    Returns ``{set: {"accuracy": rate, "named_wrong": rate, "per_attribute": {a: float}},
    ..., "controls": {name: {"correct": rate, "unrecognised": rate}}}``; each rate is a dict
    with ``rate``, its 95% Wilson interval ``ci95``, ``k`` and ``n``.

    Sets (the same scenes, fresh nuisance draws): "clean"; "blur", a Gaussian blur of sigma
    0.8 px; "noise", Gaussian noise of std 0.08; "blur+noise"; "downup", half resolution and
    back. Accuracy = all four attributes right; "named_wrong" = some attribute named but
    wrong (a judge should rather answer "unrecognised").

    Controls: pure (uniform) noise and blank canvases, "correct" if all four attributes match
    a random scene; patch-shuffled scenes (a stand-in for decoded shuffled tokens), "correct"
    if they match the scene that was shuffled; two shapes, "correct" if they match either
    shape's scene. A control is "unrecognised" if no attribute is named.
    """
    rng = np.random.default_rng([seed, _VALIDATION_STREAM])
    g = torch.Generator().manual_seed(seed)
    scenes = all_scenes()
    picked = [scenes[i] for i in rng.choice(len(scenes), size=n, replace=n > len(scenes))]
    clean = as_batch(np.stack([render(s, rng) for s in picked]))
    half = F.interpolate(clean, size=IMAGE_SIZE // 2, mode="area")
    sets = {
        "clean": clean,
        "blur": gaussian_blur(clean, 0.8),
        "noise": add_noise(clean, 0.08, g),
        "blur+noise": add_noise(gaussian_blur(clean, 0.8), 0.08, g),
        "downup": F.interpolate(half, size=IMAGE_SIZE, mode="bilinear", align_corners=False),
    }
    report: dict[str, Any] = {}
    for name, x in sets.items():
        preds = judge.predict(x)
        wrong = sum(
            any(p[a] not in (UNRECOGNISED, getattr(s, a)) for a in ATTRIBUTES)
            for p, s in zip(preds, picked, strict=True)
        )
        report[name] = {
            "accuracy": _rate(sum(correct(p, s) for p, s in zip(preds, picked, strict=True)), n),
            "named_wrong": _rate(wrong, n),
            "per_attribute": {
                a: sum(correct(p, s, (a,)) for p, s in zip(preds, picked, strict=True)) / n
                for a in ATTRIBUTES
            },
        }
    synth = Synth(rng)
    shuffled = [synth.shuffled() for _ in range(n)]
    pairs = [synth.two_shapes() for _ in range(n)]
    random_scenes = [[scenes[i]] for i in rng.integers(len(scenes), size=n)]
    controls = {  # name: (images, the scenes that must not be credited for each image)
        "pure_noise": (torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g), random_scenes),
        "blank": (_as_images([blank_canvas(rng) for _ in range(n)]), random_scenes),
        "shuffled_patches": (_as_images([i for i, _ in shuffled]), [[s] for _, s in shuffled]),
        "two_shapes": (_as_images([i for i, *_ in pairs]), [[a, b] for _, a, b in pairs]),
    }
    report["controls"] = {}
    for name, (x, targets) in controls.items():
        preds = judge.predict(x)
        credited = sum(any(correct(p, s) for s in ss) for p, ss in zip(preds, targets, strict=True))
        report["controls"][name] = {
            "correct": _rate(credited, n),
            "unrecognised": _rate(sum(set(p.values()) == {UNRECOGNISED} for p in preds), n),
        }
    return report
