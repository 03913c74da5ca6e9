"""Chat templates against the families' own: the named ``gemma``, ``mistral`` and ``phi3`` equal
their published chat templates as transformers renders them; ``auto`` renders with the
tokenizer's template turn by turn, refuses templates that re-render history, and is the
default when the backbone's tokenizer has a chat template.

The published templates live in ``metamorph_core.testing.chat_templates``; the tokenizers are
tiny ones carrying each family's special tokens (no downloads).
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from metamorph_core import MetaMorphConfig, MetaMorphModel, create
from metamorph_core.config import ComponentSpec
from metamorph_core.conversation import Conversation, Turn
from metamorph_core.errors import ConversationError
from metamorph_core.sequence import IGNORE_INDEX, SequenceBuilder
from metamorph_core.testing import build_tiny_tokenizer, tiny_model_config
from metamorph_core.testing.chat_templates import GEMMA3, LLAMA3, LLAMA3_LLAVA, MISTRAL, PHI3, QWEN2
from metamorph_core.testing.samples import random_image as image

# gemma-2-it (and gemma-1.1): no system turns
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/"
    "assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# re-renders history: earlier answers lose their content (as templates that drop earlier
# thinking blocks do)
FORGETFUL = (
    "{% for message in messages %}{% if message['role'] == 'assistant' and not loop.last %}"
    "{{ '<|im_start|>assistant\n<|im_end|>\n' }}{% else %}{{ '<|im_start|>' + message['role'] + "
    "'\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen3's shape: the latest answer gets an empty thinking block, earlier ones do not
THINKING = (
    "{% for message in messages %}{% if message['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# family -> (its chat template, bos, eos, its special tokens)
FAMILIES = {
    "llama3": (LLAMA3_LLAVA, "<|begin_of_text|>", "<|eot_id|>", []),
    "chatml": (QWEN2, None, "<|im_end|>", []),
    "gemma": (GEMMA3, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "mistral": (MISTRAL, "<s>", "</s>", ["[INST]", "[/INST]"]),
    "phi3": (PHI3, "<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
}
END_OF_TURN = {
    "llama3": "<|eot_id|>",
    "chatml": "<|im_end|>",
    "gemma": "<end_of_turn>",
    "mistral": "</s>",
    "phi3": "<|end|>",
}


def tokenizer(family: str, chat_template: str | None = None):
    """The tiny tokenizer with ``family``'s special tokens and chat template, and the image
    tokens metamorph adds."""
    template, bos, eos, specials = FAMILIES[family]
    tok = build_tiny_tokenizer("llama")
    roles = {"bos_token": bos, "eos_token": eos, "additional_special_tokens": specials}
    tok.add_special_tokens({k: v for k, v in roles.items() if v})
    tok.add_tokens(["<image_start>", "<image_end>"])
    tok.chat_template = template if chat_template is None else chat_template
    return tok


def builder(tok, template: str = "auto") -> SequenceBuilder:
    start, end = tok.convert_tokens_to_ids(["<image_start>", "<image_end>"])
    return SequenceBuilder(tok, create("template", template), 4, start, end)


def chat(*turns: tuple[str, str], images: int = 0, id: str = "c") -> Conversation:
    return Conversation([Turn(r, c) for r, c in turns], [image(i) for i in range(images)], id)


def messages(conversation: Conversation) -> list[dict[str, str]]:
    return [{"role": t.role, "content": t.content} for t in conversation.turns]


def spans(tok, sample) -> list[str]:
    """The trained text of each maximal run of labelled positions."""
    runs, cur = [], []
    for i, lab in zip(sample.input_ids, sample.labels, strict=True):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


TWO_EXCHANGES = [
    ("user", "what colour is the shape?"),
    ("assistant", "the shape is red."),
    ("user", "two plus three"),
    ("assistant", "five"),
]
SYSTEM = ("system", "You are a helpful assistant.")


@pytest.mark.parametrize(
    "family, with_system",
    [("gemma", False), ("gemma", True), ("mistral", False), ("phi3", False), ("phi3", True)],
)
def test_named_templates_render_as_the_familys_own_template(family, with_system):
    tok = tokenizer(family)
    conv = chat(*([SYSTEM] if with_system else []), *TWO_EXCHANGES)
    b = builder(tok, family)
    s = b.encode(conv)
    assert s.input_ids == tok.apply_chat_template(messages(conv), return_dict=False)
    text = b.template.render(conv).replace("<bos>", tok.bos_token)
    assert text == tok.apply_chat_template(messages(conv), tokenize=False)
    eot = END_OF_TURN[family]
    lead = " " if family == "mistral" else ""  # [/INST] then " answer</s>"
    assert spans(tok, s) == [f"{lead}the shape is red.{eot}", f"{lead}five{eot}"]
    assert b.template.stop == (eot,)
    prompt = chat(*([SYSTEM] if with_system else []), *TWO_EXCHANGES[:3])
    want = tok.apply_chat_template(messages(prompt), add_generation_prompt=True, return_dict=False)
    assert b.encode(prompt, add_generation_prompt=True).input_ids == want


def test_named_gemma_matches_gemma_2_and_mistral_prompts_keep_the_system_message():
    tok = tokenizer("gemma", GEMMA2)  # Gemma 1 and 2: the same turns, no system role
    conv = chat(*TWO_EXCHANGES)
    assert builder(tok, "gemma").encode(conv).input_ids == tok.apply_chat_template(
        messages(conv), return_dict=False
    )
    # Mistral v0.3 writes the system message into the last user turn of a prompt; for a
    # one-turn prompt that is the first user turn, where the named template writes it
    tok = tokenizer("mistral")
    prompt = chat(SYSTEM, TWO_EXCHANGES[0])
    want = tok.apply_chat_template(messages(prompt), add_generation_prompt=True, return_dict=False)
    assert builder(tok, "mistral").encode(prompt, add_generation_prompt=True).input_ids == want
    with pytest.raises(ConversationError, match="no user turn right after it"):
        builder(tok, "mistral").encode(chat(SYSTEM, ("assistant", "hi")))


@pytest.mark.parametrize("family", ["llama3", "chatml", "gemma", "mistral", "phi3"])
def test_auto_equals_the_named_template(family):
    tok = tokenizer(family)
    conv = chat(
        ("user", "<image>\nwhat colour is the shape?"),
        ("assistant", "the shape is red."),
        ("user", "draw it"),
        ("assistant", "here: <image>"),
        images=2,
    )
    auto, named = builder(tok), builder(tok, family)
    assert auto.template.name == "auto" and auto.template.stop == named.template.stop
    a, n = auto.encode(conv), named.encode(conv)
    assert (a.input_ids, a.labels) == (n.input_ids, n.labels)
    assert a.image_slots == n.image_slots and a.image_targets == n.image_targets == [False, True]
    prompt = chat(*TWO_EXCHANGES[:3])
    assert (
        auto.encode(prompt, add_generation_prompt=True).input_ids
        == named.encode(prompt, add_generation_prompt=True).input_ids
    )


def test_auto_labels_each_answer_turn_by_turn():
    tok = tokenizer("llama3", LLAMA3)  # Llama 3's own: two newlines after headers, trims
    conv = chat(
        ("user", "<image>\nwhat colour is the shape?"),
        ("assistant", "the shape is red."),
        ("user", "draw it"),
        ("assistant", "sure: <image> a red square."),
        ("user", "two plus three"),
        ("assistant", "five"),
        images=2,
    )
    s = builder(tok).encode(conv)
    assert spans(tok, s) == [
        "the shape is red.<|eot_id|>",
        "sure: <image_start>",
        "<image_end> a red square.<|eot_id|>",
        "five<|eot_id|>",
    ]
    assert s.image_targets == [False, True]
    # without images, the ids are the tokenizer's own rendering of the whole conversation
    text_only = chat(*TWO_EXCHANGES, ("user", "and four?"), ("assistant", "nine"))
    assert builder(tok).encode(text_only).input_ids == tok.apply_chat_template(
        messages(text_only), return_dict=False
    )


def test_auto_generation_prompt_ends_with_the_assistant_header():
    tok = tokenizer("llama3", LLAMA3)
    s = builder(tok).encode(chat(("user", "draw a cat")), add_generation_prompt=True)
    assert tok.decode(s.input_ids) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\ndraw a cat<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert all(lab == IGNORE_INDEX for lab in s.labels)


def test_auto_keeps_an_eos_that_closes_the_conversation_untrained():
    tok = tokenizer("phi3")
    b = builder(tok)
    assert b.template.closing == "<|endoftext|>" and b.template.stop == ("<|end|>",)
    conv = chat(SYSTEM, *TWO_EXCHANGES)
    s = b.encode(conv)
    assert s.input_ids == tok.apply_chat_template(messages(conv), return_dict=False)
    assert s.labels[-1] == IGNORE_INDEX and tok.decode(s.input_ids[-1:]) == "<|endoftext|>"


@pytest.mark.parametrize(
    "template, was, became",
    [(FORGETFUL, "It is red.", "<|im_end|>"), (THINKING, "<think>", "It is red.")],
)
def test_auto_refuses_a_template_that_rewrites_history(template, was, became):
    tok = tokenizer("chatml", template)
    tok.name_or_path = "org/chat-model"
    with pytest.raises(ConversationError) as e:
        builder(tok)
    message = str(e.value)
    assert "backbone tokenizer 'org/chat-model'" in message
    assert "is not prefix-stable" in message and "llama3, chatml, gemma, mistral, phi3" in message
    assert f"{was!r}"[:-1] in message and f"{became!r}"[:-1] in message


def test_auto_on_mistral_refuses_only_conversations_with_a_system_turn(caplog):
    tok = tokenizer("mistral")
    with caplog.at_level(logging.WARNING, logger="metamorph"):
        b = builder(tok)
    assert "conversations with a system turn will fail" in caplog.text
    assert b.encode(chat(*TWO_EXCHANGES)).input_ids == tok.apply_chat_template(
        messages(chat(*TWO_EXCHANGES)), return_dict=False
    )
    with pytest.raises(ConversationError, match=r"first 3 turns of sample 'c' rewrites earlier"):
        b.encode(chat(SYSTEM, *TWO_EXCHANGES))


def test_auto_without_a_chat_template_falls_back_or_refuses():
    tok = tokenizer("llama3")
    tok.chat_template = None
    start, end = tok.convert_tokens_to_ids(["<image_start>", "<image_end>"])
    fallback = SequenceBuilder(tok, create("template", "auto", fallback="llama3"), 4, start, end)
    assert fallback.template.name == "llama3"
    with pytest.raises(ConversationError, match="has none .*set template to a named one"):
        builder(tok)


# -- models ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama3_dir(backbone_dirs, tmp_path_factory):
    """The tiny llama backbone whose tokenizer carries Llama 3's own chat template."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("chat") / "tiny-llama3-instruct"
    shutil.copytree(backbone_dirs["llama"], path)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = LLAMA3
    tok.save_pretrained(str(path))
    return path


