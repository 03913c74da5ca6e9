"""Log-likelihoods of answers: how likely a MetaMorph model finds a continuation as the start of
its answer to a conversation (lmms-eval's ``loglikelihood`` requests; multiple-choice tasks
rank their options by it). Needs no lmms-eval."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from metamorph_core.conversation import Conversation
from metamorph_core.errors import ConversationError
from metamorph_core.generation.prompts import embed_prompts
from metamorph_core.sequence import EncodedSample
from metamorph_eval.lmms.inputs import plan_batches


@dataclasses.dataclass(frozen=True)
class Scored:
    """One continuation's score: ``logprob`` (the sum of its tokens' log-probabilities, natural
    log), ``greedy`` (whether greedy decoding would produce exactly these tokens), ``tokens``
    (how many tokens it has) and :attr:`loss`."""

    logprob: float
    greedy: bool
    tokens: int

    @property
    def loss(self) -> float:
        """The mean negative log-likelihood per token (0 for an empty continuation)."""
        return -self.logprob / self.tokens if self.tokens else 0.0


def encode_continuation(
    model: Any, conversation: Conversation, continuation: str
) -> tuple[EncodedSample, int]:
    """``conversation`` (ending in a user turn) rendered with the model's chat template and the
    assistant header, then ``continuation``'s tokens (tokenised on their own, as generation's
    ``response_prefix`` is); returns the sample and the number of continuation tokens. The
    continuation is taken as written: a leading space is a token of it."""
    builder = model.sequence_builder
    sample = builder.encode(conversation, add_generation_prompt=True)
    tail = builder.text_ids(continuation) if continuation else []
    ids = sample.input_ids + tail
    limit = builder.max_length
    if limit is not None and len(ids) > limit:
        raise ConversationError(
            f"request {conversation.id!r}: the prompt and continuation take {len(ids)} tokens "
            f"with the chat template and images, over the model's context of {limit}; shorten "
            "the task's prompt or use fewer images"
        )
    return dataclasses.replace(sample, input_ids=ids, labels=[]), len(tail)


@torch.no_grad()
def score_batch(
    model: Any, samples: Sequence[EncodedSample], counts: Sequence[int]
) -> list[Scored]:
    """Score one batch: ``samples`` from :func:`encode_continuation`, each ending in its
    ``counts[i]`` continuation tokens. One backbone forward over the left-padded batch (the
    inputs generation builds: :func:`metamorph_core.generation.prompts.embed_prompts`), the
    vocabulary projection only at the positions that predict continuation tokens."""
    embeds, mask = embed_prompts(model, samples)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.backbone(embeds, attention_mask=mask, position_ids=positions).hidden_states
    length = hidden.shape[1]
    out = []
    for i, (sample, k) in enumerate(zip(samples, counts, strict=True)):
        if k == 0:
            out.append(Scored(0.0, True, 0))
            continue
        states = hidden[i, length - k - 1 : length - 1]  # the state at t-1 predicts token t
        logp = model.backbone.logits(states).float().log_softmax(-1)  # (k, vocab)
        target = torch.tensor(sample.input_ids[-k:], device=logp.device)
        total = logp.gather(-1, target[:, None]).sum()
        greedy = bool((logp.argmax(-1) == target).all())
        out.append(Scored(float(total), greedy, k))
    return out


def score_continuations(
    model: Any, requests: Sequence[tuple[Conversation, str]], batch_size: int = 8
) -> list[Scored]:
    """For each ``(conversation, continuation)``: the log-probability of ``continuation`` as
    the start of the model's answer to ``conversation`` (a :class:`Conversation` ending in a
    user turn; images where its ``<image>`` placeholders stand), and whether it is the greedy
    answer. Batches of ``batch_size``, longest first; results in the order of ``requests``."""
    encoded = [encode_continuation(model, c, text) for c, text in requests]
    lengths = [len(s.input_ids) for s, _ in encoded]
    results: list[Scored | None] = [None] * len(encoded)
    for batch in plan_batches(lengths, [None] * len(encoded), batch_size):
        scored = score_batch(model, [encoded[i][0] for i in batch], [encoded[i][1] for i in batch])
        for i, s in zip(batch, scored, strict=True):
            results[i] = s
    return [r for r in results if r is not None]
