"""The toy world: one coloured shape per image, with captions, questions, text-only facts and
reasoning prompts, generated deterministically from a seed.

Attributes: 5 shapes x 6 colours x 2 sizes x 9 positions (a 3x3 grid) = 540 scenes. Images are
``IMAGE_SIZE`` square RGB renders (anti-aliased by 4x supersampling) with nuisance variation:
a tinted, noisy background and a jitter of the shape's centre within its grid cell.

Splits (:func:`make_splits`), designed so that no test item leaks into training:

- a share of the 540 scenes is held out from every *generation target* in training; the
  generation test prompts ask for exactly those scenes;
- understanding (VQA) test images are fresh renders (new nuisance draws) of any scene;
- *reasoning* prompts name a colour or a shape only through an everyday concept ("the colour of
  grass", "a shape with two plus one sides"). Those concepts appear in the text-only facts and
  requests (:func:`concept_resolutions`, which name a size or a position, never both) and
  never in a training sample that contains an image.

A generation answer restates the request in plain attribute words before the image ("Here is a
large triangle in the colour green at the top: <image>"); a reasoning prompt is resolved in
that restatement, with what the model learnt from text alone.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

IMAGE_SIZE = 32
SHAPES = ("square", "circle", "triangle", "cross", "diamond")
COLOURS = {
    "red": (214, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 180),
    "orange": (240, 130, 20),
}
SIZES = ("small", "large")
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
ATTRIBUTES = ("shape", "colour", "size", "position")
HALF_EXTENT = {"small": 3.6, "large": 5.6}  # pixels from centre to edge, at 32x32

# everyday concepts tied to attributes by text-only facts; each reasoning prompt uses them
COLOUR_CONCEPTS = {
    "red": ["a ripe tomato", "a fire truck"],
    "green": ["grass", "a frog"],
    "blue": ["the clear sky", "the deep sea"],
    "yellow": ["a banana", "a lemon"],
    "purple": ["a plum", "lavender"],
    "orange": ["a carrot", "a pumpkin"],
}
SIDES = {"triangle": 3, "square": 4}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SHAPE_CONCEPTS = {  # phrases that name a shape only through a fact ("a large <phrase>")
    "triangle": ["shape with three sides", "shape with two plus one sides"],
    "square": ["shape with four equal sides", "shape with two plus two sides"],
    "circle": ["round shape with no corners", "shape like a full moon"],
    "cross": ["shape like a plus sign", "shape like the red cross symbol"],
    "diamond": ["shape like a kite standing on its tip", "shape like a rhombus"],
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str

    def where(self) -> str:
        return "in the centre" if self.position == "centre" else f"at the {self.position}"

    def caption(self, leave_open: str | None = None) -> str:
        """The caption, "a large green triangle at the top"; ``leave_open`` (an attribute) is
        left unsaid: "a large triangle at the top", "a large green shape at the top"."""
        words = [self._word(a, leave_open) for a in ("size", "colour", "shape", "position")]
        return " ".join(["a", *(w for w in words if w)])

    def framed_caption(self, leave_open: str | None = None) -> str:
        """The caption in the frame of the reasoning prompts, with plain attribute words: "a
        large triangle in the colour green at the top" (``leave_open`` as in :meth:`caption`)."""
        colour = self._word("colour", leave_open)
        words = [self._word("size", leave_open), self._word("shape", leave_open)]
        words += [f"in the colour {colour}" if colour else "", self._word("position", leave_open)]
        return " ".join(["a", *(w for w in words if w)])

    def _word(self, attribute: str, leave_open: str | None) -> str:
        if attribute == leave_open:
            return "shape" if attribute == "shape" else ""
        return self.where() if attribute == "position" else getattr(self, attribute)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def all_scenes() -> list[Scene]:
    return [Scene(*a) for a in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS)]


