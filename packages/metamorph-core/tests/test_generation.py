"""Interleaved generation on a tiny model trained for a few steps, so that greedy choices are
not near-ties: KV cache against the recompute loop, batching against one sample at a time, the
VPiT alignment recomputed by hand, guidance, sampling, streaming, bad input. (Decoding to pixels
and `metamorph generate` need a decoder package: tests/test_generate_command.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from metamorph_core import MetaMorphModel
from metamorph_core.conversation import Conversation, ImageFeatures, Turn
from metamorph_core.errors import ConversationError
from metamorph_core.generation import (
    DoneEvent,
    GenerationConfig,
    ImageEvent,
    TextEvent,
    encode_prompts,
    to_conversations,
)
from metamorph_core.generation.detokenize import IncrementalText
from metamorph_core.testing import build_tiny_tokenizer, tiny_model_config
from metamorph_core.testing.samples import random_image as image
from metamorph_core.testing.trained import AGAIN, ANSWER, BLUE, RED, solid, train

PROMPTS = [
    RED,
    BLUE,
    "two plus three",
    Conversation([Turn("user", "<image>\nwhat colour is the shape?")], [image(3)]),
]
TOL = 1e-5


@pytest.fixture(scope="module")
def model(backbone_dirs) -> MetaMorphModel:
    torch.manual_seed(0)
    # its training data answers image edits with the image alone, no words before it
    config = tiny_model_config(backbone_dirs["llama"], image_answer_prefix="")
    return train(MetaMorphModel.from_config(config))


def same(a, b) -> None:
    """Two result lists: identical text ids and text, visual tokens within TOL."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids and x.text == y.text
        assert x.finish_reason == y.finish_reason and len(x.images) == len(y.images)
        for s, t in zip(x.images, y.images, strict=True):
            assert (s - t).abs().max().item() < TOL


def test_trained_model_generates_text_and_images(model):
    tok = model.backbone.tokenizer
    red, blue, text, und = model.generate(PROMPTS, max_new_tokens=40)
    assert red.text == ANSWER + "<image>" and red.finish_reason == "stop"
    assert blue.text == "sure: <image> a blue circle." and len(blue.images) == 1
    assert text.text == "five" and text.images == []
    assert und.text == "the shape is red."
    start, end = model.backbone.image_start_id, model.backbone.image_end_id
    for r in (red, blue):  # <image_start>, then (n visual tokens, not ids) the forced <image_end>
        k = r.token_ids.index(start)
        assert r.token_ids[k + 1] == end
        (tokens,) = r.images
        assert tokens.shape == (model.num_image_tokens, model.encoder.hidden_size)
        assert torch.allclose(tokens.norm(dim=-1), torch.ones(len(tokens)), atol=1e-5)
    assert red.token_ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")  # end of turn: stop
    # the two samples enter image mode at different steps of the same batch
    assert red.token_ids.index(start) != blue.token_ids.index(start)


def test_cache_matches_recompute_loop(model):
    cached = model.generate(PROMPTS, max_new_tokens=40)
    same(cached, model.generate(PROMPTS, max_new_tokens=40, use_cache=False))
    forced = model.generate_image(PROMPTS[:2], response_prefix=ANSWER)
    same(forced, model.generate_image(PROMPTS[:2], response_prefix=ANSWER, use_cache=False))


def test_batch_matches_one_sample_at_a_time(model):
    batched = model.generate(PROMPTS, max_new_tokens=40)
    lengths = {len(p.sample.input_ids) for p in encode_prompts(model, to_conversations(PROMPTS))}
    assert len(lengths) == len(PROMPTS)  # left padding is exercised
    same(batched, [model.generate(p, max_new_tokens=40)[0] for p in PROMPTS])


