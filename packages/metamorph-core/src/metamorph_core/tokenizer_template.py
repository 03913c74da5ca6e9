"""The ``auto`` template: conversations rendered with the backbone tokenizer's own
``chat_template``, turn by turn.

For an assistant turn ``k`` the tokenizer renders the turns before it with the generation
prompt, then the turns up to and including it. Each rendering's token ids must extend the ids
of the one before (prefix stability); the ids an assistant turn adds (its content and the
end-of-turn the template writes) are trained, everything else is context, so labels never
come from diffing whole rendered conversations. Without images, the ids equal
``tokenizer.apply_chat_template(turns)`` exactly.

``<image>`` placeholders reach the template as a sentinel that no template writes, and the ids
are cut there, so every image keeps its place and the sequence builder expands it.

A template that re-renders history (drops earlier thinking blocks, moves the system message,
ends every rendering with an EOS) breaks prefix stability. The template is checked once on a
probe conversation when it meets the tokenizer, and a template that fails is refused with the
tokenizer's name; a trailing EOS that only closes a whole conversation (Phi-3) is recognised
and kept as an untrained closing. Every conversation is checked again as it is rendered.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from metamorph_core.conversation import IMAGE_PLACEHOLDER, ChatTemplate, Conversation, Turn
from metamorph_core.errors import ConversationError

logger = logging.getLogger("metamorph")

#: what the template sees where an ``<image>`` stands: private-use characters no template writes
IMAGE_SENTINEL = "\ue000metamorph-image\ue001"
#: the named templates to suggest when a tokenizer's own template does not do
NAMED = "llama3, chatml, gemma, mistral, phi3 or plain"

#: ``(ids, trained)`` runs of a rendered conversation, ``(None, trained)`` where an image stands
Runs = list[tuple[list[int] | None, bool]]

_PROBE = [
    Turn("user", f"{IMAGE_PLACEHOLDER}\nWhat colour is the square?"),
    Turn("assistant", "It is red."),
    Turn("user", "And the circle?"),
    Turn("assistant", "It is blue."),
]
_PROBE_SYSTEM = Turn("system", "You are a helpful assistant.")
_PROBING = "the probe conversation (user, assistant, user, assistant)"


def tokenizer_name(tokenizer: Any) -> str:
    """How errors name a tokenizer: where it was loaded from, else its class."""
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


@dataclass(frozen=True)
class AutoTemplate:
    """The registered ``auto`` template before it meets a tokenizer.

    :meth:`for_tokenizer` gives the template that renders with the tokenizer's
    ``chat_template``, or, for a tokenizer without one, the registered template ``fallback``
    names (``None``: refuse). The default of ``MetaMorphConfig.template`` is ``auto`` with
    fallback ``llama3``.
    """

    fallback: str | None = None
    name: ClassVar[str] = "auto"

    def for_tokenizer(self, tokenizer: Any) -> TokenizerChatTemplate | ChatTemplate:
        if getattr(tokenizer, "chat_template", None):
            return TokenizerChatTemplate(tokenizer)
        if self.fallback is None:
            raise ConversationError(
                f"template 'auto' renders with the backbone tokenizer's chat template, and "
                f"tokenizer '{tokenizer_name(tokenizer)}' has none (a base model?); set "
                f"template to a named one ({NAMED}) or give the tokenizer a chat_template"
            )
        from metamorph_core.plugins.registry import create

        logger.info(
            "tokenizer '%s' has no chat template: template 'auto' uses its fallback '%s'",
            tokenizer_name(tokenizer),
            self.fallback,
        )
        return create("template", self.fallback)


class TokenizerChatTemplate:
    """Renders conversations with ``tokenizer.chat_template`` (template ``auto``, bound).

    ``end_of_turn``: what the template writes after an assistant's content, trained with it
    (less trailing whitespace: that is ``separator``, untrained); ``stop`` holds it.
    ``closing``: the tokenizer's EOS when the template ends every rendering with it (Phi-3).
    Raises :class:`~metamorph_core.errors.ConversationError` when the template is not
    prefix-stable on the probe conversation (user, assistant, user, assistant).
    """

    name = "auto"
    required_tokens: tuple[str, ...] = ()

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.source = tokenizer_name(tokenizer)
        self.closing = ""
        try:
            self._learn_turn_shape()
        except ConversationError as plain_error:
            if not tokenizer.eos_token:
                raise
            self.closing = tokenizer.eos_token
            try:
                self._learn_turn_shape()
            except ConversationError:
                raise plain_error from None
        self.stop: tuple[str, ...] = (self.end_of_turn,) if self.end_of_turn else ()
        try:
            probe = Conversation([_PROBE_SYSTEM, *_PROBE], [None])
            self._encode(probe, False, "the probe conversation with a system turn")
        except ConversationError as e:
            logger.warning("template 'auto': conversations with a system turn will fail: %s", e)

    # -- the probe --------------------------------------------------------------------------
    def _learn_turn_shape(self) -> None:
        """``end_of_turn`` and ``separator`` from the probe's first answer, then the whole
        probe checked, with and without the generation prompt."""
        user, answer = _PROBE[0], _PROBE[1]
        before = self._render([user], generation=True, what=_PROBING)
        after = self._render([user, answer], generation=False, what=_PROBING)
        if not after.startswith(before):
            raise self._unstable(f"the first 2 turns of {_PROBING}", before, after)
        added = after[len(before) :]
        at = added.rfind(answer.content)
        if at < 0:
            raise ConversationError(
                f"the chat template of backbone tokenizer '{self.source}' renders the answer "
                f"{answer.content!r} as {added!r}, so the answer's tokens cannot be found; set "
                f"template to a named one ({NAMED})"
            )
        tail = added[at + len(answer.content) :]
        self.end_of_turn = tail.rstrip()
        self.separator = tail[len(self.end_of_turn) :]
        self._separator_ids = self._ids(self.separator) if self.separator else []
        self._encode(Conversation(list(_PROBE), [None]), False, _PROBING)
        self._encode(Conversation(_PROBE[:3], [None]), True, _PROBING)

    # -- rendering --------------------------------------------------------------------------
    def _render(self, turns: Sequence[Turn], generation: bool, what: str) -> str:
        """The template's text for ``turns`` with images as the sentinel; the closing, when
        the template has one, cut off renderings without the generation prompt."""
        messages = [
            {"role": t.role, "content": t.content.replace(IMAGE_PLACEHOLDER, IMAGE_SENTINEL)}
            for t in turns
        ]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation
            )
        except Exception as e:  # the template's own raise_exception, or a Jinja error
            roles = ", ".join(t.role for t in turns)
            raise ConversationError(
                f"the chat template of backbone tokenizer '{self.source}' cannot render {what} "
                f"({roles}): {e}; fix the conversation or set template to a named one ({NAMED})"
            ) from e
        if IMAGE_PLACEHOLDER in text:
            raise ConversationError(
                f"the chat template of backbone tokenizer '{self.source}' writes "
                f"'{IMAGE_PLACEHOLDER}' itself, where metamorph expects only images; set "
                f"template to a named one ({NAMED})"
            )
        if not generation and self.closing:
            if not text.endswith(self.closing):
                raise ConversationError(
                    f"the chat template of backbone tokenizer '{self.source}' ends the probe "
                    f"with {self.closing!r} but not {what}; set template to a named one ({NAMED})"
                )
            text = text[: -len(self.closing)]
        return text

    def _ids(self, text: str) -> list[int | None]:
        """Token ids of rendered text, cut at each image sentinel (``None`` there)."""
        ids: list[int | None] = []
        for j, chunk in enumerate(text.split(IMAGE_SENTINEL)):
            if j:
                ids.append(None)
            if chunk:
                ids += self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
        return ids

    def render(self, conversation: Conversation, add_generation_prompt: bool = False) -> str:
        """The full text, as the tokenizer renders it (for display and debugging)."""
        return self.tokenizer.apply_chat_template(
            [{"role": t.role, "content": t.content} for t in conversation.turns],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def encode(self, conversation: Conversation, add_generation_prompt: bool = False) -> Runs:
        """``(ids, trained)`` runs: each assistant turn's content and end-of-turn trained, the
        rest context; ``None`` where an image stands."""
        return self._encode(conversation, add_generation_prompt, f"sample {conversation.id!r}")

    def _encode(self, conversation: Conversation, add_generation_prompt: bool, what: str) -> Runs:
        turns = conversation.turns
        runs: list[tuple[list[int | None], bool]] = []
        done_text, done_ids = "", []  # the rendering up to the last assistant turn so far
        for k, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            if k == 0:
                raise ConversationError(
                    f"{what} opens with an assistant turn; template 'auto' renders the turns "
                    "before each answer, so start with a user (or system) turn"
                )
            header = self._render(turns[:k], generation=True, what=what)
            header_ids = self._ids(header)
            runs.append((self._added(done_text, done_ids, header, header_ids, what, k), False))
            full = self._render(turns[: k + 1], generation=False, what=what)
            full_ids = self._ids(full)
            answer = self._added(header, header_ids, full, full_ids, what, k + 1)
            n_sep = len(self._separator_ids)
            if not (
                n_sep and full.endswith(self.separator) and answer[-n_sep:] == self._separator_ids
            ):
                n_sep = 0
            trained, separator = answer[: len(answer) - n_sep], answer[len(answer) - n_sep :]
            n_images = turn.content.count(IMAGE_PLACEHOLDER)
            if trained.count(None) != n_images:
                raise ConversationError(
                    f"{what}: the chat template of backbone tokenizer '{self.source}' renders "
                    f"turn {k} (assistant) with {trained.count(None)} of its {n_images} "
                    f"'{IMAGE_PLACEHOLDER}' placeholder(s); set template to a named one ({NAMED})"
                )
            runs += [(trained, True), (separator, False)]
            done_text, done_ids = full, full_ids
        if add_generation_prompt or not turns or turns[-1].role != "assistant" or self.closing:
            end = self._render(turns, generation=add_generation_prompt, what=what)
            end_ids = self._ids(end)
            runs.append((self._added(done_text, done_ids, end, end_ids, what, len(turns)), False))
            if not add_generation_prompt and self.closing:
                runs.append((self._ids(self.closing), False))
        placed = sum(ids.count(None) for ids, _ in runs)
        if placed != conversation.num_placeholders:
            raise ConversationError(
                f"{what}: the chat template of backbone tokenizer '{self.source}' renders "
                f"{placed} of the conversation's {conversation.num_placeholders} "
                f"'{IMAGE_PLACEHOLDER}' placeholder(s); set template to a named one ({NAMED})"
            )
        out: Runs = []
        for ids, trained in runs:  # cut at the images
            run: list[int] = []
            for tok in ids:
                if tok is None:
                    out += [(run, trained), (None, trained)]
                    run = []
                else:
                    run.append(tok)
            out.append((run, trained))
        return [(ids, trained) for ids, trained in out if ids is None or ids]

    def _added(
        self,
        before: str,
        before_ids: list[int | None],
        after: str,
        after_ids: list[int | None],
        what: str,
        upto: int,
    ) -> list[int | None]:
        """The ids ``after`` adds to ``before``; refuses when they do not extend them."""
        if after.startswith(before) and after_ids[: len(before_ids)] == before_ids:
            return after_ids[len(before_ids) :]
        where = f"the first {upto} turns of {what}"
        if after.startswith(before):
            raise ConversationError(
                f"the chat template of backbone tokenizer '{self.source}' is not prefix-stable "
                f"in tokens: rendering {where} tokenises the earlier turns differently, so "
                f"labels cannot be built turn by turn; set template to a named one ({NAMED})"
            )
        raise self._unstable(where, before, after)

    def _unstable(self, where: str, before: str, after: str) -> ConversationError:
        at = next(
            (i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b),
            min(len(before), len(after)),
        )
        was = before[at : at + 40].replace(IMAGE_SENTINEL, IMAGE_PLACEHOLDER)
        now = after[at : at + 40].replace(IMAGE_SENTINEL, IMAGE_PLACEHOLDER)
        return ConversationError(
            f"the chat template of backbone tokenizer '{self.source}' is not prefix-stable: "
            f"rendering {where} rewrites earlier turns (at character {at}, {was!r} became "
            f"{now!r}), so labels cannot be built turn by turn. Templates that re-render "
            "history (drop earlier thinking blocks, move the system message) do this; set "
            f"template to a named one that matches the backbone ({NAMED})"
        )
