"""Understanding tasks: registered plugins of kind ``eval_task`` that turn records of the
JSONL layout (:mod:`metamorph_eval.records`) into prompts, and answers into scores.

- ``vqa``: open-ended questions, VQA v2 answer normalisation and accuracy (ten human
  answers; one answer: exact match after normalisation). Prompt: the question, then "Answer
  the question using a single word or phrase." (LLaVA's VQA prompt).
- ``multiple-choice``: lettered options listed under the question, then "Answer with the
  option's letter from the given choices directly." (LLaVA's MMBench prompt); the letter is
  extracted from the answer; ``circular`` (default on) is MMBench's circular evaluation.
- ``exact-match``: the question as given; right when the answer equals a reference (case,
  spaces and final periods ignored). Captions, short answers, the toy world's questions.

A task's samples are what the model is asked (a circular question is several samples);
:meth:`EvalTask.aggregate` turns scored samples into metrics with 95% intervals.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from metamorph_eval import scoring, stats
from metamorph_eval.records import EvalRecord


@dataclass
class EvalSample:
    """What the model is asked once: ``id`` (unique; the record's, or ``id@r`` for rotation
    r), the record it comes from, the prompt text with its ``<image>`` placeholders, the image
    paths, and what scoring needs (``answers``, ``options``)."""

    id: str
    record: EvalRecord
    prompt: str
    images: list[str]
    answers: list[str]
    options: dict[str, str] = field(default_factory=dict)


def with_images(question: str, images: Sequence[str]) -> str:
    """The question with an ``<image>`` for every image: where the text places them, else all
    before it, one newline after (the research demo's and LLaVA's layout)."""
    if images and "<image>" not in question:
        return "<image>" * len(images) + "\n" + question
    if question.count("<image>") != len(images):
        raise ValueError(
            f"the question has {question.count('<image>')} <image> placeholders for "
            f"{len(images)} images; give one per image or none"
        )
    return question


class EvalTask:
    """An understanding task. Subclasses set ``name`` and implement :meth:`score`; they may
    override :meth:`samples` (what is asked) and :meth:`aggregate` (the metrics)."""

    name: ClassVar[str] = ""
    #: the default text added after the question (a task option may replace it)
    prompt_suffix: ClassVar[str] = ""
    #: the default budget of generated tokens for an answer
    max_new_tokens: ClassVar[int] = 16

    def __init__(self, prompt_suffix: str | None = None) -> None:
        self.suffix = self.prompt_suffix if prompt_suffix is None else prompt_suffix

    def settings(self) -> dict[str, Any]:
        """What a resumed run must share with the one it continues."""
        return {"task": self.name, "prompt_suffix": self.suffix}

    def samples(self, record: EvalRecord) -> list[EvalSample]:
        question = with_images(record.question, record.images)
        prompt = f"{question}\n{self.suffix}" if self.suffix else question
        return [EvalSample(record.id, record, prompt, record.images, record.answers)]

    def score(self, sample: EvalSample, output: str) -> dict[str, Any]:
        """``{"score": float in [0, 1], ...}`` of one answer (extra keys are recorded)."""
        raise NotImplementedError

    def aggregate(self, scored: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Metrics of scored samples (each the record kept in ``samples.jsonl``)."""
        out = {"accuracy": stats.accuracy([s["score"] for s in scored])}
        by_category: dict[str, list[float]] = defaultdict(list)
        for s in scored:
            if s.get("category") is not None:
                by_category[s["category"]].append(s["score"])
        if by_category:
            out["per_category"] = {c: stats.accuracy(v) for c, v in sorted(by_category.items())}
        return out


class VQATask(EvalTask):
    name = "vqa"
    prompt_suffix = "Answer the question using a single word or phrase."

    def score(self, sample: EvalSample, output: str) -> dict[str, Any]:
        return {
            "score": scoring.vqa_accuracy(output, sample.answers),
            "normalized": scoring.normalize_vqa_answer(output),
        }


class ExactMatchTask(EvalTask):
    name = "exact-match"
    max_new_tokens = 32

    def score(self, sample: EvalSample, output: str) -> dict[str, Any]:
        return {"score": scoring.exact_match(output, sample.answers)}


class MultipleChoiceTask(EvalTask):
    name = "multiple-choice"
    prompt_suffix = "Answer with the option's letter from the given choices directly."
    max_new_tokens = 8

    def __init__(self, prompt_suffix: str | None = None, circular: bool = True) -> None:
        super().__init__(prompt_suffix)
        self.circular = circular

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "circular": self.circular}

    def samples(self, record: EvalRecord) -> list[EvalSample]:
        if not record.options:
            raise ValueError(f"record {record.id!r} has no 'options' for a multiple-choice task")
        question = with_images(record.question, record.images)
        variants = scoring.circular_variants(record.options, record.answers[0])
        if not self.circular:
            variants = variants[:1]
        out = []
        for r, (options, answer) in enumerate(variants):
            listed = "\n".join(f"{k}. {v}" for k, v in options.items())
            prompt = f"{question}\n{listed}" + (f"\n{self.suffix}" if self.suffix else "")
            sid = record.id if len(variants) == 1 else f"{record.id}@{r}"
            out.append(EvalSample(sid, record, prompt, record.images, [answer], options))
        return out

    def score(self, sample: EvalSample, output: str) -> dict[str, Any]:
        choice = scoring.extract_choice(output, sample.options)
        return {"score": float(choice == sample.answers[0]), "choice": choice}

    def aggregate(self, scored: Sequence[dict[str, Any]]) -> dict[str, Any]:
        out = super().aggregate(scored)  # every asked rotation counted alone
        if not self.circular:
            return out
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for s in scored:
            groups[s["record_id"]].append(s)
        circular = [
            scoring.circular_correct([s["score"] == 1.0 for s in g]) for g in groups.values()
        ]
        out["first_rotation_accuracy"] = stats.accuracy(
            [g[0]["score"] for g in groups.values() if g]
        )
        out["circular_accuracy"] = stats.accuracy(circular)
        out["accuracy_of_rotations"] = out.pop("accuracy")
        out["accuracy"] = out["circular_accuracy"]
        return out


BUILTIN_TASKS: dict[str, tuple[type[EvalTask], str]] = {
    "vqa": (VQATask, "open-ended VQA: VQA v2 answer normalisation and accuracy"),
    "multiple-choice": (
        MultipleChoiceTask,
        "lettered options, the letter extracted, MMBench's circular evaluation",
    ),
    "exact-match": (ExactMatchTask, "short answers or captions: exact match after normalising"),
}


def guess_task(records: Sequence[EvalRecord]) -> str:
    """The built-in task a file's records fit: options -> ``multiple-choice``; several
    reference answers -> ``vqa``; else ``exact-match``."""
    if any(r.options for r in records):
        return "multiple-choice"
    if any(len(r.answers) > 1 for r in records):
        return "vqa"
    return "exact-match"