def test_one_response_prefix_per_prompt(model):
    """A list of prefixes gives each prompt its own, as if generated one at a time; the wrong
    number is refused by name."""
    prefixes = [ANSWER, "sure: "]
    batched = model.generate_image(PROMPTS[:2], response_prefix=prefixes)
    same(
        batched,
        [
            model.generate_image(p, response_prefix=q)[0]
            for p, q in zip(PROMPTS[:2], prefixes, strict=True)
        ],
    )
    assert not torch.allclose(
        batched[0].images[0], model.generate_image(RED, response_prefix="sure: ")[0].images[0]
    )
    with pytest.raises(ValueError, match="response_prefix holds 1 items for 2 prompts"):
        model.generate(PROMPTS[:2], response_prefix=[ANSWER])


def test_visual_tokens_follow_the_vpit_alignment(model):
    """Recomputed by hand with full forwards: the state at <image_start> predicts visual
    token 1 (head output, L2-normalised); that token goes back in through the projector and
    the state there predicts token 2."""
    (result,) = model.generate_image(RED, response_prefix=ANSWER)
    (p,) = encode_prompts(model, to_conversations(RED), ANSWER, force_image=True)
    ids = torch.tensor([p.sample.input_ids])
    assert ids[0, -1] == model.backbone.image_start_id
    with torch.no_grad():
        embeds = model.backbone.embed(ids)
        first = F.normalize(model.head(model.backbone(embeds).hidden_states[0, -1]), dim=-1)
        embeds = torch.cat([embeds, model.projector(first)[None, None]], dim=1)
        second = F.normalize(model.head(model.backbone(embeds).hidden_states[0, -1]), dim=-1)
    assert torch.allclose(result.images[0][0], first, atol=TOL)
    assert torch.allclose(result.images[0][1], second, atol=TOL)
    assert result.text == "<image>" and result.finish_reason == "image"
    assert result.token_ids == [model.backbone.image_start_id, model.backbone.image_end_id]


def test_image_to_image_reads_the_prompt_image(model):
    red, green = (solid((0.9, 0.1, 0.1)), solid((0.1, 0.9, 0.1)))
    a, b = (model.generate_image(AGAIN, [img])[0] for img in (red, green))
    # the prompt image reaches the computation (100 x the cache-vs-recompute tolerance; this
    # briefly trained model copies it only faintly: measured difference ~1e-3)
    assert (a.images[0] - b.images[0]).abs().max() > 100 * TOL
    same(
        [a, b],
        model.generate_image(AGAIN, [red], use_cache=False)
        + model.generate_image(AGAIN, [green], use_cache=False),
    )
    # an encoded image (e.g. from a feature cache) stands in for the pixels
    with torch.no_grad():
        tokens = model.encode_images(model.encoder.preprocess([red]))[0]
    (c,) = model.generate_image(AGAIN, [ImageFeatures(tokens)])
    same([a], [c])


def test_guidance_runs_both_branches_in_one_forward(model):
    scale = 3.0
    rows = []
    hook = model.backbone.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(args[0].shape[0]), with_kwargs=True
    )
    try:
        guided = model.generate_image(
            [RED, BLUE], response_prefix=ANSWER, visual_guidance_scale=scale
        )
    finally:
        hook.remove()
    # cond + uncond rows in every forward: the prefill, then one per visual token but the last
    assert rows == [4] * model.num_image_tokens

    # the first token by hand: uncond + s * (cond - uncond) of the normalised head outputs
    conv = to_conversations(RED)[0]
    cond, uncond = (
        encode_prompts(model, [c], ANSWER, force_image=True)[0].sample.input_ids
        for c in (conv, conv.drop_prompt())
    )
    assert len(uncond) < len(cond)
    with torch.no_grad():
        c, u = (
            F.normalize(
                model.head(
                    model.backbone(model.backbone.embed(torch.tensor([x]))).hidden_states[0, -1]
                ),
                dim=-1,
            )
            for x in (cond, uncond)
        )
    want = F.normalize(u + scale * (c - u), dim=-1)
    assert torch.allclose(guided[0].images[0][0], want, atol=TOL)

    plain = model.generate_image([RED, BLUE], response_prefix=ANSWER)
    assert not torch.allclose(plain[0].images[0], guided[0].images[0], atol=1e-3)
    same(
        plain, model.generate_image([RED, BLUE], response_prefix=ANSWER, visual_guidance_scale=1.0)
    )
    same(
        guided,
        [
            model.generate_image(p, response_prefix=ANSWER, visual_guidance_scale=scale)[0]
            for p in (RED, BLUE)
        ],
    )
    # in free generation, text comes from the conditional rows only
    free = model.generate([RED, BLUE], max_new_tokens=40, visual_guidance_scale=scale)
    assert [r.text for r in free] == [ANSWER + "<image>", "sure: <image> a blue circle."]


