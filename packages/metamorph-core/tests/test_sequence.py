"""Templates and the sequence builder: rendering, turn-by-turn masks, bad input."""

from __future__ import annotations

import pytest

from metamorph_core import create
from metamorph_core.conversation import Conversation, Turn
from metamorph_core.errors import ConversationError
from metamorph_core.sequence import IGNORE_INDEX, SequenceBuilder
from metamorph_core.testing.samples import random_image as image


def _builder(backbone, template="llama3", **kw) -> SequenceBuilder:
    return SequenceBuilder(
        backbone.tokenizer,
        create("template", template),
        4,
        backbone.image_start_id,
        backbone.image_end_id,
        pad_id=backbone.pad_id,
        **kw,
    )


@pytest.fixture(scope="module")
def llama(backbone_dirs):
    return create("backbone", "llama", pretrained=str(backbone_dirs["llama"]))


@pytest.fixture(scope="module")
def qwen(backbone_dirs):
    return create("backbone", "qwen2", pretrained=str(backbone_dirs["qwen2"]))


def _conv():
    return Conversation(
        [
            Turn("user", "<image>\nwhat colour?"),
            Turn("assistant", "red"),
            Turn("user", "draw it"),
            Turn("assistant", "ok <image>"),
        ],
        [image(0), image(1)],
        id="multi",
    )


def _spans(tokenizer, sample):
    """The trained text of each maximal run of labelled positions."""
    runs, cur = [], []
    for i, lab in zip(sample.input_ids, sample.labels, strict=True):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(tokenizer.decode(cur))
    return runs


def test_llama3_render_and_masks(llama):
    b = _builder(llama)
    text = b.template.render(_conv())
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n<image>\nwhat colour?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\nred<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\ndraw it<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\nok <image><|eot_id|>"
    )
    s = b.encode(_conv())
    assert s.input_ids[0] == llama.tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert s.input_ids.count(s.input_ids[0]) == 1  # one BOS, not two
    # both answers and their <|eot_id|> are trained; the second image's wrap tokens are text
    assert _spans(llama.tokenizer, s) == [
        "red<|eot_id|>",
        "ok <image_start>",
        "<image_end><|eot_id|>",
    ]
    assert s.image_targets == [False, True]
    assert len(s.input_ids) == len(s.labels)


def test_chatml_and_plain(qwen, llama):
    s = _builder(qwen, "chatml").encode(_conv())
    text = qwen.tokenizer.decode(s.input_ids)
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    )
    assert _spans(qwen.tokenizer, s) == [
        "red<|im_end|>",
        "ok <image_start>",
        "<image_end><|im_end|>",
    ]
    p = _builder(llama, "plain").encode(
        Conversation([Turn("user", "<image>"), Turn("assistant", "a red square")], [image(0)])
    )
    assert p.input_ids[0] == llama.tokenizer.bos_token_id
    assert _spans(llama.tokenizer, p) == ["a red square\n"]


def test_generation_prompt_ends_with_assistant_header(llama):
    b = _builder(llama)
    s = b.encode(Conversation([Turn("user", "draw a cat")]), add_generation_prompt=True)
    assert llama.tokenizer.decode(s.input_ids).endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n"
    )
    assert all(lab == IGNORE_INDEX for lab in s.labels)


def test_image_count_mismatch_names_the_sample(llama):
    bad = Conversation(
        [Turn("user", "<image> and <image>"), Turn("assistant", "x")], [image(0)], id="s-17"
    )
    with pytest.raises(
        ConversationError, match=r"'s-17'.*2 '<image>' placeholder\(s\) but 1 image"
    ):
        _builder(llama).encode(bad)


def test_literal_wrap_tokens_and_unknown_roles_are_rejected(llama):
    with pytest.raises(ConversationError, match="literal <image_start>"):
        _builder(llama).encode(Conversation([Turn("user", "<image_start>hi")]))
    with pytest.raises(ConversationError, match="role 'robot'"):
        Conversation([Turn("robot", "hi")], id="r")


def test_template_needs_its_tokens(backbone_dirs):
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = ["hi", "<image_start>", "<image_end>", "<unk>"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>"
    )
    with pytest.raises(
        ConversationError, match=r"template 'llama3' needs the tokens \['<\|begin_of_text"
    ):
        SequenceBuilder(tok, create("template", "llama3"), 4, 1, 2)
    SequenceBuilder(tok, create("template", "plain"), 4, 1, 2)  # plain needs nothing special
    raw = AutoTokenizer.from_pretrained(str(backbone_dirs["llama"]))  # not through metamorph
    with pytest.raises(ConversationError, match="no <image_start> token"):
        SequenceBuilder(raw, create("template", "plain"), 4, 0, 1)


def test_over_length_raises_and_truncation_never_cuts_an_image(llama):
    conv = _conv()
    full = _builder(llama).encode(conv)
    with pytest.raises(
        ConversationError, match=r"'multi' is \d+ tokens long, over the maximum of 20"
    ):
        _builder(llama, max_length=20).encode(conv)
    second = full.image_slots[1]
    for limit in range(second - 1, second + 5):  # every cut point up to the end of the block
        t = _builder(llama, max_length=limit, truncation=True).encode(conv)
        assert len(t.input_ids) == second - 1  # cut just before its <image_start>
        assert t.image_slots == full.image_slots[:1] and t.dropped_images == 1
        assert t.truncated_tokens == len(full.input_ids) - (second - 1)
        assert len(t.images) == 1
    kept = _builder(llama, max_length=second + 5, truncation=True).encode(conv)
    assert kept.image_slots == full.image_slots and kept.dropped_images == 0


def test_truncation_that_leaves_nothing_to_train_or_cuts_a_prompt_is_an_error(llama):
    conv = Conversation([Turn("user", "a long question " * 8), Turn("assistant", "yes")], id="q")
    with pytest.raises(
        ConversationError, match="'q': truncating it to 12 tokens leaves no trained token"
    ):
        _builder(llama, max_length=12, truncation=True).encode(conv)
    prompt = Conversation([Turn("user", "a long question " * 8)], id="p")
    with pytest.raises(
        ConversationError,
        match=r"'p' is \d+ tokens long, over the maximum of 12; shorten it or raise max_length$",
    ):
        _builder(llama, max_length=12, truncation=True).encode(prompt, add_generation_prompt=True)


def test_truncation_is_logged(llama, caplog):
    conv = _conv()
    full = _builder(llama).encode(conv)
    with caplog.at_level("WARNING", logger="metamorph"):
        _builder(llama, max_length=full.image_slots[1], truncation=True).encode(conv)
    assert "sample 'multi' truncated" in caplog.text and "1 image(s) cut" in caplog.text


def test_prompt_dropping_keeps_only_the_answer(llama):
    edit = Conversation(
        [Turn("user", "<image>\nmake it blue"), Turn("assistant", "here: <image>")],
        [image(1), image(2)],
        id="edit",
    )
    dropped = edit.drop_prompt()
    assert [t.content for t in dropped.turns] == ["", "here: <image>"]
    assert len(dropped.images) == 1 and dropped.images[0] is edit.images[1]
    assert (
        dropped.has_target_image
        and not Conversation([Turn("user", "<image>")], [image(0)]).has_target_image
    )
    s = _builder(llama).encode(dropped)
    assert s.image_targets == [True]
