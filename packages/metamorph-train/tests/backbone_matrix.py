"""The backbone family matrix: every check a transformers causal-LM family must pass to be
listed as supported, run on a tiny random model of the family (``TINY_FAMILIES``, its
tokenizer carrying the family's published chat template), and the table of the results that
docs/backbones.md shows.

Imported by test_backbone_families.py; run under torchrun it is the FSDP2 check of every family:

    torchrun --nproc_per_node=2 backbone_matrix.py ROOT OUT.json

(``ROOT`` holds one saved tiny backbone per family; every rank runs the same batch sharded
and unsharded and compares the loss and the gathered gradients.)
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from metamorph_core import MetaMorphModel
from metamorph_core.config import ComponentSpec
from metamorph_core.conversation import Conversation, Turn
from metamorph_core.testing import TINY_FAMILIES, samples, save_tiny_backbone, tiny_model_config
from metamorph_core.testing.trained import ANSWER, BLUE, RED, train

FAMILIES = list(TINY_FAMILIES)
# every family's template: the tokenizer's own where it has one, else the llama3 fallback;
# Qwen3's published template re-renders earlier answers (an empty thinking block on the last
# one only), which `auto` refuses (test_templates.py): its users name `chatml`
AUTO = ComponentSpec("auto", {"fallback": "llama3"})
NAMED = {"qwen3": "chatml"}
PROMPTS = [
    RED,
    BLUE,
    "two plus three",
    Conversation([Turn("user", "<image>\nwhat colour is the shape?")], [samples.random_image(3)]),
]
TOL = 1e-5
# the table's columns after the family's name: (key, heading)
COLUMNS = [
    ("model_type", "transformers `model_type`"),
    ("tied", "tied embeddings"),
    ("template", "template `auto` renders with"),
    ("logits", "logits = transformers'"),
    ("loss", "VPiT loss falls"),
    ("lora", "LoRA step (targets)"),
    ("cache", "KV cache (dynamic, static) = recompute"),
    ("save_load", "save/load round trip"),
    ("fsdp2", "FSDP2 units (2 ranks)"),
    ("train_cli", "`metamorph train`"),
]


@dataclass
class Row:
    """One family's results: ``cells`` for the table, ``failures`` (check -> message)."""

    family: str
    cells: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def check(self, key: str, fn: Any, *args: Any) -> Any:
        """Run one check; its return value is the cell (``True``: a tick)."""
        try:
            value = fn(*args)
        except Exception as e:  # noqa: BLE001 (recorded and asserted by the tests)
            self.failures[key] = f"{type(e).__name__}: {e}"
            self.cells[key] = "FAILED"
            return None
        self.cells[key] = "yes" if value is True else str(value)
        return value


def model_for(backbone: Path, family: str) -> MetaMorphModel:
    torch.manual_seed(0)
    template = ComponentSpec(NAMED[family]) if family in NAMED else AUTO
    return MetaMorphModel.from_config(tiny_model_config(backbone, template=template))


def template_cell(model: MetaMorphModel, family: str) -> str:
    template = model.sequence_builder.template
    if family in NAMED:
        return f"named `{template.name}` (`auto` refuses the family's template)"
    if template.name != "auto":
        return f"fallback `{template.name}` (no chat template)"
    return "the tokenizer's chat template"


def logits_match(model: MetaMorphModel) -> bool:
    """The backbone's forward (embeddings, final norm, logit head) is the family's own."""
    bb = model.backbone.eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 23, 64, 11]])
    with torch.no_grad():
        ours = bb.logits(bb(bb.embed(ids)).hidden_states)
        theirs = bb.causal_lm(input_ids=ids).logits
    diff = (ours - theirs).abs().max().item()
    assert diff < TOL, f"logits differ from transformers' by {diff:.2e}"
    return True