def test_seeded_sampling_is_reproducible(model):
    opts = {"do_sample": True, "temperature": 5.0, "max_new_tokens": 12}
    a = model.generate(PROMPTS, seed=1, **opts)
    same(a, model.generate(PROMPTS, seed=1, **opts))
    b = model.generate(PROMPTS, seed=2, **opts)
    assert [r.token_ids for r in a] != [r.token_ids for r in b]
    # sample i draws from seed + i, whatever else is in the batch
    same([a[2]], model.generate(PROMPTS[2], seed=3, **opts))
    # top-k 1 is greedy
    greedy = model.generate(PROMPTS, max_new_tokens=12)
    same(greedy, model.generate(PROMPTS, seed=0, **{**opts, "top_k": 1}))


def test_stream_yields_what_generate_returns(model):
    results = model.generate(PROMPTS, max_new_tokens=40)
    texts, images, done, order = ["" for _ in PROMPTS], [[] for _ in PROMPTS], {}, []
    for event in model.stream(PROMPTS, max_new_tokens=40):
        assert event.sample not in done, "an event after the sample finished"
        if isinstance(event, TextEvent):
            assert event.text
            texts[event.sample] += event.text
        elif isinstance(event, ImageEvent):
            assert event.index == len(images[event.sample])
            images[event.sample].append(event.tokens)
            assert texts[event.sample].endswith("<image>")  # the placeholder came first
        else:
            assert isinstance(event, DoneEvent)
            done[event.sample] = event.result
        order.append(event.sample)
    assert texts == [r.text for r in results]
    same([done[i] for i in range(len(PROMPTS))], results)
    for got, r in zip(images, results, strict=True):
        assert len(got) == len(r.images) and all(map(torch.equal, got, r.images))
    assert len(set(order[:4])) > 1  # samples interleave


def test_stop_strings_and_token_budget(model):
    (r,) = model.generate(BLUE, max_new_tokens=40, stop=["circle"])
    assert r.text == "sure: <image> a blue " and r.finish_reason == "stop"
    pieces = [
        e.text
        for e in model.stream(BLUE, max_new_tokens=40, stop=["circle"])
        if isinstance(e, TextEvent)
    ]
    assert "".join(pieces) == r.text  # a stop string is never streamed, even in part
    (r,) = model.generate(BLUE, max_new_tokens=3)
    assert len(r.token_ids) == 3 and r.finish_reason == "length"
    # an image once started always completes: the budget ends right after it
    full = model.generate(BLUE, max_new_tokens=40)[0]
    k = full.token_ids.index(model.backbone.image_start_id) + 1
    (r,) = model.generate(BLUE, max_new_tokens=k)
    assert len(r.images) == 1 and r.token_ids == full.token_ids[: k + 1]
    (r,) = model.generate(RED, max_new_tokens=40, ignore_eos=True)
    assert r.finish_reason == "length" and r.text.startswith(ANSWER + "<image>")


