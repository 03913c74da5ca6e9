"""Scoring of answers, by the rules the benchmarks publish.

- :func:`normalize_vqa_answer` / :func:`vqa_accuracy`: the VQA v2 evaluation (visualqa.org):
  punctuation removed or spaced, number words to digits, articles dropped, common contractions
  restored; a prediction scores ``min(1, matching humans / 3)``, averaged over the ten
  leave-one-out subsets of the human answers.
- :func:`extract_choice`: the option letter an answer names (``B``, ``(B)``, ``B.``, "The
  answer is B", or the text of exactly one option).
- :func:`circular_variants` / :func:`circular_correct`: MMBench's circular evaluation: a
  question with k options is asked k times with the options rotated and counts as right only
  if every rotation is answered right.
- :func:`normalize_text` / :func:`exact_match`: case, surrounding spaces and final periods
  ignored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<"]
_PUNCT += ["@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_CONTRACTED = [
    "aren't",
    "can't",
    "couldn't",
    "couldn't've",
    "didn't",
    "doesn't",
    "don't",
    "hadn't",
    "hadn't've",
    "hasn't",
    "haven't",
    "he'd",
    "he'd've",
    "he'll",
    "he's",
    "how'd",
    "how'll",
    "how's",
    "i'd",
    "i'd've",
    "i'll",
    "i'm",
    "i've",
    "isn't",
    "it'd",
    "it'd've",
    "it'll",
    "it's",
    "let's",
    "ma'am",
    "mightn't",
    "mightn't've",
    "might've",
    "mustn't",
    "must've",
    "needn't",
    "not've",
    "o'clock",
    "oughtn't",
    "'ow's'at",
    "shan't",
    "she'd",
    "she'd've",
    "she'll",
    "she's",
    "should've",
    "shouldn't",
    "shouldn't've",
    "somebody'd",
    "somebody'd've",
    "somebody'll",
    "somebody's",
    "someone'd",
    "someone'd've",
    "someone'll",
    "someone's",
    "something'd",
    "something'd've",
    "something'll",
    "something's",
    "that's",
    "there'd",
    "there'd've",
    "there're",
    "there's",
    "they'd",
    "they'd've",
    "they'll",
    "they're",
    "they've",
    "'twas",
    "wasn't",
    "we'd",
    "we'd've",
    "we'll",
    "we're",
    "we've",
    "weren't",
    "what'll",
    "what're",
    "what's",
    "what've",
    "when's",
    "where'd",
    "where's",
    "where've",
    "who'd",
    "who'd've",
    "who'll",
    "who're",
    "who's",
    "who've",
    "why'll",
    "why're",
    "why's",
    "won't",
    "would've",
    "wouldn't",
    "wouldn't've",
    "y'all",
    "y'all'll",
    "y'all'd've",
    "you'd",
    "you'd've",
    "you'll",
    "you're",
    "you've",
]
# the spellings without apostrophes (and with one of two left out) -> the contracted form
_CONTRACTIONS: dict[str, str] = {}
for _form in _CONTRACTED:
    _parts = _form.split("'")
    _CONTRACTIONS.setdefault("".join(_parts), _form)
    if len(_parts) == 3:  # couldn't've: couldnt've and couldn'tve
        _CONTRACTIONS.setdefault(_parts[0] + _parts[1] + "'" + _parts[2], _form)
        _CONTRACTIONS.setdefault(_parts[0] + "'" + _parts[1] + _parts[2], _form)


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(answer: str) -> str:
    """An answer as the VQA evaluation compares it."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of ``prediction`` against the human ``answers``: for each human answer
    left out, ``min(1, matches among the others / 3)``, averaged. With a single reference it is
    exact match (after normalisation)."""
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(a) for a in answers]
    if not refs:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    if len(refs) == 1:
        return float(pred == refs[0])
    scores = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1 :]
        scores.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(scores) / len(scores)


def normalize_text(text: str) -> str:
    """Lower case, inner white space collapsed, surrounding spaces and final periods removed."""
    return " ".join(text.strip().rstrip(".").strip().lower().split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the prediction equals one of ``answers`` after :func:`normalize_text`."""
    pred = normalize_text(prediction)
    return float(any(pred == normalize_text(a) for a in answers))


_LEADING_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.:)\s]|$)")
_ANSWER_IS = re.compile(r"answer(?:\s+is)?\s*[:\-]?\s*\(?([A-Z])\)?(?![A-Za-z])", re.IGNORECASE)
_LONE_LETTER = re.compile(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z])")


def extract_choice(output: str, options: dict[str, str]) -> str | None:
    """The option letter ``output`` chooses, or ``None``: a letter at the start ("B", "(B)",
    "B. cat"), after "answer"/"answer is", standing alone, or else the one option whose text
    the output contains (by :func:`normalize_text`); letters not among ``options`` and
    answers naming several options' texts give ``None``."""
    text = output.strip()
    for pattern in (_LEADING_LETTER, _ANSWER_IS):
        m = pattern.search(text)
        if m and m.group(1).upper() in options:
            return m.group(1).upper()
    letters = {m.group(1) for m in _LONE_LETTER.finditer(text) if m.group(1) in options}
    if len(letters) == 1:
        return letters.pop()
    said = normalize_text(text)
    hits = [k for k, v in options.items() if normalize_text(v) and normalize_text(v) in said]
    return hits[0] if len(hits) == 1 else None


def circular_variants(options: dict[str, str], answer: str) -> list[tuple[dict[str, str], str]]:
    """The k rotations of a k-option question (MMBench's circular evaluation): each a
    ``(options, answer letter)`` with the same texts shifted by one more place; the first is
    the question as given."""
    letters = list(options)
    texts = [options[k] for k in letters]
    right = texts[letters.index(answer)]
    out = []
    for shift in range(len(letters)):
        rotated = texts[shift:] + texts[:shift]
        out.append((dict(zip(letters, rotated, strict=True)), letters[rotated.index(right)]))
    return out


def circular_correct(results: Sequence[bool]) -> float:
    """A question counts as right only if every rotation was answered right."""
    return float(bool(results) and all(results))
