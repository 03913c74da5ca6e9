"""The demo's presets (sizes and step counts of a run) and the options that vary between runs
of one preset. The measurements behind each setting are in BENCHMARKS.md ("Toy presets: the
measurements behind the settings")."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields

from metamorph_toy import world as W


@dataclass(frozen=True)
class Preset:
    """Sizes and step counts of one demo run."""

    images: int  # renders for encoder and decoder training
    encoder_steps: int
    decoder_steps: int
    decoder_channels: tuple[int, ...]
    lm_steps: int
    lm_hidden: int
    lm_layers: int
    vpit_steps: int
    understanding: int  # VPiT training conversations of each kind
    generation: int
    text_repeats: int  # copies of each text-only conversation
    judge_steps: int
    vqa_test: int
    generation_test: int
    reasoning_test: int
    sample_steps: int  # decoder sampling steps at evaluation
    decoder_guidance: float = 1.0  # the decoder's classifier-free guidance at evaluation
    decoder_spatial: int = 16  # ``sd-unet`` option ``spatial_channels`` (local conditioning)
    decoder_spatial_detail: int = 1  # ``sd-unet`` ``spatial_detail``: a d x d pattern a token
    decoder_token_noise: float = 0.75  # ``sd-unet`` ``token_noise`` (noise augmentation)
    # steps of the ``tune`` stage: the decoder fine-tuned on the tokens the trained LLM
    # generates for the generation prompts (0: no such stage)
    decoder_tune_steps: int = 0
    decoder_patch: int = 2  # ``sd-unet`` ``patch_size``: the UNet on p x p pixel patches
    decoder_lr: float = 3e-3
    # the decoder stage under bf16 autocast (``train.bf16``): its steps took 0.80x the fp32
    # time on an AMX Xeon (BENCHMARKS.md), so a budget buys more of them; a CPU without bf16
    # matrix units may run it slower than fp32
    decoder_bf16: bool = False
    # the decoder stage's learning-rate schedule (``train.schedule``) and moving average of
    # its weights (``train.ema_decay``; 0: the last step's weights draw)
    decoder_schedule: str = "cosine"
    decoder_ema: float = 0.0
    # share of decoder samples trained on the null context (``sd-unet`` ``cond_dropout``):
    # what classifier-free guidance needs; a preset that draws without guidance
    # (``decoder_guidance`` 1.0) can spend every sample on its tokens
    decoder_cond_dropout: float = 0.1
    # share of training generation requests that leave one attribute unsaid ("Draw a large
    # triangle at the top."): the answer names it in its restatement and draws it, so that the
    # drawing has to follow the restatement and not only the request's words
    open_requests: float = 0.0
    # answers restate the request before the image ("Here is a large triangle in the colour
    # green at the top: <image>") and reasoning is resolved in that text; False: the paper's
    # "Here is an image based on your request: <image>", reasoning left implicit
    restate: bool = True
    # the chat template's default system turn ("You are a helpful assistant.", which this
    # world's tokenizer spells in 29 tokens, a third of a VPiT sample); False: none, as the
    # paper's llama3 template (``chatml`` with ``default_system: null``)
    system_prompt: bool = True
    # the small SigLIP: its input size and patch give the token grid (32 / 8: 4x4 = 16 tokens;
    # 48 / 16: 3x3 = 9 tokens, the world's grid of positions, one whole shape a token)
    encoder_image: int = W.IMAGE_SIZE
    encoder_patch: int = 8
    encoder_hidden: int = 128
    # the SigLIP image tower's pooling in the encoder stage (``small_siglip_config(pooling=)``):
    # "map" (SigLIP's attention head) or "mean" (the mean token: what tells captions apart must
    # be in the tokens, linearly; see BENCHMARKS.md)
    encoder_pooling: str = "map"
    encoder_lr: float = 1e-3
    encoder_batch: int = 64
    # how often each attribute is asked about in the understanding training data, in the order
    # of ``world.ATTRIBUTES`` (shape, colour, size, position): the questions cycle through
    # that many of each (the test questions stay one of each)
    question_mix: tuple[int, ...] = (1, 1, 1, 1)
    # the encoder's ``center`` mean: one per token position (True), or one over all positions
    # (False), which keeps what the position embeddings add (``token_mean(per_token=)``)
    encoder_center_per_token: bool = True
    num_tokens: int = 16
    batch_size: int = 32
    held_out: float = 0.35
    # seconds each stage is allowed on the 2-core CPU the preset was sized on, in two lanes of
    # one thread each (``run_demo(lanes=2)``): a run records them beside what each stage took
    # (``metrics.json`` "seconds_budget", its "total" the wall they add up to: ``wall_budget``;
    # "over_budget") and says which stage ran over; nothing is cut short (a slower machine
    # gets the same result)
    stage_budget_s: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.decoder_guidance != 1.0 and self.decoder_cond_dropout == 0.0:
            raise ValueError(
                f"preset: decoder_guidance={self.decoder_guidance} needs a decoder trained on "
                "the null context too; set decoder_cond_dropout > 0 (e.g. 0.1) or "
                "decoder_guidance=1.0"
            )


PRESETS = {
    "micro": Preset(
        images=512,
        encoder_steps=150,
        decoder_steps=20,
        decoder_channels=(16, 32),
        lm_steps=100,
        lm_hidden=64,
        lm_layers=2,
        vpit_steps=450,
        understanding=1024,
        generation=256,
        text_repeats=1,
        judge_steps=80,
        vqa_test=96,
        generation_test=24,
        reasoning_test=24,
        sample_steps=4,
        decoder_tune_steps=5,
        decoder_bf16=True,
        decoder_schedule="constant",
        decoder_ema=0.999,
        decoder_cond_dropout=0.0,
        encoder_pooling="mean",
        stage_budget_s={
            "world": 3,
            "judge": 8,
            "encoder": 14,
            "center": 1,
            "cache": 4,
            "decoder": 4,
            "lm": 7,
            "vpit": 20,
            "predict": 1,
            "tune": 2,
            "eval": 3,
        },  # fmt: skip
        batch_size=16,
        encoder_batch=32,
    ),
    "quick": Preset(
        images=3000,
        encoder_image=48,
        encoder_patch=16,
        num_tokens=9,
        encoder_steps=800,
        encoder_pooling="mean",  # shape in the tokens: the decoder's and understanding's lever
        decoder_steps=3000,
        decoder_bf16=True,
        # learning at the full rate to the last step, drawn by the weights' moving average
        decoder_schedule="constant",
        decoder_ema=0.999,
        decoder_cond_dropout=0.0,  # drawn without guidance: every sample on its tokens
        decoder_token_noise=0.25,
        decoder_spatial_detail=6,
        decoder_channels=(32, 64, 64),
        lm_steps=300,
        lm_hidden=128,
        lm_layers=4,
        vpit_steps=1800,
        system_prompt=False,  # a third fewer tokens a VPiT sample
        understanding=4000,
        # "where" asked most (colour and size saturate; with the mean-pooled encoder, shape too)
        question_mix=(1, 1, 1, 3),
        generation=3000,
        text_repeats=4,
        judge_steps=400,
        vqa_test=400,
        generation_test=300,
        reasoning_test=200,
        sample_steps=10,
        decoder_tune_steps=0,
        stage_budget_s={
            "world": 12,
            "judge": 35,
            "encoder": 85,
            "center": 2,
            "cache": 8,
            "decoder": 560,
            "lm": 45,
            "vpit": 420,
            "eval": 30,
        },  # fmt: skip
    ),
    "full": Preset(
        images=8000,
        encoder_image=48,
        encoder_patch=16,
        num_tokens=9,
        encoder_steps=2000,
        decoder_steps=6000,
        decoder_channels=(32, 64, 64),
        lm_steps=1000,
        lm_hidden=128,
        lm_layers=4,
        vpit_steps=3000,
        understanding=12000,
        question_mix=(2, 1, 1, 3),  # "where" asked most: one of each left it at chance
        generation=8000,
        text_repeats=8,
        judge_steps=800,
        vqa_test=600,
        generation_test=540,
        reasoning_test=300,
        sample_steps=20,
        decoder_tune_steps=0,
        open_requests=0.25,
        stage_budget_s={
            "world": 30,
            "judge": 80,
            "encoder": 325,
            "center": 2,
            "cache": 35,
            "decoder": 1620,
            "lm": 150,
            "vpit": 1010,
            "eval": 70,
        },  # fmt: skip
    ),
}


@dataclass
class Options:
    """What varies between runs of a preset (the ablations switch data off)."""

    seed: int = 0
    understanding_data: bool = True
    text_facts: bool = True
    generation: int | None = None  # override the preset's generation conversations
    vpit_steps: int | None = None  # override the preset's VPiT steps


def wall_budget(budget: dict[str, float], lanes: int) -> float:
    """The wall-clock seconds a run's stage budgets add up to: their sum with one lane; with
    two, the encoder side (encoder, centre, cache, decoder) beside the judge, language model
    and VPiT (which waits for the cache), then the stages after VPiT."""
    stages = ("world", "judge", "encoder", "center", "cache", "decoder", "lm", "vpit")
    b = {k: float(budget.get(k, 0.0)) for k in (*stages, "predict", "tune", "eval")}
    if lanes == 1:
        return float(sum(budget.values()))
    encoder_side = b["encoder"] + b["center"] + b["cache"]
    lanes_end = max(
        max(b["judge"] + b["lm"], encoder_side) + b["vpit"], encoder_side + b["decoder"]
    )
    return float(b["world"] + lanes_end + b["predict"] + b["tune"] + b["eval"])


def run_record(preset: Preset, options: Options) -> dict:
    """The settings a run records (``metrics.json`` "run"): the preset's, with what the options
    override."""
    overrides = {k: v for k, v in asdict(options).items() if v is not None}
    return {**asdict(preset), **overrides}


def recorded_settings(run: dict) -> dict:
    """A run's recorded settings (``metrics.json`` "run") with every preset setting it does not
    record at that setting's default: a run made before a setting existed had its default
    behaviour. As JSON stores them (tuples as lists)."""
    defaults = {f.name: f.default for f in fields(Preset) if f.default is not MISSING}
    return {**json.loads(json.dumps(defaults)), **run}


__all__ = ["PRESETS", "Options", "Preset", "recorded_settings", "run_record", "wall_budget"]