def test_per_prompt_budgets_and_stopping_one_sample_leave_the_others_unchanged(model):
    """What a server batching requests needs: one token budget per prompt, and a sample
    stopped mid-way (a client gone) while the others finish exactly as alone."""
    from metamorph_core.generation import stream_encoded

    config = GenerationConfig(max_new_tokens=40)
    encoded = encode_prompts(model, to_conversations([BLUE, RED, "two plus three"]), "", config)
    alone = [model.generate(BLUE, max_new_tokens=3)[0], model.generate(RED, max_new_tokens=40)[0]]
    steps = {"n": 0}

    def stop(i):  # sample 2 is stopped before its fifth step
        steps["n"] += i == 2
        return i == 2 and steps["n"] > 4

    events = list(
        stream_encoded(model, encoded, config, max_new_tokens=[3, 40, 40], should_stop=stop)
    )
    done = {e.sample: e.result for e in events if isinstance(e, DoneEvent)}
    same([done[0], done[1]], alone)
    assert done[2].finish_reason == "cancelled" and len(done[2].token_ids) == 4
    with pytest.raises(ValueError, match="one integer >= 1 per prompt"):
        stream_encoded(model, encoded, config, max_new_tokens=[3, 40])


@pytest.mark.parametrize(
    "options",
    [{}, {"use_cache": False}, {"visual_guidance_scale": 2.0}, {"force": True}],
    ids=["cache", "recompute", "guidance", "image"],
)
def test_prompts_joining_a_running_batch_generate_as_alone(model, options):
    """Continuous batching: prompts handed over by ``admit`` between steps join the running
    batch, finished rows leave it, and every sample ends exactly as it would alone."""
    from metamorph_core.generation import stream_encoded

    options = dict(options)
    force = options.pop("force", False)
    config = GenerationConfig(max_new_tokens=30, **options)
    prompts = PROMPTS if not force else [RED, BLUE, "a red circle", AGAIN]
    prefix = model.image_answer_prefix if force else ""
    encoded = encode_prompts(model, to_conversations(prompts), prefix, config, force)
    budgets = [30, 4, 30, 12]
    calls, rows = [], []
    arrivals = {2: [1], 5: [2, 3]}  # at the 2nd call prompt 1 joins; at the 5th prompts 2, 3

    def admit(running):
        calls.append(running)
        return [(encoded[k], budgets[k]) for k in arrivals.get(len(calls), [])]

    forward = model.backbone.forward

    def counting(embeds, *args, **kwargs):
        rows.append(embeds.shape[0])
        return forward(embeds, *args, **kwargs)

    model.backbone.forward = counting
    try:
        events = list(
            stream_encoded(model, encoded[:1], config, force, max_new_tokens=[30], admit=admit)
        )
    finally:
        del model.backbone.forward
    done = {e.sample: e.result for e in events if isinstance(e, DoneEvent)}
    assert sorted(done) == [0, 1, 2, 3]  # joined samples take the next indices in turn
    run_alone = model.generate_image if force else model.generate
    for k in range(4):
        alone = dataclasses.replace(config, max_new_tokens=budgets[k])
        same([done[k]], run_alone(prompts[k], config=alone))
    assert calls[1] == 1 and calls[-1] == 0  # asked with what runs; asked again once all ended
    width = 2 if config.visual_guidance_scale != 1.0 else 1
    assert max(rows) > width  # the joined rows ran together with the first
    assert rows[-1] < 4 * width  # finished rows left the batch (kept, all four would run)