def loss_falls(model: MetaMorphModel) -> bool:
    """Finite text and visual losses whose gradients reach the encoder side, the LLM and the
    head; 40 full-batch steps on the trained set more than halve them."""
    batch = model.prepare_batch(samples_for_loss())
    model.train()
    out = model(**batch, return_logits=False)
    assert torch.isfinite(out.loss), out.loss
    out.loss.backward()
    for part in ("projector", "head", "backbone"):
        grads = [p.grad for p in getattr(model, part).parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), part
    model.zero_grad()
    before = out.loss.item()
    train(model, steps=40)
    with torch.no_grad():
        after = model(**batch, return_logits=False).loss.item()
    assert after < 0.5 * before, f"loss {before:.3f} -> {after:.3f} in 40 steps"
    return True


def samples_for_loss() -> list[Conversation]:
    return [samples.understanding(0), samples.generation(1), samples.text_only()]


def same(a: list[Any], b: list[Any]) -> None:
    """Identical text ids and text, visual tokens within TOL."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids, (x.text, y.text)
        assert len(x.images) == len(y.images), (x.text, y.text)
        for s, t in zip(x.images, y.images, strict=True):
            diff = (s - t).abs().max().item()
            assert diff < TOL, f"visual tokens differ by {diff:.2e}"


def generations(model: MetaMorphModel, **kw: Any) -> list[Any]:
    """Text answers and forced image answers (``response_prefix``), greedy."""
    return model.generate(PROMPTS, max_new_tokens=24, **kw) + model.generate_image(
        PROMPTS[:2], response_prefix=ANSWER, **kw
    )


def cache_equals_recompute(model: MetaMorphModel) -> bool:
    """The dynamic and the static KV cache give the answers of the recompute loop."""
    cached = generations(model)
    assert any(r.images for r in cached), "no image generated"
    same(cached, generations(model, use_cache=False))
    same(cached, generations(model, cache_implementation="static"))
    return True


def save_load(model: MetaMorphModel, where: Path) -> bool:
    model.save_pretrained(where)
    loaded = MetaMorphModel.from_pretrained(where)
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    same(generations(model), generations(loaded))
    return True


def lora_step(backbone: Path, family: str, where: Path) -> str:
    """LoRA on every linear layer of the LLM: one AdamW step moves the LoRA matrices and the
    image-token rows and leaves the base weights; the adapter checkpoint holds those alone and
    reloads to the same outputs."""
    model = model_for(backbone, family)
    model.apply_lora(r=4, alpha=8)
    named = dict(model.named_parameters())
    lora = {n: p.detach().clone() for n, p in named.items() if "lora_" in n}
    base = {
        n: p.detach().clone()
        for n, p in named.items()
        if n.startswith("backbone.") and not p.requires_grad
    }
    tokens = {n: p.detach().clone() for n, p in named.items() if "trainable_tokens" in n}
    assert tokens, "the image tokens' rows are not trained"
    targets = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora})
    assert lora and base, "no LoRA matrices or no frozen base weights"
    optimizer = torch.optim.AdamW([p for p in named.values() if p.requires_grad], lr=1e-2)
    model.train()
    model(**model.prepare_batch(samples_for_loss()), return_logits=False).loss.backward()
    optimizer.step()
    moved = [n for n in lora if not torch.equal(named[n], lora[n])]
    assert len(moved) == len(lora), f"{len(lora) - len(moved)} LoRA matrices did not move"
    assert all(torch.equal(named[n], base[n]) for n in base), "a frozen base weight moved"
    assert all(not torch.equal(named[n], tokens[n]) for n in tokens), "image-token rows still"
    model.eval()
    model.save_pretrained(where)
    assert not (where / "backbone" / "model.safetensors").exists()
    with safe_open(where / "backbone" / "adapter_model.safetensors", "pt") as f:
        names = f.keys()  # a method of safe_open, which is not a dict
    extra = [k for k in names if "lora_" not in k and "trainable_tokens" not in k]
    assert not extra, f"the adapter holds more than LoRA and the image tokens' rows: {extra}"
    same(generations(model), generations(MetaMorphModel.from_pretrained(where)))
    return ", ".join(targets)


def saved_backbone(root: Path, family: str) -> Path:
    """``family``'s tiny backbone under ``root`` (saved on first use)."""
    path = root / family / "backbone"
    if not (path / "config.json").is_file():
        save_tiny_backbone(path, family, seed=1, chat_template=True)
    return path


