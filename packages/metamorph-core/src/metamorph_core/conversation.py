"""Conversations and the named chat templates that render them.

A :class:`Conversation` is a list of turns whose text holds ``<image>`` wherever an image
stands, plus the images in order. An ``<image>`` in an assistant turn is a generation target;
anywhere else it is context. Templates are registered components (``create("template",
"llama3")``); :class:`metamorph_core.sequence.SequenceBuilder` renders a conversation turn by
turn so the label mask never depends on diffing rendered strings. The named templates here
spell each family's format out; ``auto`` (:mod:`metamorph_core.tokenizer_template`) renders
with the backbone tokenizer's own ``chat_template`` instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from metamorph_core.errors import ConversationError

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")
_LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class ImageFeatures:
    """An image already encoded (e.g. read from a feature cache): ``(num_tokens, c)`` tokens,
    normalised as the encoder gives them. Stands in a conversation where an image would."""

    tokens: Any


@dataclass(frozen=True)
class PixelValues:
    """An image already through the encoder's ``preprocess`` (in a data-loader worker, say):
    its row of the batch, ``(3, h, w)`` pixel values or a dict of the encoder's fields
    (:func:`~metamorph_core.pixels.split_pixels`). Stands in a conversation where an image
    would; a batch of them is stacked as it is (field by field), not preprocessed again."""

    pixels: Any


@dataclass
class Turn:
    role: str  # "system" | "user" | "assistant"
    content: str  # text with IMAGE_PLACEHOLDER where images stand


@dataclass
class Conversation:
    """Turns plus the images their ``<image>`` placeholders stand for, in order of appearance.

    ``images`` hold whatever the encoder's ``preprocess`` accepts (tensors, PIL images) or,
    after feature caching, precomputed token tensors.
    """

    turns: list[Turn]
    images: list[Any] = field(default_factory=list)
    id: str | None = None

    def __post_init__(self) -> None:
        for i, turn in enumerate(self.turns):
            if turn.role not in ROLES:
                raise ConversationError(
                    f"sample {self.id!r}: turn {i} has role {turn.role!r}; use one of {ROLES}"
                )

    @property
    def num_placeholders(self) -> int:
        return sum(t.content.count(IMAGE_PLACEHOLDER) for t in self.turns)

    @property
    def has_target_image(self) -> bool:
        """Whether an assistant turn holds an image (a generation target)."""
        return any(t.role == "assistant" and IMAGE_PLACEHOLDER in t.content for t in self.turns)

    def drop_prompt(self) -> Conversation:
        """The unconditional version of a generation sample: every user turn emptied (its
        images with it). Training with some of these (prompt dropout) gives classifier-free
        guidance on visual tokens a meaningful unconditional branch; inference builds its
        unconditional input with this same function."""
        turns, images, k = [], [], 0
        for turn in self.turns:
            n = turn.content.count(IMAGE_PLACEHOLDER)
            if turn.role == "user":
                turns.append(Turn("user", ""))
            else:
                turns.append(turn)
                images += self.images[k : k + n]
            k += n
        return Conversation(turns, images, self.id)

    @classmethod
    def from_llava(cls, record: dict[str, Any], images: list[Any] | None = None) -> Conversation:
        """A LLaVA-style record (``{"id", "image", "conversations": [{"from", "value"}]}``).

        ``images`` replaces the record's ``image`` field (paths) with loaded images when given.
        """
        sample_id = record.get("id")
        try:
            turns = [Turn(_LLAVA_ROLES[t["from"]], t["value"]) for t in record["conversations"]]
        except KeyError as e:
            raise ConversationError(
                f"sample {sample_id!r}: LLaVA records need 'conversations' with 'from' "
                f"(human/gpt/system) and 'value'; missing or unknown {e}"
            ) from e
        if images is None:
            raw = record.get("image", [])
            images = [raw] if isinstance(raw, str) else list(raw)
        return cls(turns=turns, images=list(images), id=sample_id)


@dataclass(frozen=True)
class ChatTemplate:
    """How turns are rendered. ``assistant_prefix`` is context; ``assistant_content_prefix``,
    the assistant's content and ``assistant_suffix`` are trained; ``assistant_separator``
    follows, untrained. Content is written as given (no trimming).

    ``bos``: literal text that opens every sequence, ``"<bos>"`` for the tokenizer's own BOS
    token (if it has one), or ``""``. ``system_in_user``: a system turn's text (its prefix,
    content and suffix) goes inside the next user turn, after ``user_prefix`` (Gemma, Mistral).
    ``closing``: untrained text that ends a conversation rendered without a generation prompt
    (Phi-3's EOS). ``required_tokens`` must each be one token of the tokenizer.
    """

    name: str
    bos: str = ""
    default_system: str | None = None
    system_prefix: str = ""
    system_suffix: str = ""
    system_in_user: bool = False
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""
    assistant_content_prefix: str = ""
    assistant_suffix: str = ""
    assistant_separator: str = ""
    closing: str = ""
    stop: tuple[str, ...] = ()
    required_tokens: tuple[str, ...] = ()

    def render(self, conversation: Conversation, add_generation_prompt: bool = False) -> str:
        """The full text (for display and debugging; masks are built from the pieces)."""
        return "".join(text for text, _ in self.pieces(conversation, add_generation_prompt))

    def pieces(
        self, conversation: Conversation, add_generation_prompt: bool = False
    ) -> list[tuple[str, bool]]:
        """``(text, trained)`` pieces of the rendered conversation, in order."""
        out: list[tuple[str, bool]] = []
        if self.bos:
            out.append((self.bos, False))
        turns = list(conversation.turns)
        if self.default_system is not None and (not turns or turns[0].role != "system"):
            turns.insert(0, Turn("system", self.default_system))
        waiting = ""  # system text that goes inside the next user turn (system_in_user)
        for turn in turns:
            if turn.role == "system":
                text = self.system_prefix + turn.content + self.system_suffix
                if self.system_in_user:
                    waiting += text
                else:
                    out.append((text, False))
            elif turn.role == "user":
                out.append((self.user_prefix + waiting + turn.content + self.user_suffix, False))
                waiting = ""
            else:
                if waiting:
                    raise self._lone_system(conversation)
                out += [
                    (self.assistant_prefix, False),
                    (self.assistant_content_prefix + turn.content + self.assistant_suffix, True),
                ]
                out.append((self.assistant_separator, False))
        if waiting:
            raise self._lone_system(conversation)
        if add_generation_prompt:
            out.append((self.assistant_prefix, False))
        elif self.closing:
            out.append((self.closing, False))
        return [(text, trained) for text, trained in out if text]

    def _lone_system(self, conversation: Conversation) -> ConversationError:
        return ConversationError(
            f"sample {conversation.id!r}: template '{self.name}' writes a system turn inside the "
            "next user turn, and this system turn has no user turn right after it; follow it "
            "with a user turn or use another template"
        )

    def with_options(self, **overrides: Any) -> ChatTemplate:
        return dataclasses.replace(self, **overrides)


# The paper's code (LLaVA's llama3 conversation): headers end in one newline, no system prompt,
# the assistant header is context, the answer and its <|eot_id|> are trained.
LLAMA3 = ChatTemplate(
    name="llama3",
    bos="<|begin_of_text|>",
    system_prefix="<|start_header_id|>system<|end_header_id|>\n",
    system_suffix="<|eot_id|>",
    user_prefix="<|start_header_id|>user<|end_header_id|>\n",
    user_suffix="<|eot_id|>",
    assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n",
    assistant_suffix="<|eot_id|>",
    stop=("<|eot_id|>",),
    required_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)

# Qwen's ChatML, as LLaVA-NeXT trains it: the answer and <|im_end|> are trained.
CHATML = ChatTemplate(
    name="chatml",
    default_system="You are a helpful assistant.",
    system_prefix="<|im_start|>system\n",
    system_suffix="<|im_end|>\n",
    user_prefix="<|im_start|>user\n",
    user_suffix="<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant_suffix="<|im_end|>",
    assistant_separator="\n",
    stop=("<|im_end|>",),
    required_tokens=("<|im_start|>", "<|im_end|>"),
)

# Gemma (1, 2 and 3): the assistant's role is "model"; Gemma 3 writes a system turn at the top
# of the first user turn (Gemma 1 and 2 refuse system turns).
GEMMA = ChatTemplate(
    name="gemma",
    bos="<bos>",
    system_suffix="\n\n",
    system_in_user=True,
    user_prefix="<start_of_turn>user\n",
    user_suffix="<end_of_turn>\n",
    assistant_prefix="<start_of_turn>model\n",
    assistant_suffix="<end_of_turn>",
    assistant_separator="\n",
    stop=("<end_of_turn>",),
    required_tokens=("<start_of_turn>", "<end_of_turn>"),
)

# Mistral v0.3 and later (control tokens [INST] and [/INST]): "[INST] question[/INST] answer</s>".
# The space before the answer is trained with it (tokenisers merge it into its first token). A
# system turn opens the first user turn, as v0.1-v0.2 wrote it: v0.3's own template puts it in
# the last user turn, and only when the conversation ends there, so it re-renders history.
MISTRAL = ChatTemplate(
    name="mistral",
    bos="<bos>",
    system_suffix="\n\n",
    system_in_user=True,
    user_prefix="[INST] ",
    user_suffix="[/INST]",
    assistant_content_prefix=" ",
    assistant_suffix="</s>",
    stop=("</s>",),
    required_tokens=("[INST]", "[/INST]", "</s>"),
)

# Phi-3 and Phi-3.5 (mini): "<|role|>\ntext<|end|>\n"; a conversation rendered without a
# generation prompt ends with <|endoftext|>, untrained.
PHI3 = ChatTemplate(
    name="phi3",
    system_prefix="<|system|>\n",
    system_suffix="<|end|>\n",
    user_prefix="<|user|>\n",
    user_suffix="<|end|>\n",
    assistant_prefix="<|assistant|>\n",
    assistant_suffix="<|end|>",
    assistant_separator="\n",
    closing="<|endoftext|>",
    stop=("<|end|>",),
    required_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"),
)

# LLaVA's "plain", for base models (alignment, captioning): the tokenizer's BOS, then each turn's
# text as it is, user turns and answers each ending in a newline. It drops what a chat template
# adds: roles and turn markers (who said what is lost in multi-turn conversations), the boundary
# between a system turn and the user text after it (written straight on), and end-of-turn
# tokens: an answer ends at its newline, the stop string, so answers must be one line.
PLAIN = ChatTemplate(
    name="plain", bos="<bos>", user_suffix="\n", assistant_suffix="\n", stop=("\n",)
)


def _factory(template: ChatTemplate):  # noqa: ANN202
    def make(**overrides: Any) -> ChatTemplate:
        return template.with_options(**overrides) if overrides else template

    return make


llama3 = _factory(LLAMA3)
chatml = _factory(CHATML)
gemma = _factory(GEMMA)
mistral = _factory(MISTRAL)
phi3 = _factory(PHI3)
plain = _factory(PLAIN)
