""":class:`MetaMorphLMMS`: a MetaMorph checkpoint as an lmms-eval "simple" model.

lmms-eval hands a simple model each request's task text (``context``), the task's
``doc_to_visual`` and where the document is (``doc_id``, ``task``, ``split``); the model fetches
the document from ``self.task_dict`` (filled by lmms-eval), reads its images and renders the
prompt itself. Ours renders one user turn with the model's own chat template, the images where
``<image>`` stands in the text or else before it with one newline after (the layout of
``metamorph eval understanding``, :func:`metamorph_eval.lmms.inputs.prompt_text`), and answers
through :meth:`MetaMorphModel.generate <metamorph_core.MetaMorphModel.generate>`, so the same
question gets the same answer on either route.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from metamorph_core.conversation import Conversation, ImageFeatures, Turn
from metamorph_eval.lmms import INSTALL_HINT
from metamorph_eval.lmms.inputs import (
    as_images,
    generation_options,
    options_key,
    parse_batch_size,
    plan_batches,
    prompt_text,
)
from metamorph_eval.lmms.likelihood import score_continuations

try:
    from lmms_eval.api.instance import GenerationResult, Instance
    from lmms_eval.api.model import lmms
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError(
        f"metamorph_eval.lmms.model is the metamorph model for lmms-eval, which is not "
        f"installed: {INSTALL_HINT}"
    ) from e

logger = logging.getLogger("metamorph")


def pairs_survive() -> bool:
    """Whether the installed lmms-eval's evaluator keeps a ``loglikelihood`` result, a
    ``(float, bool)`` pair, as it is (lmms-eval 0.7.3 does not: its
    ``unwrap_generation_output`` turns anything but strings and its ``GenerationResult`` into
    a string, and every loglikelihood task then fails)."""
    try:
        from lmms_eval.api.instance import unwrap_generation_output
    except ImportError:  # versions before it had no such step
        return True
    return unwrap_generation_output((0.5, True))[0] == (0.5, True)


def _default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


class MetaMorphLMMS(lmms):
    """``lmms-eval --model metamorph --model_args pretrained=CKPT[,key=value...]``.

    ``model_args``: ``pretrained`` (a checkpoint directory written by ``save_pretrained``, or
    an already loaded :class:`~metamorph_core.MetaMorphModel` from Python); ``device``
    (default ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``); ``dtype``
    (``float32``, ``bfloat16``, ``float16``; default: the checkpoint's; applies when loading a
    directory); ``batch_size``
    (lmms-eval's ``--batch_size``; ``auto`` is 8); ``max_new_tokens`` (when a task's
    ``generation_kwargs`` set none; default 256); ``seed`` (of sampling, when a task samples);
    ``multi_round_history`` (``generate_until_multi_round``: ``False``, as lmms-eval's own
    models do, asks each round as its own user turn, the task's ``doc_to_text`` putting what
    it needs of earlier rounds into the text; ``True`` keeps the earlier rounds' turns and
    images in the conversation); ``loglikelihood`` (what ``loglikelihood`` reports per
    continuation: ``loss``, the default, is the mean negative log-likelihood of its tokens,
    the value lmms-eval's own models report and its ``multiple_choice`` scoring expects: it
    picks the option of the *lowest* value; ``logprob`` is the summed log-probability, as the
    interface's docstring describes it, for code that takes the highest). Other arguments
    raise ``TypeError``.

    Requests are batched ``batch_size`` at a time, those with equal generation settings
    together, longest first; results come back in the order of the requests.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: Any,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 256,
        seed: int | None = None,
        multi_round_history: bool = False,
        loglikelihood: str = "loss",
        max_batch_size: int | None = None,  # lmms-eval passes it; batches have a fixed size
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(
                f"unknown model_args {sorted(unknown)} for --model metamorph; known: pretrained, "
                "device, dtype, batch_size, max_new_tokens, seed, multi_round_history, "
                "loglikelihood"
            )
        from metamorph_core import MetaMorphModel

        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if seed is not None and not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if loglikelihood not in ("loss", "logprob"):
            raise ValueError(
                f"loglikelihood must be 'loss' (mean negative log-likelihood per token, what "
                f"lmms-eval's multiple_choice scoring expects) or 'logprob' (summed "
                f"log-probability), got {loglikelihood!r}"
            )
        device = device or _default_device()
        if isinstance(pretrained, MetaMorphModel):
            model = pretrained
        elif isinstance(pretrained, (str, os.PathLike)):
            dtype = None if dtype in (None, "auto") else str(dtype)
            model = MetaMorphModel.from_pretrained(pretrained, dtype=dtype)
        else:
            raise TypeError(
                f"pretrained must be a checkpoint directory or a MetaMorphModel, got "
                f"{type(pretrained).__name__}; pass --model_args pretrained=DIR"
            )
        self.model = model.to(device).eval()
        self._device = torch.device(device)
        self.batch_size = parse_batch_size(batch_size)
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.multi_round_history = bool(multi_round_history)
        self.loglikelihood_value = loglikelihood

    @property
    def device(self) -> torch.device:
        return self._device

    # -- requests ----------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except KeyError as e:
            raise KeyError(
                f"task {task!r} split {split!r} is not in the model's task_dict; lmms-eval's "
                "evaluator fills it, so run the model through lmms_eval.evaluator"
            ) from e

    def _length(self, text: str) -> int:
        return len(self.model.backbone.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _conversation(
        self, context: str, visuals: Any, where: str, history: Conversation | None = None
    ) -> Conversation:
        images = as_images(visuals, where)
        turn = Turn("user", prompt_text(context, len(images), where))
        if history is None:
            return Conversation([turn], images, id=where)
        return Conversation([*history.turns, turn], [*history.images, *images], id=where)

    def _bar(self, total: int, what: str) -> Any:
        return tqdm(total=total, disable=self.rank != 0, desc=f"metamorph {what}")

    # -- lmms-eval's interface ---------------------------------------------------------------
    def generate_until(self, requests: Sequence[Instance]) -> list[str]:
        """Each request's answer: ``args`` are ``(context, generation_kwargs, doc_to_visual,
        doc_id, task, split)``; decoding as :func:`~metamorph_eval.lmms.inputs.
        generation_options` reads the task's ``generation_kwargs`` (``until`` strings stop it,
        cut before them). The text is returned as generated (lmms-eval strips it before
        scoring); a generated image stands as ``<image>`` in it."""
        parsed = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            options = generation_options(gen_kwargs, self.max_new_tokens, self.seed)
            parsed.append((context, options, doc_to_visual, doc_id, task, split))
        lengths = [self._length(p[0]) for p in parsed]
        keys = [options_key(p[1]) for p in parsed]
        out: list[str] = [""] * len(parsed)
        with self._bar(len(parsed), "generate_until") as bar:
            for batch in plan_batches(lengths, keys, self.batch_size):
                convs = []
                for i in batch:
                    context, _, doc_to_visual, doc_id, task, split = parsed[i]
                    where = f"task {task!r} doc {doc_id}"
                    visuals = doc_to_visual(self._doc(task, split, doc_id))
                    convs.append(self._conversation(context, visuals, where))
                results = self.model.generate(convs, **parsed[batch[0]][1])
                for i, result in zip(batch, results, strict=True):
                    out[i] = result.text
                bar.update(len(batch))
        return out

    def generate_until_multi_round(self, requests: Sequence[Instance]) -> list[list[str]]:
        """lmms-eval's multi-round protocol: ``args`` are ``(context, generation_kwargs,
        doc_to_visual, doc_to_text, doc_id, task, split)``. Round 0 asks ``context`` with
        ``doc_to_visual(doc)``; after each round the task's ``doc_to_text(doc,
        previous_output=this doc's answers so far, round_idx=r, previous_round_info=...)``
        returns ``(visuals, context, terminal, answers, info)``: the next round's images and
        text, whether the document is finished, its answers (the task may rewrite them) and
        what it passes to its next call. Each document's result is its list of answers.
        ``multi_round_history`` decides whether earlier rounds stay in the conversation."""
        parsed = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            options = generation_options(gen_kwargs, self.max_new_tokens, self.seed)
            parsed.append((context, options, doc_to_visual, doc_to_text, doc_id, task, split))
        lengths = [self._length(p[0]) for p in parsed]
        keys = [options_key(p[1]) for p in parsed]
        out: list[list[str]] = [[] for _ in parsed]
        with self._bar(len(parsed), "multi-round") as bar:
            for batch in plan_batches(lengths, keys, self.batch_size):
                for i, answers in zip(batch, self._rounds([parsed[i] for i in batch]), strict=True):
                    out[i] = answers
                bar.update(len(batch))
        return out

    def _rounds(self, items: list[tuple[Any, ...]]) -> list[list[str]]:
        """Run one batch of multi-round documents until each one's ``doc_to_text`` says it is
        finished; the batch shrinks as documents finish."""
        options = items[0][1]
        docs, wheres, contexts, visuals = [], [], [], []
        for context, _, doc_to_visual, _, doc_id, task, split in items:
            doc = self._doc(task, split, doc_id)
            docs.append(doc)
            wheres.append(f"task {task!r} doc {doc_id}")
            contexts.append(context)
            visuals.append(doc_to_visual(doc))
        answers: list[list[str]] = [[] for _ in items]
        infos: list[Any] = [None] * len(items)
        history: list[Conversation | None] = [None] * len(items)
        live = list(range(len(items)))
        round_idx = 0
        while live:
            convs = [
                self._conversation(
                    contexts[i], visuals[i], f"{wheres[i]} round {round_idx}", history[i]
                )
                for i in live
            ]
            results = self.model.generate(convs, **options)
            round_idx += 1
            still = []
            for i, conv, result in zip(live, convs, results, strict=True):
                answers[i].append(result.text)
                if self.multi_round_history:
                    made = [ImageFeatures(tokens) for tokens in result.images]
                    turn = Turn("assistant", result.text)
                    history[i] = Conversation([*conv.turns, turn], [*conv.images, *made])
                doc_to_text: Callable[..., Any] = items[i][3]
                step = doc_to_text(
                    docs[i],
                    previous_output=list(answers[i]),
                    round_idx=round_idx,
                    previous_round_info=infos[i],
                )
                next_visuals, next_context, terminal, rewritten, infos[i] = step
                if rewritten is not None:
                    answers[i] = list(rewritten)
                if not terminal:
                    contexts[i], visuals[i] = next_context, next_visuals
                    still.append(i)
            live = still
        return answers

    def loglikelihood(self, requests: Sequence[Instance]) -> list[Any]:
        """``(value, is greedy)`` of each request's continuation as the start of the model's
        answer, the value as the ``loglikelihood`` model argument says (default: the mean
        negative log-likelihood of its tokens; lower is likelier). ``args`` are ``(context, continuation or doc_to_target, doc_to_visual,
        doc_id, task, split)`` (or ``(context, continuation)``, text only). The context is
        one user turn with its images, rendered with the chat template and the assistant
        header; the continuation's tokens follow as written (multiple-choice tasks prefix
        their ``target_delimiter``, a space by default: set ``target_delimiter: ""`` for a
        chat model's answer). See :mod:`metamorph_eval.lmms.likelihood`.

        Where the installed lmms-eval's evaluator would turn ``(float, bool)`` pairs into
        strings (0.7.3 passes every result through ``unwrap_generation_output``, which keeps
        only strings), each pair travels inside lmms-eval's ``GenerationResult(text=pair)``,
        which that function unwraps back to the pair: :func:`pairs_survive`. (0.7.3's
        ``--use_cache`` still fails on loglikelihood results, wrapped or not.)"""
        parsed = []
        for req in requests:
            args = req.args
            if len(args) == 2:
                parsed.append((args[0], args[1], None, None, None, None))
            else:
                parsed.append(tuple(args[:6]))
        lengths = [
            self._length(p[0]) + self._length(p[1] if isinstance(p[1], str) else "") for p in parsed
        ]
        out: list[tuple[float, bool]] = [(0.0, False)] * len(parsed)
        with self._bar(len(parsed), "loglikelihood") as bar:
            for batch in plan_batches(lengths, [None] * len(parsed), self.batch_size):
                pairs, seen = [], {}  # a multiple-choice document's options share its images
                for i in batch:
                    context, target, doc_to_visual, doc_id, task, split = parsed[i]
                    where = f"task {task!r} doc {doc_id}"
                    doc = None if task is None else self._doc(task, split, doc_id)
                    continuation = target if isinstance(target, str) else target(doc)
                    if not isinstance(continuation, str):
                        raise ValueError(
                            f"{where}: a loglikelihood continuation must be a string, got "
                            f"{continuation!r} from the task's doc_to_target"
                        )
                    key = (task, split, doc_id, id(doc_to_visual))
                    if key not in seen:
                        seen[key] = None if doc_to_visual is None else doc_to_visual(doc)
                    visuals = seen[key]
                    pairs.append((self._conversation(context, visuals, where), continuation))
                scored = score_continuations(self.model, pairs, batch_size=len(pairs))
                for i, s in zip(batch, scored, strict=True):
                    value = s.logprob if self.loglikelihood_value == "logprob" else s.loss
                    out[i] = (value, s.greedy)
                bar.update(len(batch))
        if pairs_survive():
            return out
        return [GenerationResult(text=pair) for pair in out]  # type: ignore[arg-type]
