"""The judge's training images (:mod:`metamorph_toy.judge`): the degradations a decoder may
leave (blur, noise, colour shifts, resampling, small shifts) and synthetic images with their
labels: world renders, painted shapes, negatives the foreground gate lets through, and near
misses wrong in one attribute (off-palette colours, other shapes, sizes between or beyond)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from metamorph_toy.world import (
    COLOURS,
    HALF_EXTENT,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    all_scenes,
    cell_centre,
    render,
    shape_mask,
)

CLASSES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "position": POSITIONS,
}
LEARNED = ("shape", "colour", "size")  # attributes the CNN names; the position is classical
IGNORE = -100  # label of a head that an image says nothing about
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)


# -- degradations ----------------------------------------------------------------------------
def gaussian_blur(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Blur ``x`` ``(n, c, h, w)`` with a Gaussian of ``sigma`` pixels (a float, or ``(n,)``
    one per image; 0 leaves an image as it is). Border pixels are repeated outwards."""
    n, c, h, w = x.shape
    sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(n).clamp_min(1e-3)
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n c) k
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def add_noise(
    x: torch.Tensor, std: float | torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """``x`` plus Gaussian noise of ``std`` (a float or ``(n,)``), clipped to [0, 1]."""
    std = torch.as_tensor(std, dtype=x.dtype).expand(x.shape[0])[:, None, None, None]
    return (x + std * torch.randn(x.shape, generator=generator)).clamp(0, 1)


def degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random decoder-like damage: down-up sampling, blur, colour shifts, noise."""
    n = x.shape[0]

    def pick(p: float) -> torch.Tensor:
        return torch.rand(n, generator=g) < p

    down = pick(0.25)
    if down.any():
        size = int((16, 20, 24)[int(torch.randint(3, (1,), generator=g))])
        small = F.interpolate(x[down], size=size, mode="area")
        x[down] = F.interpolate(small, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    blur = pick(0.5)
    if blur.any():
        x[blur] = gaussian_blur(x[blur], 0.3 + 1.2 * torch.rand(int(blur.sum()), generator=g))
    tinted = pick(0.5)
    if tinted.any():
        k = int(tinted.sum())
        gain = 1 + 0.08 * (2 * torch.rand(k, 3, 1, 1, generator=g) - 1)
        offset = 0.03 * torch.randn(k, 3, 1, 1, generator=g)
        x[tinted] = (x[tinted] * gain + offset).clamp(0, 1)
    noisy = pick(0.5)
    if noisy.any():
        x[noisy] = add_noise(x[noisy], 0.1 * torch.rand(int(noisy.sum()), generator=g), g)
    return x


# -- synthetic training images ---------------------------------------------------------------
_SS = 4  # supersampling, as in world.render
_YY, _XX = np.mgrid[0 : IMAGE_SIZE * _SS, 0 : IMAGE_SIZE * _SS].astype(np.float64) + 0.5
_OTHER_SHAPES = ("ellipse", "oval", "tilted_square", "bar", "ring", "half_disc", "ell", "tee")


def _other_mask(kind: str, cx: float, cy: float, half: float, rng: np.random.Generator):
    """A supersampled mask of a shape that is not in the world (pixel units at 32x32)."""
    s = _SS
    dx, dy = _XX / s - cx, _YY / s - cy
    angle = rng.uniform(0, np.pi)
    u, v = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
    if kind in ("ellipse", "oval"):
        aspect = rng.uniform(1.8, 2.6) if kind == "ellipse" else rng.uniform(1.35, 1.8)
        return (u / half) ** 2 + (v * aspect / half) ** 2 <= 1
    if kind == "tilted_square":  # neither a square (0 degrees) nor a diamond (45)
        turn = np.deg2rad(rng.uniform(12, 33))
        u, v = dx * np.cos(turn) + dy * np.sin(turn), -dx * np.sin(turn) + dy * np.cos(turn)
        return (np.abs(u) <= half * 0.85) & (np.abs(v) <= half * 0.85)
    if kind == "bar":
        return (np.abs(u) <= half) & (np.abs(v) <= half / rng.uniform(2.2, 3.5))
    if kind == "ring":
        r2 = dx**2 + dy**2
        return (r2 <= half**2) & (r2 >= (half * rng.uniform(0.45, 0.6)) ** 2)
    if kind == "half_disc":
        return (dx**2 + dy**2 <= half**2) & (u >= 0)
    quarter = int(rng.integers(4))  # the two crosses with missing arms: rotate by 90 degrees
    for _ in range(quarter):
        dx, dy = dy, -dx
    arm = half * 0.38
    if kind == "ell":
        return ((np.abs(dx + half - arm) <= arm) & (np.abs(dy) <= half)) | (
            (np.abs(dy - half + arm) <= arm) & (np.abs(dx) <= half)
        )
    if kind == "tee":
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= half)) | (
            (np.abs(dy + half - arm) <= arm) & (np.abs(dx) <= half)
        )
    raise ValueError(f"unknown shape '{kind}'")


def blank_canvas(rng: np.random.Generator) -> np.ndarray:
    """A background as world.render draws it: ``(32, 32, 3)`` float in 0..255."""
    tint = rng.uniform(150, 215) + rng.uniform(-12, 12, 3)
    return np.clip(tint + rng.normal(0, 5, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255)


def _cover(mask: np.ndarray) -> np.ndarray:
    return mask.reshape(IMAGE_SIZE, _SS, IMAGE_SIZE, _SS).mean(axis=(1, 3))[..., None]


def _world_cover(shape: str, cx: float, cy: float, half: float) -> np.ndarray:
    return _cover(shape_mask(shape, cx * _SS, cy * _SS, half * _SS, IMAGE_SIZE * _SS))


def _paint(image: np.ndarray, cover: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    return image * (1 - cover) + np.clip(rgb, 0, 255) * cover


class Synth:
    """Draws labelled training images: ``(32, 32, 3)`` floats in 0..255 and labels for the
    heads ``LEARNED + ("scene",)``: a class index, ``len(values)`` for "none" or ``IGNORE``;
    1 if the image shows one object, else 0."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.scenes = all_scenes()
        self.none = [len(CLASSES[a]) for a in LEARNED] + [0]
        self.kinds: list[tuple[Callable[[], tuple[np.ndarray, list[int]]], float]] = [
            (self.render, 0.40),
            (self.painted, 0.15),
            (self.negative, 0.20),
            (self.off_colour, 0.08),
            (self.off_shape, 0.08),
            (self.off_size, 0.08),
        ]

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` images ``(n, 32, 32, 3)`` float32 in 0..255 and labels ``(n, 4)`` int64."""
        makers = [m for m, _ in self.kinds]
        weights = np.array([w for _, w in self.kinds])
        choice = self.rng.choice(len(makers), size=n, p=weights / weights.sum())
        images, labels = zip(*(makers[k]() for k in choice), strict=True)
        return np.stack(images).astype(np.float32), np.array(labels, dtype=np.int64)

    # positives
    def _scene(self) -> Scene:
        return self.scenes[int(self.rng.integers(len(self.scenes)))]

    def _labels(self, scene: Scene) -> list[int]:
        return [CLASSES[a].index(getattr(scene, a)) for a in LEARNED] + [1]

    def render(self) -> tuple[np.ndarray, list[int]]:
        """A world.render scene, shifted by up to a pixel."""
        scene = self._scene()
        image = np.pad(render(scene, self.rng).astype(np.float64), ((1, 1), (1, 1), (0, 0)), "edge")
        y, x = self.rng.integers(0, 3, 2)
        return image[y : y + IMAGE_SIZE, x : x + IMAGE_SIZE], self._labels(scene)

    def _rgb(self, colour: str) -> np.ndarray:
        return np.array(COLOURS[colour], dtype=np.float64) + self.rng.normal(0, 8, 3)

    def _place(self, scene: Scene, jitter: float = 2.5) -> tuple[float, float]:
        cx, cy = cell_centre(scene.position)
        jx, jy = self.rng.uniform(-jitter, jitter, 2)
        return cx + jx, cy + jy

    def painted(self) -> tuple[np.ndarray, list[int]]:
        """A scene with a wider jitter and a size varied by up to 6%."""
        scene = self._scene()
        half = HALF_EXTENT[scene.size] * self.rng.uniform(0.94, 1.06)
        cover = _world_cover(scene.shape, *self._place(scene), half)
        return _paint(blank_canvas(self.rng), cover, self._rgb(scene.colour)), self._labels(scene)

    # near misses: wrong in one attribute
    def off_colour(self) -> tuple[np.ndarray, list[int]]:
        """A colour far from the palette, or halfway between two palette colours that lie at
        least 90 apart (so the halfway colour is 36 or more from both)."""
        scene, canvas = self._scene(), blank_canvas(self.rng)
        while True:
            if self.rng.random() < 0.3:
                a, b = _PALETTE[self.rng.choice(len(_PALETTE), size=2, replace=False)]
                rgb = a + self.rng.uniform(0.4, 0.6) * (b - a)
                far = np.linalg.norm(a - b) >= 90
            else:
                rgb = self.rng.uniform(0, 255, 3)
                far = np.linalg.norm(_PALETTE - rgb, axis=1).min() >= 85
            if far and np.linalg.norm(rgb - canvas.mean((0, 1))) >= 60:
                break
        cover = _world_cover(scene.shape, *self._place(scene), HALF_EXTENT[scene.size])
        labels = self._labels(scene)
        labels[1] = self.none[1]
        return _paint(canvas, cover, rgb), labels

    def off_shape(self) -> tuple[np.ndarray, list[int]]:
        scene = self._scene()
        kind = _OTHER_SHAPES[int(self.rng.integers(len(_OTHER_SHAPES)))]
        half = HALF_EXTENT["large" if kind == "ring" else scene.size] * self.rng.uniform(0.9, 1.1)
        cover = _cover(_other_mask(kind, *self._place(scene), half, self.rng))
        labels = self._labels(scene)
        labels[0], labels[2] = self.none[0], IGNORE  # the size of a non-shape is moot
        return _paint(blank_canvas(self.rng), cover, self._rgb(scene.colour)), labels

    def off_size(self) -> tuple[np.ndarray, list[int]]:
        scene = self._scene()
        band = int(self.rng.integers(3))
        half = self.rng.uniform(*((1.6, 2.5), (4.35, 4.85), (7.5, 10.0))[band])
        cover = _world_cover(scene.shape, *self._place(scene), half)
        labels = self._labels(scene)
        labels[2] = self.none[2]
        return _paint(blank_canvas(self.rng), cover, self._rgb(scene.colour)), labels

    # negatives: not a scene at all
    def negative(self) -> tuple[np.ndarray, list[int]]:
        """Mostly kinds that can pass the gate; the gate alone rejects noise and blanks."""
        rng = self.rng
        kind = int(rng.choice(8, p=[0.05, 0.05, 0.05, 0.05, 0.2, 0.2, 0.2, 0.2]))
        if kind == 0:  # uniform noise
            image = rng.uniform(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3))
        elif kind == 1:  # Gaussian noise about a random colour
            mean, std = rng.uniform(0, 255, 3), rng.uniform(12, 90)
            image = mean + rng.normal(0, std, (IMAGE_SIZE, IMAGE_SIZE, 3))
        elif kind == 2:  # a blank canvas
            image = blank_canvas(rng)
        elif kind == 3:  # one flat colour, a palette colour half the time
            rgb = (
                self._rgb(rng.choice(list(COLOURS)))
                if rng.random() < 0.5
                else rng.uniform(0, 255, 3)
            )
            image = np.broadcast_to(rgb, (IMAGE_SIZE, IMAGE_SIZE, 3)) + rng.normal(
                0, 4, (IMAGE_SIZE, IMAGE_SIZE, 3)
            )
        elif kind == 4:  # a smooth smear of colours, over a canvas or alone
            k = int(rng.choice([2, 3, 4, 6, 8]))
            field_ = torch.from_numpy(rng.uniform(0, 255, (1, 3, k, k)))
            smear = F.interpolate(field_, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
            alpha = rng.uniform(0.3, 1.0)
            image = (1 - alpha) * blank_canvas(rng) + alpha * smear[0].permute(1, 2, 0).numpy()
        elif kind == 5:  # several blobs
            image = blank_canvas(rng)
            for _ in range(int(rng.integers(2, 6))):
                kind_ = "ellipse" if rng.random() < 0.5 else SHAPES[int(rng.integers(5))]
                cx, cy = rng.uniform(2, IMAGE_SIZE - 2, 2)
                half = rng.uniform(1.5, 6)
                mask = (
                    _other_mask(kind_, cx, cy, half, rng)
                    if kind_ == "ellipse"
                    else shape_mask(kind_, cx * _SS, cy * _SS, half * _SS, IMAGE_SIZE * _SS)
                )
                rgb = (
                    _PALETTE[int(rng.integers(6))] if rng.random() < 0.6 else rng.uniform(0, 255, 3)
                )
                image = _paint(image, _cover(mask), rgb)
        elif kind == 6:
            image = self.two_shapes()[0]
        else:
            image = self.shuffled()[0]
        return np.clip(image, 0, 255), list(self.none)

    def two_shapes(self) -> tuple[np.ndarray, Scene, Scene]:
        """Two world shapes of different colours, overlapping or apart, both inside the image
        and each at least 60% visible; and their scenes."""
        while True:
            first, second = self._scene(), self._scene()
            if first.colour == second.colour:
                continue
            h1, h2 = HALF_EXTENT[first.size], HALF_EXTENT[second.size]
            x1, y1 = self.rng.uniform(h1 + 0.5, IMAGE_SIZE - h1 - 0.5, 2)
            if self.rng.random() < 0.5:  # overlapping
                angle, dist = self.rng.uniform(0, 2 * np.pi), self.rng.uniform(3, 8)
                x2, y2 = x1 + dist * np.cos(angle), y1 + dist * np.sin(angle)
            else:
                x2, y2 = self.rng.uniform(h2 + 0.5, IMAGE_SIZE - h2 - 0.5, 2)
            if not h2 + 0.5 <= min(x2, y2) <= max(x2, y2) <= IMAGE_SIZE - h2 - 0.5:
                continue
            c1 = _world_cover(first.shape, x1, y1, h1)
            c2 = _world_cover(second.shape, x2, y2, h2)
            if (c1 * (1 - c2)).sum() >= 0.6 * c1.sum():
                break
        image = _paint(blank_canvas(self.rng), c1, self._rgb(first.colour))
        return _paint(image, c2, self._rgb(second.colour)), first, second

    def shuffled(self) -> tuple[np.ndarray, Scene]:
        """A scene cut into square patches (like image tokens) that are put back shuffled, and
        the scene. The shape is cut so that no patch holds more than 60% of it, and every patch
        with a part of it moves: nothing close to the scene is left."""
        patch = int(self.rng.choice([4, 8]))
        k = IMAGE_SIZE // patch
        while True:
            scene = self._scene()
            cover = _world_cover(scene.shape, *self._place(scene), HALF_EXTENT[scene.size])
            share = cover[..., 0].reshape(k, patch, k, patch).sum(axis=(1, 3)).ravel()
            share /= share.sum()
            if share.max() <= 0.6:
                break
        image = _paint(blank_canvas(self.rng), cover, self._rgb(scene.colour))
        patches = (
            image.reshape(k, patch, k, patch, 3)
            .transpose(0, 2, 1, 3, 4)
            .reshape(k * k, patch, patch, 3)
        )
        touched = np.flatnonzero(share > 0)
        order = self.rng.permutation(k * k)  # patch order[i] goes to place i
        while (order[touched] == touched).any():
            order = self.rng.permutation(k * k)
        image = (
            patches[order]
            .reshape(k, k, patch, patch, 3)
            .transpose(0, 2, 1, 3, 4)
            .reshape(IMAGE_SIZE, IMAGE_SIZE, 3)
        )
        return image, scene


__all__ = [
    "CLASSES",
    "IGNORE",
    "LEARNED",
    "Synth",
    "add_noise",
    "blank_canvas",
    "degrade",
    "gaussian_blur",
]