def family_row(family: str, root: Path) -> Row:
    """Every in-process check of ``family`` (FSDP2 and `metamorph train` are run by the tests:
    they need processes of their own and a recipe)."""
    row = Row(family)
    backbone = saved_backbone(root, family)
    model = model_for(backbone, family)
    config = model.backbone.causal_lm.config
    row.cells["model_type"] = f"`{config.model_type}`"
    row.cells["tied"] = "yes" if model.backbone._tied() else "no"
    row.cells["template"] = template_cell(model, family)
    row.check("logits", logits_match, model)
    if row.check("loss", loss_falls, model) is not None:  # cache and save/load want it trained
        row.check("cache", cache_equals_recompute, model)
        row.check("save_load", save_load, model, root / family / "saved")
    row.check("lora", lora_step, backbone, family, root / family / "lora")
    return row


def table(rows: list[Row], versions: str) -> str:
    """The markdown table of ``rows`` (one per family, in FAMILIES order)."""
    head = "| family | " + " | ".join(h for _, h in COLUMNS) + " |"
    rule = "|" + "---|" * (len(COLUMNS) + 1)
    body = [
        f"| {r.family} | " + " | ".join(r.cells.get(k, "not run") for k, _ in COLUMNS) + " |"
        for r in rows
    ]
    return "\n".join([f"Checked with {versions}.", "", head, rule, *body]) + "\n"


def write_colour_data(data: Path) -> Path:
    """Images on disk and LLaVA JSONL records (``data/train.jsonl``, images beside it):
    understanding and generation of three colours. Written once."""
    import numpy as np
    from PIL import Image

    if (data / "train.jsonl").is_file():
        return data
    data.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220)}
    records = []
    for name, rgb in colours.items():
        Image.fromarray(np.tile(np.array(rgb, np.uint8), (16, 16, 1))).save(data / f"{name}.png")
        ask = {"from": "human", "value": "<image>\nWhat colour is this?"}
        draw = {"from": "human", "value": f"Generate an image of the colour {name}."}
        records += [
            {
                "id": f"u-{name}",
                "image": f"{name}.png",
                "conversations": [ask, {"from": "gpt", "value": name}],
            },
            {
                "id": f"g-{name}",
                "image": f"{name}.png",
                "conversations": [draw, {"from": "gpt", "value": "Here it is: <image>"}],
            },
        ]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return data


# -- FSDP2, under torchrun ---------------------------------------------------------------------
def fsdp_check(backbone: Path, family: str) -> dict[str, Any]:
    """On every rank the same batch: the sharded model's loss and gathered gradients equal the
    unsharded model's."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from metamorph_train import distributed

    model = model_for(backbone, family)
    units = model.backbone.blocks()
    kinds = sorted({type(u).__name__ for u in units})
    layers = model.backbone.causal_lm.config.get_text_config().num_hidden_layers
    assert len(units) == layers, f"{len(units)} units for {layers} layers"
    reference = copy.deepcopy(model)
    batch = model.prepare_batch(samples_for_loss())
    reference(**batch, return_logits=False).loss.backward()
    sharded = distributed.wrap(model, "fsdp", units, "cpu")
    loss = sharded(**batch, return_logits=False).loss
    loss.backward()
    ref_loss = reference(**batch, return_logits=False).loss.item()
    assert abs(loss.item() - ref_loss) < TOL * max(1.0, abs(ref_loss)), (loss.item(), ref_loss)
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    worst = 0.0
    for name, p in sharded.named_parameters():
        if name not in ref_grads or ref_grads[name] is None:
            continue
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        worst = max(worst, (grad - ref_grads[name]).abs().max().item())
    assert worst < 1e-5, f"gradients differ by {worst:.2e}"
    dist.barrier()
    return {"cell": f"{len(units)} x `{'`, `'.join(kinds)}`"}


def _fsdp_main(root: Path, out: Path) -> None:
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo")
    results: dict[str, Any] = {}
    for family in FAMILIES:
        try:
            results[family] = fsdp_check(saved_backbone(root, family), family)
        except Exception as e:  # noqa: BLE001 (reported per family)
            results[family] = {"error": f"{type(e).__name__}: {e}"}
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    _fsdp_main(Path(sys.argv[1]), Path(sys.argv[2]))