def test_auto_is_the_default_when_the_tokenizer_has_a_chat_template(
    llama3_dir, backbone_dirs, tmp_path
):
    assert MetaMorphConfig(encoder="e", backbone="b").template == ComponentSpec(
        "auto", {"fallback": "llama3"}
    )
    default = {"template": MetaMorphConfig(encoder="e", backbone="b").template}
    model = MetaMorphModel.from_config(tiny_model_config(llama3_dir, **default))
    assert model.sequence_builder.template.name == "auto"
    base = MetaMorphModel.from_config(tiny_model_config(backbone_dirs["llama"], **default))
    assert base.sequence_builder.template.name == "llama3"  # no chat template: as before
    # a checkpoint that names its template keeps it, chat template or not
    named = MetaMorphModel.from_config(tiny_model_config(llama3_dir, template="llama3"))
    named.save_pretrained(tmp_path / "ckpt")
    loaded = MetaMorphModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.template.name == loaded.sequence_builder.template.name == "llama3"
    model.save_pretrained(tmp_path / "auto")
    again = MetaMorphModel.from_pretrained(tmp_path / "auto")
    assert again.sequence_builder.template.name == "auto"
    conv = chat(*TWO_EXCHANGES)
    assert again.sequence_builder.encode(conv) == model.sequence_builder.encode(conv)


def test_auto_refuses_a_backbone_whose_template_rewrites_history(backbone_dirs, tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "tiny-thinker"
    shutil.copytree(backbone_dirs["qwen3"], path)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = THINKING
    tok.save_pretrained(str(path))
    with pytest.raises(ConversationError, match=r"tokenizer '.*tiny-thinker' is not prefix-stable"):
        MetaMorphModel.from_config(tiny_model_config(path, template="auto"))


def test_a_model_with_auto_trains_and_generates(llama3_dir):
    torch.manual_seed(0)
    model = MetaMorphModel.from_config(tiny_model_config(llama3_dir, template="auto"))
    conversations = [
        chat(("user", "two plus three"), ("assistant", "five")),
        chat(("user", "<image>\nwhat colour is the shape?"), ("assistant", "red"), images=1),
        chat(*TWO_EXCHANGES),
    ]
    batch = model.prepare_batch(conversations)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(**batch, return_logits=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2
    (result,) = model.eval().generate("two plus three", max_new_tokens=8)
    # the answer it was trained on, ended by the end-of-turn the tokenizer's template writes
    assert result.text == "five" and result.finish_reason == "stop"
    assert model.backbone.tokenizer.decode(result.token_ids[-1:]) == "<|eot_id|>"
