"""Conversations and the named chat templates that render them.

A :class:`Conversation` is a list of turns whose text holds ``<image>`` wherever an image
stands, plus the images in order. An ``<image>`` in an assistant turn is a generation target;
anywhere else it is context. Templates are registered components (``create("template",
"llama3")``); :class:`metamorph_core.sequence.SequenceBuilder` renders a conversation turn by
turn so the label mask never depends on diffing rendered strings.
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
    ``(3, h, w)`` pixel values. Stands in a conversation where an image would; a batch of them
    is stacked as it is, not preprocessed again."""

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
    """How turns are rendered. ``assistant_prefix`` is context; the assistant's content and
    ``assistant_suffix`` are trained; ``assistant_separator`` follows, untrained.

    ``bos``: literal text that opens every sequence, ``"<bos>"`` for the tokenizer's own BOS
    token (if it has one), or ``""``. ``required_tokens`` must each be one token of the tokenizer.
    """

    name: str
    bos: str = ""
    default_system: str | None = None
    system_prefix: str = ""
    system_suffix: str = ""
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""
    assistant_suffix: str = ""
    assistant_separator: str = ""
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
        for turn in turns:
            if turn.role == "system":
                out.append((self.system_prefix + turn.content + self.system_suffix, False))
            elif turn.role == "user":
                out.append((self.user_prefix + turn.content + self.user_suffix, False))
            else:
                out += [
                    (self.assistant_prefix, False),
                    (turn.content + self.assistant_suffix, True),
                ]
                out.append((self.assistant_separator, False))
        if add_generation_prompt:
            out.append((self.assistant_prefix, False))
        return [(text, trained) for text, trained in out if text]

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

# No roles: prompt text, then the trained answer ending in a newline (LLaVA's "plain").
PLAIN = ChatTemplate(
    name="plain", bos="<bos>", user_suffix="\n", assistant_suffix="\n", stop=("\n",)
)


def _factory(template: ChatTemplate):  # noqa: ANN202
    def make(**overrides: Any) -> ChatTemplate:
        return template.with_options(**overrides) if overrides else template

    return make


llama3 = _factory(LLAMA3)
chatml = _factory(CHATML)
plain = _factory(PLAIN)
