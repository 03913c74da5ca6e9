"""The toy world's judge as an image task of ``metamorph eval images`` (``toy-judge``): each
generated image is right when the judge names all four attributes of the record's scene. The
demo scores its generations with the same function (:func:`judged`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metamorph_eval.images import ImageTask, PromptRecord
from metamorph_toy import world as W


def judged(judge: Any, pixels: Any, scenes: Sequence[W.Scene]) -> list[tuple[bool, dict[str, str]]]:
    """For images ``(n, 3, h, w)`` in [0, 1]: whether the judge finds each one right for its
    scene (all four attributes named rightly), and what it found."""
    from metamorph_toy.judge import correct

    preds = judge.predict(pixels)
    return [(correct(p, s), p) for p, s in zip(preds, scenes, strict=True)]


class ToyJudgeTask(ImageTask):
    """``toy-judge``: records ``{"id", "prompt", "scene": {"shape", "colour", "size",
    "position"}, "response_prefix"?}``; option ``judge``: a judge directory (a demo run's
    ``judge/``)."""

    name = "toy-judge"

    def __init__(self, judge: str | Path) -> None:
        from metamorph_toy.judge import Judge

        self.judge_dir = str(judge)
        self.judge = Judge.load(judge)

    def settings(self) -> dict[str, Any]:
        return {"task": self.name, "judge": self.judge_dir}

    def score_image(self, record: PromptRecord, pixels: Any) -> dict[str, Any]:
        scene = record.meta.get("scene")
        if not isinstance(scene, dict) or set(scene) != set(W.ATTRIBUTES):
            raise ValueError(
                f"record {record.id!r}: 'scene' must give {list(W.ATTRIBUTES)}, got {scene!r}"
            )
        ((right, found),) = judged(self.judge, pixels[None], [W.Scene(**scene)])
        return {"score": float(right), "found": found}