def test_incremental_text_holds_back_partial_characters_and_stops():
    tok = build_tiny_tokenizer()
    text = "a red é square 😀 on the left"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    inc = IncrementalText(tok)
    pieces = [inc.push(i) for i in ids] + [inc.finish()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    inc = IncrementalText(tok, stop=["on the"])
    streamed = "".join(inc.push(i) for i in ids) + inc.finish()
    assert streamed == inc.text == "a red é square 😀 " and inc.stopped


def test_context_limits(backbone_dirs, model):
    small = MetaMorphModel.from_config(tiny_model_config(backbone_dirs["llama"], max_length=40))
    small.load_state_dict(model.state_dict())
    small.eval()
    n_prompt = len(encode_prompts(small, to_conversations(RED))[0].sample.input_ids)
    (r,) = small.generate(RED, max_new_tokens=100)
    assert r.finish_reason == "length" and n_prompt + len(r.token_ids) <= 40
    with pytest.raises(ConversationError, match="over the maximum of 40"):
        small.generate(RED + " and" * 40)
    with pytest.raises(ConversationError, match=r"needs 5 more, but the context holds 40"):
        small.generate_image(RED, response_prefix=" and" * (40 - n_prompt - 3))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"do_sample": True, "temperature": 0.0}, "temperature must be > 0 when sampling"),
        ({"temperature": 0.0}, "temperature only applies when sampling"),
        ({"do_sample": True, "top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"do_sample": True, "top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"do_sample": True, "top_k": -1}, "top_k must be an integer >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"top_p": 0.9}, "top_p only applies when sampling.*do_sample=True"),
        ({"visual_guidance_scale": -1.0}, "visual_guidance_scale must be >= 0"),
        ({"decoding": {"steps": 0}}, "decoder steps must be an integer >= 1"),
        ({"decoding": {"stepz": 2}}, r"unknown decoder option\(s\) \['stepz'\]"),
        ({"stop": [""]}, "stop strings must be non-empty"),
    ],
)
def test_invalid_settings_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**options)


def test_bad_input_is_refused_clearly(model, tmp_path):
    with pytest.raises(ValueError, match=r"unknown generation option\(s\) \['temprature'\]"):
        model.generate(RED, temprature=0.5)
    # the two guidance knobs have their own names; the old shared one says where each went
    with pytest.raises(ValueError, match="'guidance_scale' is now visual_guidance_scale"):
        model.generate_image(RED, guidance_scale=3.0)
    with pytest.raises(ValueError, match="'decode_kwargs' is now decoding"):
        model.generate(RED, decode_kwargs={"steps": 2})
    with pytest.raises(ValueError, match="no visual decoder is attached.*attach_decoder"):
        model.generate(RED, decode_images=True)
    with pytest.raises(ValueError, match="no visual decoder"):  # when called, not when iterated
        model.stream(RED, decode_images=True)
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="cannot read image file .*not-an-image.png"):
        model.generate_image(AGAIN, [str(bad)])
    with pytest.raises(ValueError, match="images= goes with a single string prompt"):
        model.generate([RED, BLUE], [image(1)])
    with pytest.raises(ConversationError, match="must end with a user turn.*response_prefix"):
        model.generate(Conversation([Turn("user", RED), Turn("assistant", "here")]))
    with pytest.raises(ConversationError, match="placeholder"):
        model.generate("<image> and <image>", [image(1)])


def test_generate_image_answers_as_the_training_data_does(make_model):
    """Without a prefix from the caller, the answer starts with the words the paper's data
    answers generation requests with, then <image_start>."""
    from metamorph_core.generation import encode_prompts

    model = make_model()
    assert model.image_answer_prefix == "Here is an image based on your request: "
    builder = model.sequence_builder
    (default,) = encode_prompts(model, to_conversations(RED), model.image_answer_prefix, None, True)
    ids = default.sample.input_ids
    want = builder.text_ids("Here is an image based on your request: ")
    assert ids[-1] == model.backbone.image_start_id and ids[-1 - len(want) : -1] == want
    # what generate_image sends is exactly that prompt
    (r,) = model.generate_image(RED, max_new_tokens=2)
    (s,) = model.generate_image(RED, response_prefix=model.image_answer_prefix, max_new_tokens=2)
    assert torch.equal(r.images[0], s.images[0])
    (t,) = model.generate_image(RED, response_prefix="", max_new_tokens=2)
    assert not torch.equal(r.images[0], t.images[0])


def test_several_prompt_images_are_laid_out_as_the_research_demo():
    (conv,) = to_conversations("what changed?", [image(1), image(2)])
    assert conv.turns[0].content == "<image><image>\nwhat changed?"