# -- rendering -------------------------------------------------------------------------------
def shape_mask(shape: str, cx: float, cy: float, half: float, n: int) -> np.ndarray:
    """A boolean ``(n, n)`` mask of ``shape`` centred at (cx, cy) (pixel units of an n grid)."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "square":
        return (np.abs(dx) <= half * 0.85) & (np.abs(dy) <= half * 0.85)
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "diamond":
        return np.abs(dx) / 0.8 + np.abs(dy) <= half * 1.05
    if shape == "cross":
        arm = half * 0.38
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= half)) | (
            (np.abs(dy) <= arm) & (np.abs(dx) <= half)
        )
    if shape == "triangle":  # apex up, flat base
        top, bottom = cy - half, cy + half * 0.8
        frac = (dy + half) / (bottom - top)
        return (dy >= -half) & (yy <= bottom) & (np.abs(dx) <= frac * half * 1.1)
    raise ValueError(f"unknown shape '{shape}'; the world has {SHAPES}")


def cell_centre(position: str, size: int = IMAGE_SIZE) -> tuple[float, float]:
    k = POSITIONS.index(position)
    row, col = divmod(k, 3)
    cell = size / 3
    return (col + 0.5) * cell, (row + 0.5) * cell


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """``(size, size, 3)`` uint8: the scene with a random background tint and noise and the
    shape's centre jittered by up to 1.5 pixels (at 32x32)."""
    scale = size / IMAGE_SIZE
    ss = 4  # supersampling
    cx, cy = cell_centre(scene.position, size)
    jx, jy = rng.uniform(-1.5, 1.5, 2) * scale
    half = HALF_EXTENT[scene.size] * scale
    mask = shape_mask(scene.shape, (cx + jx) * ss, (cy + jy) * ss, half * ss, size * ss)
    cover = mask.reshape(size, ss, size, ss).mean(axis=(1, 3))[..., None]
    tint = rng.uniform(150, 215) + rng.uniform(-12, 12, 3)
    background = np.clip(tint + rng.normal(0, 5, (size, size, 3)), 0, 255)
    colour = np.array(COLOURS[scene.colour], dtype=np.float64)
    colour = np.clip(colour + rng.normal(0, 6, 3), 0, 255)
    out = background * (1 - cover) + colour * cover
    return np.clip(out.round(), 0, 255).astype(np.uint8)


# -- language --------------------------------------------------------------------------------
QUESTIONS = {
    "shape": "What shape is in the image?",
    "colour": "What colour is the shape?",
    "size": "Is the shape small or large?",
    "position": "Where is the shape?",
}
GENERATION_TEMPLATES = (
    "Generate an image of {caption}.",
    "Draw {caption}.",
    "Show me a picture of {caption}.",
    "Generate an image of {framed}.",
)
# The answer to a generation request first restates it in plain attribute words, then draws:
# "Here is a large triangle in the colour green at the top: <image>". A request that names
# attributes through concepts is resolved in that restatement, in text, with the facts the
# model learnt from text alone (measured: without a restatement, reasoning prompts came out
# right 0.007 of the time in the full preset, colour 0.017, below chance).
ANSWER_LEAD = "Here is"
# the paper's answer (no restatement: whatever reasoning there is stays implicit); the demo's
# presets can switch back to it with ``restate=False``
PAPER_ANSWER = "Here is an image based on your request:"


def restatement(scene: Scene, restate: bool = True) -> str:
    """The text of a generation answer before its image: "Here is a large triangle in the
    colour green at the top:" (``restate=False``: :data:`PAPER_ANSWER`)."""
    return f"{ANSWER_LEAD} {scene.framed_caption()}:" if restate else PAPER_ANSWER


def generation_answer(scene: Scene, restate: bool = True) -> str:
    return f"{restatement(scene, restate)} <image>"


def generation_prompt(scene: Scene, k: int, leave_open: str | None = None) -> str:
    """The ``k``-th phrasing (cyclic) of a request for ``scene``, plain attribute words only.
    The last phrasing puts them in the reasoning prompts' frame ("... in the colour green
    ..."), so that a reasoning prompt differs from a trained request only by its concepts,
    which reach the model through text alone (a pretrained LLM brings such fluency with it).
    ``leave_open``: an attribute the request does not name (an *open* request)."""
    template = GENERATION_TEMPLATES[k % len(GENERATION_TEMPLATES)]
    return template.format(
        caption=scene.caption(leave_open), framed=scene.framed_caption(leave_open)
    )


def answer(scene: Scene, attribute: str) -> str:
    return getattr(scene, attribute)


