"""The paper's settings, locked: the research code's values (facebookresearch/metamorph at
0b13deb; docs/method.md has the table with files and lines) in our defaults and our
examples/recipes/paper-*.yaml, and the stage-1 policy that trains the projector and the image
tokens' two embedding rows and hands them to stage 2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from metamorph_core import MetaMorphModel
from metamorph_core.testing import samples, save_tiny_backbone, tiny_model_config
from metamorph_train.data import Mixture
from metamorph_train.objectives import VPiTObjective
from metamorph_train.recipe import load_recipe
from metamorph_train.trainer import Trainer, TrainerConfig

RECIPES = Path(__file__).parents[3] / "examples" / "recipes"
RANKS = 8  # the GPUs the recipes' comments assume (one node)


def lr_rule(global_batch: int) -> float:
    """scripts/Train.md of the research code: 6.93e-5 at a global batch of 1536, scaled by
    the square root of the batch."""
    return 6.93e-5 * math.sqrt(global_batch / 1536)


def _global_batch(recipe) -> int:
    return recipe.train.batch_size * recipe.train.grad_accum * RANKS


def test_stage1_recipe_is_the_papers():
    r = load_recipe(RECIPES / "paper-stage1-projector.yaml")
    assert r.objective == "vpit" and r.options.policy == "projector"
    assert r.model["visual_loss_weight"] == 0.0  # USE_VISION_AR=False
    assert r.model["head"] == "mlp" and r.model["projector"] == "mlp2x_gelu"
    assert r.model["template"] == "llama3"
    assert _global_batch(r) == 448  # slurm_pretrain.sh: 4 nodes x 8 GPUs x 14
    assert r.train.lr == pytest.approx(lr_rule(448), rel=2e-3)
    assert (r.train.warmup_ratio, r.train.schedule, r.train.weight_decay) == (0.03, "cosine", 0.0)
    assert r.options.prompt_dropout == 0.0 and r.train.bf16


def test_stage2_recipe_is_the_papers():
    r = load_recipe(RECIPES / "paper-stage2-full.yaml")
    assert r.options.policy == "full" and r.options.init_from
    assert r.model == {"visual_loss_weight": 1.0}  # the visual loss back on
    assert _global_batch(r) == 1536  # slurm_finetune.sh: 32 nodes x 8 GPUs x 6
    assert r.train.lr == pytest.approx(lr_rule(1536), rel=2e-3)
    assert (r.train.warmup_ratio, r.train.schedule, r.train.weight_decay) == (0.03, "cosine", 0.0)
    assert r.options.prompt_dropout == 0.0  # the research code has none
    assert r.options.pack_to is None and r.options.visual_input_noise == 0.0


def test_prompt_dropout_only_in_its_own_recipe():
    for path in RECIPES.glob("*.yaml"):
        r = load_recipe(path)
        dropout = getattr(r.options, "prompt_dropout", 0.0)
        assert dropout == (0.1 if path.name == "stage2-with-guidance.yaml" else 0.0), path.name


def test_visualizer_recipe_is_the_papers():
    r = load_recipe(RECIPES / "paper-decoder-sd15.yaml")
    kw = r.model.decoder["kwargs"]
    assert kw["cond_dropout"] == 0.8  # visualization/submit.sh --cfg_prob 0.8
    assert kw["context_length"] == 77 and kw["null_conditioning"] == "zeros"
    assert kw["prediction_type"] == "epsilon"
    assert kw["adapter"] == {"name": "mlp", "kwargs": {"hidden_dims": [2048]}}
    assert kw["sampling"] == {"scheduler": "pndm", "steps": 50, "guidance_scale": 7.5}
    assert 6.0 <= kw["sampling"]["guidance_scale"] <= 12.5  # the research demo's range
    assert r.options.resize == "crop"  # shorter side to 512, centre crop
    t = r.train
    assert t.lr == 1e-5 and t.weight_decay == 0.01 and t.schedule == "linear"
    assert t.steps == 12000 and round(t.warmup_ratio * t.steps) == 4000
    assert t.batch_size * RANKS == 192 and t.max_grad_norm is None and not t.bf16


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("bb") / "llama", "llama", seed=1)


def _mixture():
    convs = [samples.understanding(i) for i in range(4)]
    convs += [samples.generation(10 + i) for i in range(4)]
    return Mixture({"mixed": convs}, {"mixed": 1.0}, seed=0)


def test_stage1_trains_the_projector_and_the_two_rows_and_stage2_starts_from_them(
    backbone, tmp_path
):
    torch.manual_seed(0)
    model = MetaMorphModel.from_config(tiny_model_config(backbone, visual_loss_weight=0.0))
    emb = model.backbone.causal_lm.get_input_embeddings().weight
    ids = [model.backbone.image_start_id, model.backbone.image_end_id]
    before = emb.detach().clone()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    objective = VPiTObjective(model, policy="projector")
    cfg = TrainerConfig(output_dir=str(tmp_path / "s1"), steps=5, batch_size=4, lr=1e-2)
    trainer = Trainer(objective, _mixture(), cfg, log=None)
    assert sorted(trainer.params) == [
        "backbone.image_token_rows",
        "projector.net.0.bias",
        "projector.net.0.weight",
        "projector.net.2.bias",
        "projector.net.2.weight",
    ]
    summary = trainer.run()
    assert summary["visual_loss"] > 0  # computed and logged, but weighted 0
    rows = model.backbone.image_token_rows.detach().clone()
    assert not torch.equal(rows, before[ids])  # they learnt
    after = model.state_dict()
    for key, value in fresh.items():  # nothing else moved
        if not key.startswith(("projector.", "backbone.image_token_rows")):
            assert torch.equal(after[key], value), key
    saved = model.save_pretrained(tmp_path / "stage1")

    # stage 2 loads them: the two rows in a plain embedding matrix, the rest the base model's
    stage2 = MetaMorphModel.from_pretrained(saved)
    loaded = stage2.backbone.causal_lm.get_input_embeddings().weight
    assert stage2.backbone.image_token_rows is None
    assert torch.equal(loaded[ids], rows)
    others = [i for i in range(loaded.shape[0]) if i not in ids]
    assert torch.equal(loaded[others], before[others])
    assert torch.equal(stage2.projector.net[0].weight, model.projector.net[0].weight)
    # and computes what stage 1 ended with
    batch = model.prepare_batch([samples.understanding(0), samples.generation(11)])
    with torch.no_grad():
        a, b = model.eval()(**batch), stage2.eval()(**batch)
    assert torch.allclose(a.logits, b.logits, atol=1e-6)


def test_stage2_from_stage1_turns_the_visual_loss_on(backbone, tmp_path):
    torch.manual_seed(0)
    stage1 = MetaMorphModel.from_config(tiny_model_config(backbone, visual_loss_weight=0.0))
    saved = stage1.save_pretrained(tmp_path / "stage1")
    recipe = yaml.safe_load((RECIPES / "paper-stage2-full.yaml").read_text())
    recipe["objective"]["init_from"] = str(saved)
    recipe["data"] = {"sources": [{"path": str(tmp_path / "none.jsonl")}]}
    recipe["train"] = {"output_dir": str(tmp_path / "s2"), "steps": 1}
    (tmp_path / "s2.yaml").write_text(yaml.safe_dump(recipe))
    from metamorph_train.runner import build_objective

    objective = build_objective(load_recipe(tmp_path / "s2.yaml"))
    assert objective.module.config.visual_loss_weight == 1.0 and objective.policy == "full"
    recipe["model"] = {"encoder": "tiny-patch"}  # components come from the checkpoint
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=r"field\(s\) \['encoder'\] cannot change"):
        build_objective(load_recipe(tmp_path / "bad.yaml"))


def test_the_decoder_objective_crops_as_the_visualizer_does():
    """visualization/train.py: Resize(512) on the shorter side, then CenterCrop(512)."""
    import torch.nn.functional as F

    from metamorph_train.objectives.decoder import fit

    image = torch.rand(3, 40, 24, generator=torch.Generator().manual_seed(0))  # tall
    out = fit(image, (16, 16), "crop")
    shorter = F.interpolate(image[None], size=(27, 16), mode="bilinear", antialias=True)[0]
    assert torch.allclose(out, shorter.clamp(0, 1)[:, 5:21], atol=1e-6)  # the centre 16 rows
    squashed = fit(image, (16, 16), "squash")
    assert squashed.shape == out.shape and not torch.allclose(squashed, out, atol=1e-2)
    assert fit(out, (16, 16)) is out  # the right size: untouched
