"""The hf-causal-lm backbone on tiny Llama, Qwen2 (padded embeddings) and Qwen3 checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from metamorph_core import create


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_image_tokens_added_with_mean_rows(backbone_dirs, family):
    path = backbone_dirs[family]
    raw = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    raw_tok = AutoTokenizer.from_pretrained(str(path))
    n_before = len(raw_tok)
    rows_before = raw.get_input_embeddings().weight.shape[0]

    bb = create("backbone", family, pretrained=str(path))
    tok = bb.tokenizer
    assert bb.image_start_id == tok.convert_tokens_to_ids("<image_start>")
    assert bb.image_end_id == tok.convert_tokens_to_ids("<image_end>")
    assert {bb.image_start_id, bb.image_end_id} == {n_before, n_before + 1}
    w = bb.lm.get_input_embeddings().weight
    # never shrunk; grown only when the tokenizer outgrows the matrix
    assert w.shape[0] == max(rows_before, len(tok))
    mean = raw.get_input_embeddings().weight[:n_before].mean(0)
    assert torch.allclose(w[bb.image_start_id], mean) and torch.allclose(w[bb.image_end_id], mean)
    assert torch.equal(w[:n_before], raw.get_input_embeddings().weight[:n_before])
    head = bb.lm.get_output_embeddings().weight
    if head.data_ptr() != w.data_ptr():
        head_mean = raw.get_output_embeddings().weight[:n_before].mean(0)
        assert torch.allclose(head[bb.image_start_id], head_mean)


def test_qwen2_padded_matrix_is_not_shrunk(backbone_dirs):
    bb = create("backbone", "qwen2", pretrained=str(backbone_dirs["qwen2"]))
    assert bb.lm.get_input_embeddings().weight.shape[0] > len(bb.tokenizer)
    assert bb.lm.config.vocab_size == bb.lm.get_input_embeddings().weight.shape[0]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_hidden_states_are_after_final_norm_and_logits_match_hf(backbone_dirs, family):
    bb = create("backbone", family, pretrained=str(backbone_dirs[family])).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    seen = {}
    norm = bb.lm.base_model.norm
    handle = norm.register_forward_hook(lambda m, i, o: seen.update(pre=i[0], post=o))
    with torch.no_grad():
        hidden = bb(bb.embed(ids)).hidden_states
        ref = bb.lm(input_ids=ids)
    handle.remove()
    assert torch.equal(hidden, seen["post"]) and not torch.allclose(hidden, seen["pre"])
    assert torch.allclose(bb.logits(hidden), ref.logits, atol=1e-5)


def test_kv_cache_matches_full_forward(backbone_dirs):
    bb = create("backbone", "llama", pretrained=str(backbone_dirs["llama"])).eval()
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        full = bb(bb.embed(ids)).hidden_states
        first = bb(bb.embed(ids[:, :4]), use_cache=True)
        rest = bb(bb.embed(ids[:, 4:]), cache=first.cache, use_cache=True)
    assert torch.allclose(torch.cat([first.hidden_states, rest.hidden_states], 1), full, atol=1e-5)


def test_explicit_dtype_and_random_init_from_config(backbone_dirs):
    bb16 = create("backbone", "llama", pretrained=str(backbone_dirs["llama"]), dtype="bfloat16")
    assert bb16.dtype == torch.bfloat16
    cfg = {
        "model_type": "qwen3",
        "vocab_size": 400,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
    }
    a = create("backbone", "qwen3", config=cfg, tokenizer=str(backbone_dirs["qwen3"]), seed=3)
    b = create("backbone", "qwen3", config=cfg, tokenizer=str(backbone_dirs["qwen3"]), seed=3)
    assert a.dtype == torch.float32 and a.hidden_size == 32
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_backbone_argument_errors(backbone_dirs):
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        create("backbone", "llama")
    with pytest.raises(ValueError, match="needs tokenizer"):
        create("backbone", "llama", config={"model_type": "llama"})
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        create("backbone", "llama", pretrained=str(backbone_dirs["llama"]), dtype="fp8")


def test_blocks_are_the_decoder_layers_and_a_model_without_them_is_named(backbone_dirs):
    from torch import nn

    from metamorph_core.components.hf_causal_lm import transformer_blocks

    bb = create("backbone", "qwen2", pretrained=str(backbone_dirs["qwen2"]))
    assert bb.blocks() == list(bb.causal_lm.base_model.layers)
    bb.apply_lora(r=2, alpha=4)  # peft wraps the model; the blocks are still found
    assert bb.blocks() == list(bb.causal_lm.base_model.layers)

    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(
        ValueError, match=r"cannot find the transformer blocks of Bare.*strategy=ddp"
    ):
        transformer_blocks(Bare())