def facts() -> list[str]:
    """The text-only facts (and arithmetic) that reasoning prompts need, several phrasings
    each."""
    out = []
    for colour, concepts in COLOUR_CONCEPTS.items():
        for c in concepts:
            out += [f"{c} is {colour}.", f"the colour of {c} is {colour}."]
    for shape, n in SIDES.items():
        out += [
            f"a {shape} has {NUMBER_WORDS[n]} sides.",
            f"a shape with {NUMBER_WORDS[n]} sides is a {shape}.",
        ]
    out += [
        "a shape with four equal sides is a square.",
        "a circle has no corners.",
        "a round shape with no corners is a circle.",
        "a full moon looks like a circle.",
        "a shape like a full moon is a circle.",
        "a plus sign looks like a cross.",
        "a shape like a plus sign is a cross.",
        "the red cross symbol is a cross.",
        "a shape like the red cross symbol is a cross.",
        "a kite standing on its tip looks like a diamond.",
        "a shape like a kite standing on its tip is a diamond.",
        "a rhombus is a diamond.",
        "a shape like a rhombus is a diamond.",
    ]
    for a, b in itertools.product(range(5), range(5)):
        if a + b < len(NUMBER_WORDS):
            out.append(f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.")
    return out


def concept_resolutions(restate: bool = True) -> list[tuple[str, str]]:
    """Text-only requests and descriptions that name a shape and a colour through concepts,
    each with its resolution in plain words: ("Generate an image of a large shape with three
    sides in the colour of grass.", "Here is a large triangle in the colour green:") and
    ("Describe a shape with three sides in the colour of grass at the top.", "a triangle in the
    colour green at the top."). Each names a size or a position, never both, so no reasoning
    test prompt is among them (those name both), and no image ever comes with them. Without
    ``restate`` (the paper's answers) only the descriptions."""
    out = []
    combos = itertools.product(SHAPE_CONCEPTS.items(), COLOUR_CONCEPTS.items())
    k = 0
    for (shape, phrases), (colour, concepts) in combos:
        for phrase, concept in itertools.product(phrases, concepts):
            scene = Scene(shape, colour, SIZES[k % len(SIZES)], POSITIONS[k % len(POSITIONS)])
            k += 1
            for a, b, left in (
                (f"a {scene.size} ", "", "position"),
                ("a ", f" {scene.where()}", "size"),
            ):
                asked = f"{a}{phrase} in the colour of {concept}{b}"
                plain = scene.framed_caption(leave_open=left)
                if restate:
                    out.append((f"Generate an image of {asked}.", f"{ANSWER_LEAD} {plain}:"))
                out.append((f"Describe {asked}.", f"{plain}."))
    return out


def reasoning_prompt(scene: Scene, rng: np.random.Generator) -> str:
    colour = COLOUR_CONCEPTS[scene.colour][int(rng.integers(2))]
    shape = SHAPE_CONCEPTS[scene.shape][int(rng.integers(2))]
    return f"Generate an image of a {scene.size} {shape} in the colour of {colour} {scene.where()}."


# -- splits ----------------------------------------------------------------------------------
@dataclass
class Splits:
    """Everything one run of the toy world needs, as plain data."""

    train_generation: list[Scene]  # scenes allowed as generation targets
    test_generation: list[Scene]  # scenes held out from every generation target


def make_splits(seed: int, held_out: float = 0.5) -> Splits:
    """Hold out a share of the scenes from generation targets; every shape, colour, size and
    position still occurs among the training targets (only their combinations are new)."""
    rng = np.random.default_rng(seed)
    scenes = all_scenes()
    while True:
        order = rng.permutation(len(scenes))
        cut = int(len(scenes) * held_out)
        test = [scenes[i] for i in order[:cut]]
        train = [scenes[i] for i in order[cut:]]
        covered = all(
            {getattr(s, a) for s in train} == set(values)
            for a, values in zip(ATTRIBUTES, (SHAPES, COLOURS, SIZES, POSITIONS), strict=True)
        )
        if covered:
            return Splits(train, test)


def scene_from(attrs: dict[str, Any]) -> Scene:
    return Scene(attrs["shape"], attrs["colour"], attrs["size"], attrs["position"])