@pytest.mark.parametrize(
    "options",
    [{}, {"visual_guidance_scale": 2.0}, {"do_sample": True, "seed": 3, "temperature": 0.8}],
    ids=["greedy", "guidance", "sampling"],
)
def test_static_cache_matches_dynamic(model, options):
    static = {**options, "cache_implementation": "static"}
    for prompts in (PROMPTS, PROMPTS[:3]):  # 3 rows: padded to 4 with a copy of the last
        same(
            model.generate(prompts, max_new_tokens=40, **options),
            model.generate(prompts, max_new_tokens=40, **static),
        )
    same(
        model.generate_image(PROMPTS[:2], response_prefix=ANSWER, **options),
        model.generate_image(PROMPTS[:2], response_prefix=ANSWER, **static),
    )


def test_compiled_step_is_one_graph_with_the_same_results(model, monkeypatch):
    """The compiled step traces without graph breaks (a CUDA graph needs the whole step) and
    gives the eager results. Traced with dynamo's eager backend: inductor's CPU compile takes a
    minute; the GPU check (tests/test_cuda.py) compiles for real."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from metamorph_core.generation import static_cache

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: real(fn, backend="eager"))
    monkeypatch.setattr(static_cache, "_COMPILED", type(static_cache._COMPILED)())
    torch._dynamo.reset()
    counters.clear()
    static = {"cache_implementation": "static"}
    eager = model.generate(PROMPTS, max_new_tokens=40, **static)
    same(eager, model.generate(PROMPTS, max_new_tokens=40, compile=True, **static))
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    torch._dynamo.reset()


def test_static_and_compile_options_are_checked():
    with pytest.raises(ValueError, match="cache_implementation must be one of"):
        GenerationConfig(cache_implementation="paged")
    with pytest.raises(ValueError, match="'static' needs use_cache=True"):
        GenerationConfig(cache_implementation="static", use_cache=False)
    with pytest.raises(ValueError, match="compile=True compiles the step on a static cache"):
        GenerationConfig(compile=True)


def test_a_backbone_without_a_static_cache_is_refused_up_front(model, monkeypatch):
    from metamorph_core.generation import check_cache
    from metamorph_core.interfaces import Backbone

    monkeypatch.setattr(type(model.backbone), "static_cache", Backbone.static_cache)
    with pytest.raises(ValueError, match="has no static KV cache"):
        check_cache(model, GenerationConfig(cache_implementation="static"))
    with pytest.raises(ValueError, match="has no static KV cache"):  # before the first event
        model.stream(PROMPTS[:1], cache_implementation="static")


def test_a_static_cache_that_grows_keeps_every_position(model):
    """A static batch that outgrows its cache moves to one twice as long (a new shape): the
    hidden states stay those of the growing dynamic cache, padding rows included."""
    from metamorph_core.generation.rows import Rows

    backbone = model.backbone
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(3, 5, backbone.hidden_size, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    dynamic = Rows(backbone, embeds, mask, use_cache=True)
    static = Rows(backbone, embeds, mask, True, static_length=8, static_max=64)
    with torch.no_grad():
        assert torch.allclose(dynamic.prefill(), static.prefill(), atol=TOL)
        for t in range(20):  # 5 + 20 positions: the cache grows 8 -> 16 -> 32
            step = torch.randn(3, backbone.hidden_size, generator=g)
            alive = torch.tensor([True, t % 3 != 0, True])
            assert torch.allclose(dynamic.step(step, alive), static.step(step, alive), atol=TOL)
    assert static.static_length == 32 and static.extra == 1


def test_static_caches_are_reused_between_batches(model):
    """A batch gives its static cache back and the next batch of the same shape takes the same
    one (zeroed), so a compiled step meets the same buffers again."""
    from metamorph_core.generation.static_cache import CACHE_POOL

    static = {"cache_implementation": "static", "max_new_tokens": 8}
    first = model.generate(PROMPTS[:2], **static)
    pooled = {k: [id(c) for c in v] for k, v in CACHE_POOL._free[model.backbone].items()}
    second = model.generate(PROMPTS[:2], **static)
    again = {k: [id(c) for c in v] for k, v in CACHE_POOL._free[model.backbone].items()}
    assert pooled and again == pooled
    same(first, second)
