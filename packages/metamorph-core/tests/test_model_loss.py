"""The VPiT loss arithmetic, recomputed by hand position by position."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metamorph_core.conversation import Conversation, Turn
from metamorph_core.sequence import IGNORE_INDEX
from metamorph_core.testing.samples import generation, text_only, understanding
from metamorph_core.testing.samples import random_image as image


def _trained_text(model, ids, labels) -> str:
    keep = [int(i) for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    return model.backbone.tokenizer.decode(keep)


def test_labels_cover_responses_only_and_images_are_wrapped(make_model):
    model = make_model()
    batch = model.prepare_batch([understanding(), generation(), text_only()])
    tok = model.backbone.tokenizer
    ids, labels = batch["input_ids"], batch["labels"]
    assert _trained_text(model, ids[0], labels[0]) == "the shape is red.<|eot_id|>"
    assert (
        _trained_text(model, ids[1], labels[1])
        == "here is an image based on your request: <image_start><image_end><|eot_id|>"
    )
    assert _trained_text(model, ids[2], labels[2]) == "five<|eot_id|>"
    n = model.num_image_tokens
    start_id, end_id = tok.convert_tokens_to_ids(["<image_start>", "<image_end>"])
    for b, is_target in ((0, False), (1, True)):
        slots = batch["image_slot_mask"][b].nonzero().flatten()
        assert len(slots) == n and (slots.diff() == 1).all()
        first, last = int(slots[0]), int(slots[-1])
        # every image, in prompts too, is wrapped in <image_start> ... <image_end>
        assert ids[b, first - 1] == start_id and ids[b, last + 1] == end_id
        # slots never carry a text label; the wrapping tokens are trained only in responses
        assert (labels[b, first : last + 1] == IGNORE_INDEX).all()
        expect = (start_id, end_id) if is_target else (IGNORE_INDEX, IGNORE_INDEX)
        assert (int(labels[b, first - 1]), int(labels[b, last + 1])) == expect
        assert bool(batch["target_slot_mask"][b].any()) == is_target
    assert not batch["image_slot_mask"][2].any()


def test_loss_matches_hand_computation(make_model):
    torch.manual_seed(0)
    model = make_model().eval()
    convs = [understanding(), generation(), text_only()]
    batch = model.prepare_batch(convs)
    with torch.no_grad():
        out = model(**batch)

        # Rebuild the forward pass by hand: encoder -> projector written into each image's slots.
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        enc = model.encoder(batch["pixel_values"])  # (n_images, t, c), normalised
        assert torch.allclose(enc.norm(dim=-1), torch.ones(enc.shape[:2]), atol=1e-5)
        embeds = model.backbone.embed(ids).clone()
        n = model.num_image_tokens
        starts = {0: [], 1: []}
        for b in (0, 1):
            s = int(batch["image_slot_mask"][b].nonzero()[0])
            starts[b].append(s)
            embeds[b, s : s + n] = model.projector(enc[b])
        hidden = model.backbone(embeds, attention_mask=mask).hidden_states
        logits = model.backbone.logits(hidden)

        # Text: position t-1 predicts label t, response tokens only.
        total, count = 0.0, 0
        for b in range(ids.shape[0]):
            for t in range(1, ids.shape[1]):
                if labels[b, t] != IGNORE_INDEX:
                    total -= F.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
                    count += 1
        assert count == int(out.text_tokens)
        assert out.text_loss.item() == pytest.approx(total / count, rel=1e-5)

        # Visual: only the generated image (sample 1); the state at p-1 predicts token p, so the
        # state at <image_start> predicts the first visual token.
        s = starts[1][0]
        assert ids[1, s - 1] == model.backbone.image_start_id
        vis = [
            1 - F.cosine_similarity(model.head(hidden[1, s + k - 1]), enc[1, k], dim=0).item()
            for k in range(n)
        ]
        assert int(out.visual_tokens) == n
        assert out.visual_loss.item() == pytest.approx(sum(vis) / n, rel=1e-5)
        assert out.loss.item() == pytest.approx(
            out.text_loss.item() + out.visual_loss.item(), rel=1e-6
        )
        assert torch.allclose(out.logits, logits, atol=1e-6)


def test_prompt_images_are_context_only(make_model):
    """Changing the prompt image changes the text loss but adds no visual loss."""
    model = make_model().eval()
    a = model(**model.prepare_batch([understanding(0)]))
    b = model(**model.prepare_batch([understanding(5)]))
    assert a.visual_loss.item() == 0.0 and int(a.visual_tokens) == 0
    assert a.text_loss.item() != b.text_loss.item()


def test_visual_loss_weight_and_registered_losses(make_model):
    batch_convs = [generation(), understanding()]
    base = make_model().eval()
    out = base(**base.prepare_batch(batch_convs))
    weighted = make_model(visual_loss_weight=0.25).eval()
    w = weighted(**weighted.prepare_batch(batch_convs))
    assert w.loss.item() == pytest.approx(out.text_loss.item() + 0.25 * out.visual_loss.item())
    for name in ("mse", "l1"):
        m = make_model(visual_loss=name).eval()
        o = m(**m.prepare_batch(batch_convs))
        assert o.visual_loss.item() > 0 and o.visual_loss.item() != out.visual_loss.item()


def test_no_target_image_gives_zero_visual_loss_and_touches_head(make_model):
    model = make_model()
    out = model(**model.prepare_batch([understanding(), text_only()]))
    assert out.visual_loss.item() == 0.0 and not torch.isnan(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.head.parameters())
    assert all(p.grad is not None for p in model.projector.parameters())


def test_mixed_image_counts_per_sample(make_model):
    """An edit sample with a prompt image and a target image, beside samples with none/one."""
    model = make_model().eval()
    edit = Conversation(
        [Turn("user", "<image>\nmake it blue"), Turn("assistant", "<image>")],
        [image(3), image(4)],
        id="edit",
    )
    batch = model.prepare_batch([text_only(), edit, generation()])
    assert batch["pixel_values"].shape[0] == 3
    out = model(**batch)
    assert int(out.visual_tokens) == 2 * model.num_image_tokens
    # Per-sample losses combine into the batch loss as token-weighted means.
    parts = [model(**model.prepare_batch([c])) for c in (text_only(), edit, generation())]
    vis = sum(p.visual_loss_sum for p in parts) / sum(p.visual_tokens for p in parts)
    txt = sum(p.text_loss_sum for p in parts) / sum(p.text_tokens for p in parts)
    assert out.visual_loss.item() == pytest.approx(vis.item(), rel=1e-5)
    assert out.text_loss.item() == pytest.approx(txt.item(), rel=1e-5)


def test_frozen_encoder_stays_frozen(make_model):
    model = make_model()
    model.train()
    assert not model.encoder.training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    out = model(**model.prepare_batch([generation()]))
    out.loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())


def test_hand_check_prompt_image_then_two_target_images(make_model):
    """One sample: a prompt image (context), then two generated images; plus a sample with a
    target image first, so image order across samples and within a sample both matter."""
    model = make_model().eval()
    story = Conversation(
        [Turn("user", "<image>\ndraw two more"), Turn("assistant", "first <image> then <image>")],
        [image(10), image(11), image(12)],
        id="story",
    )
    batch = model.prepare_batch([generation(13), story])
    n = model.num_image_tokens
    with torch.no_grad():
        out = model(**batch)
        enc = model.encoder(batch["pixel_values"])  # images in order: 13 | 10, 11, 12
        embeds = model.backbone.embed(batch["input_ids"]).clone()
        starts = [(0, int(s)) for s in batch["image_slot_mask"][0].nonzero()[::n].flatten()]
        starts += [(1, int(s)) for s in batch["image_slot_mask"][1].nonzero()[::n].flatten()]
        assert len(starts) == 4
        for i, (b, s) in enumerate(starts):
            embeds[b, s : s + n] = model.projector(enc[i])
        hidden = model.backbone(embeds, attention_mask=batch["attention_mask"]).hidden_states
        targets = [0, 2, 3]  # image 1 (seed 10) is the prompt image of the second sample
        losses = [
            1 - F.cosine_similarity(model.head(hidden[b, s + k - 1]), enc[i, k], dim=0).item()
            for i, (b, s) in enumerate(starts)
            if i in targets
            for k in range(n)
        ]
    assert int(out.visual_tokens) == 3 * n
    assert out.visual_loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_text_only_batch_keeps_projector_and_head_in_the_graph(make_model):
    model = make_model()
    out = model(**model.prepare_batch([text_only()]))
    out.loss.backward()
    assert out.visual_loss.item() == 0.0
    for part in (model.projector, model.head):
        assert all(p.grad is not None and not p.grad.any() for p in part.parameters())


def test_prompt_and_target_images_mixed_in_one_batch(make_model):
    model = make_model().eval()
    out = model(**model.prepare_batch([understanding(), generation(), understanding(3)]))
    assert int(out.visual_tokens) == model.num_image_tokens


def test_unfrozen_encoder_trains(make_model):
    model = make_model(freeze_encoder=False)
    model.train()
    assert model.encoder.training
    model(**model.prepare_batch([generation()])).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_perturb_tokens_keeps_norms_and_reaches_the_expected_cosine():
    from metamorph_core.vision import perturb_tokens

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, 64, generator=g) * 3.0  # unnormalised: norms are kept as they are
    y = perturb_tokens(x, 1.0, torch.Generator().manual_seed(1))
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-4)
    cos = F.cosine_similarity(x, y, dim=-1)
    # level s ~ U(0, 1), cosine ~ 1 / sqrt(1 + s^2): its mean is asinh(1) = 0.881
    assert cos.mean().item() == pytest.approx(0.881, abs=0.01)
    assert cos.min().item() < 0.8 and cos.max().item() > 0.99  # levels vary per sample
    # one level per sample: the two tokens of a sample are perturbed about as much
    per_sample = cos[:, 0] - cos[:, 1]
    assert per_sample.abs().mean().item() < 0.05
    again = perturb_tokens(x, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(y, again)
    assert torch.equal(perturb_tokens(x, 0.0), x)


def test_input_noise_perturbs_only_what_the_llm_reads_of_generated_images(make_model):
    model = make_model().eval()
    batch = model.prepare_batch([understanding(), generation(), text_only()])
    seen = []
    hook = model.projector.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        clean = model(**batch)
        noisy = model(**batch, input_noise=(2.0, 3))
        again = model(**batch, input_noise=(2.0, 3))
    hook.remove()
    assert list(batch["image_is_target"]) == [False, True]
    clean_in, noisy_in = seen[0], seen[1]
    assert torch.equal(noisy_in[0], clean_in[0])  # the understanding image: untouched
    assert not torch.allclose(noisy_in[1], clean_in[1])  # the generated one: perturbed
    assert torch.allclose(noisy_in[1].norm(dim=-1), clean_in[1].norm(dim=-1), rtol=1e-4)
    assert torch.equal(seen[2], noisy_in)  # drawn from the seed: reproducible
    # the targets stay the clean tokens: recompute the visual loss from the noisy run's states
    target = model.encoder(batch["pixel_values"])[1]
    states = noisy.hidden_states[1, :-1][batch["target_slot_mask"][1, 1:]]
    want = model.visual_loss_fn(model.head(states), target).sum()
    assert noisy.visual_loss_sum.item() == pytest.approx(want.item(), rel=1e-5)
    assert noisy.visual_loss_sum.item() != pytest.approx(clean.visual_loss_sum.item(), rel=1e-3)
    assert again.visual_loss_sum.item() == noisy.visual_loss_sum.item()


def test_chunked_text_loss_has_the_same_loss_and_gradients(make_model):
    """``loss_chunk``: the vocabulary projection and cross-entropy a few positions at a time,
    their logits recomputed in backward; the loss and every gradient as computed whole."""
    model = make_model(family="qwen2")  # tied embeddings: the head's gradient has two paths
    batch = model.prepare_batch([understanding(), generation(), text_only()])
    grads = []
    for chunk in (None, 3):
        model.zero_grad()
        out = model(**batch, return_logits=False, loss_chunk=chunk)
        out.loss.backward()
        grads.append((out.text_loss_sum.detach(), {n: p.grad.clone() for n, p in
                      model.named_parameters() if p.grad is not None}))  # fmt: skip
    (whole, a), (chunked, b) = grads
    assert int(model(**batch).text_tokens) > 3  # more than one chunk
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    with pytest.raises(ValueError, match="loss_chunk must be an integer >= 1"):
        model(**batch, return_logits=False, loss_chunk=0)
