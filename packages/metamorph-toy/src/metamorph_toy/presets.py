"""The demo's presets (sizes and step counts of a run) and the options that vary between runs
of one preset. Comments give the measurements behind the settings; BENCHMARKS.md has the rest."""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
    # classifier-free guidance of the decoder at evaluation; measured on ground-truth tokens
    # with a 300-step quick-preset decoder with spatial conditioning (200 held-out scenes,
    # judged): all attributes right 0.125 at 1.0, 0.10 at 2.0, 0.035 at 4.0 (colour fades)
    decoder_guidance: float = 1.0
    # the decoder's local conditioning path (``sd-unet`` option ``spatial_channels``); measured
    # at 300 steps: position 0.985 and size 0.77 right vs 0.855 and 0.64 after 700 steps without
    decoder_spatial: int = 16
    # each token's learned d x d pattern over its cell in that map (``sd-unet`` option
    # ``spatial_detail``; 1: one value a cell). Measured on the 3x3-token encoder (quick
    # sizes, seed 0, session 8; 300 held-out scenes' ground-truth tokens, judged): 1400 steps
    # reconstruct 0.320 all right (shape 0.34) at d=6 vs 0.137 (shape 0.14) at d=1
    decoder_spatial_detail: int = 1
    # noise conditioning augmentation of the decoder's tokens (``sd-unet`` option
    # ``token_noise``); measured on the quick preset's VPiT tokens (150 held-out prompts,
    # judged): colour right 0.60 -> 0.82, size 0.50 -> 0.82; reconstructions unchanged
    decoder_token_noise: float = 0.75
    # steps of the ``tune`` stage: the decoder fine-tuned on the tokens the trained LLM
    # generates for the generation prompts (0: no such stage); measured (200 steps, seed 0):
    # the judged position of generated images 0.39 -> 0.96 on held-out prompts (seed 2
    # needed 400 steps: 0.28 after 200)
    decoder_tune_steps: int = 0
    # the decoder's UNet on 2x2 pixel patches folded into channels (``sd-unet`` option
    # ``patch_size``: a 16x16 sample of 12 channels), and its learning rate. Measured on the
    # quick run's encoder (200 held-out scenes' tokens, judged; session 6): 200 steps unpatched
    # at lr 1e-3 took 93 s for colour 0.25 / size 0.48 / position 0.85 right (lr 3e-3: 0.59 /
    # 0.69 / 0.91); patched, 800 steps at lr 3e-3 took 128 s for 0.98 / 0.84 / 1.00 (lr 5e-3
    # diverged; 2400 steps: shape 0.25, the one attribute still poor). Quick preset, 1400
    # patched steps: reconstructions from ground-truth tokens 0.06 -> 0.16 all right (colour
    # 0.99, size 0.93, position 1.00, shape 0.17), and `eval` 73 s -> 21 s (cheaper sampling)
    decoder_patch: int = 2
    decoder_lr: float = 3e-3
    # share of training generation requests that leave one attribute unsaid ("Draw a large
    # triangle at the top."); the answer names it in its restatement and draws it, so that
    # the drawing has to follow the restatement and not only the request's words. Measured
    # (quick, seed 0, session 7) at 0.25: reasoning 0.140 -> 0.120 (colour 0.905 -> 0.920,
    # restatements 1.00 -> 0.94), generation 0.137 -> 0.107: no gain at this scale, where the
    # drawing's colour already follows; meant for the full preset's reasoning colour (0.64
    # vs generation's 0.99). Full preset (session 9, seed 0, world/cache/VPiT/eval rerun on its
    # run; the other stages' inputs do not change): 0.25 lifts reasoning 0.667 -> 0.917 (its
    # drawings' shape 0.687 -> 0.917: a request's concept words no longer pull the drawing,
    # which follows the restatement), generation 0.930 -> 0.965, restatements 0.990 -> 0.957;
    # 0.5 overshoots (restatements 0.597: the model invents size and position)
    open_requests: float = 0.0
    # answers restate the request before the image ("Here is a large triangle in the colour
    # green at the top: <image>"), and reasoning is resolved in that text; False: the paper's
    # "Here is an image based on your request: <image>", reasoning implicit. Measured with
    # False (session 6): reasoning 0.010 (quick) / 0.007 (full); with True (session 7):
    # 0.140 / 0.233
    restate: bool = True
    # the small SigLIP. Default (micro, quick): patch 8 at 32x32, a 4x4 token grid (16
    # tokens) that cuts shapes across patches: its tokens tell square from circle about half
    # the time (nearest scene prototype of fresh renders, shape 0.53-0.60), and a decoder
    # draws the mean of the two. 48x48 input in 16x16 patches (``encoder_image=48,
    # encoder_patch=16, num_tokens=9``, the full preset's): the 3x3 grid is the world's grid
    # of positions, one whole shape a token; shape 0.92 by the same measure (session 8). It
    # needs more VPiT steps to place the object in the right token (quick, session 8:
    # generated tokens' nearest-scene position 0.41 after 700 steps, 0.86 after 1400) and
    # does not help the quick preset, whose decoder still draws blobs after 1400 steps
    # (seed 0, VPiT 700 steps: reconstruction 0.157 vs 0.167, generation 0.100 vs 0.137,
    # understanding 0.745 vs 0.818)
    encoder_image: int = W.IMAGE_SIZE
    encoder_patch: int = 8
    encoder_hidden: int = 128
    encoder_lr: float = 1e-3
    encoder_batch: int = 64
    num_tokens: int = 16
    batch_size: int = 32
    held_out: float = 0.35
    # seconds each stage is allowed on the 2-core CPU the preset was sized on: a run records
    # them beside what each stage took (``metrics.json`` "seconds_budget", "over_budget") and
    # says which stage ran over; nothing is cut short (a slower machine gets the same result)
    stage_budget_s: dict[str, float] | None = None


PRESETS = {
    "micro": Preset(
        images=512,
        encoder_steps=150,
        decoder_steps=20,
        decoder_channels=(16, 32),
        lm_steps=100,  # micro: 100 LM and 80 judge steps (were 150 / 100) for a run well under a
        # minute (measured: 49 s wall, understanding 0.52, judge 0.87; judge 60: 41 s but 0.50)
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
        decoder_tune_steps=5,  # the stages run; too few steps to matter
        # measured (session 10): 31 s of stages (judge 5.7, encoder 7.1, vpit 10.3)
        stage_budget_s={
            "world": 3,
            "judge": 8,
            "encoder": 10,
            "center": 1,
            "cache": 2,
            "decoder": 4,
            "lm": 4,
            "vpit": 14,
            "predict": 1,
            "tune": 2,
            "eval": 3,
        },  # fmt: skip
        batch_size=16,
        encoder_batch=32,
    ),
    "quick": Preset(
        images=3000,
        # the full preset's encoder (3x3 tokens, one cell a token) and a decoder that gives each
        # token a learned 6x6 pattern over its cell (see ``Preset``): measured (session 9, seed
        # 0, end to end with 1300 decoder and VPiT steps) against the 4x4-token preset:
        # generation 0.137 -> 0.330, reasoning 0.140 -> 0.375, reconstruction 0.167 -> 0.310,
        # understanding 0.818 -> 0.767 (with 9 tokens the LLM answers "where" at chance, 0.13;
        # shape, colour and size 0.94-1.00; BENCHMARKS.md has the diagnosis)
        encoder_image=48,
        encoder_patch=16,
        num_tokens=9,
        encoder_steps=800,
        # 1300 steps: 250 s (session 9's run, 12 min 27 s wall with VPiT 1300); 1200: 224 s
        decoder_steps=1200,
        decoder_spatial_detail=6,
        decoder_channels=(32, 64, 64),
        lm_steps=300,
        lm_hidden=128,
        lm_layers=4,
        # the 3x3 encoder needs ~1400 VPiT steps to place the object in the right token
        # (generated tokens' nearest-scene position 0.41 after 700 steps, 0.86 after 1400)
        # 1300 steps: 315 s (session 9, a slow hour); 1150 steps (with decoder 1200): 242 s,
        # 630 s of stages in all, but reasoning 0.375 -> 0.255 (its drawings' colour 0.89 ->
        # 0.73, size 0.87 -> 0.72) and generation 0.330 -> 0.300
        vpit_steps=1300,
        understanding=4000,
        generation=3000,
        text_repeats=4,
        judge_steps=400,
        vqa_test=400,
        generation_test=300,
        reasoning_test=200,
        sample_steps=10,
        # no ``tune`` stage (as in the full preset); it cost 62-79 s of the budget
        decoder_tune_steps=0,
        # 705 s of the 12 minutes (the rest: start-up and loading); measured (session 9,
        # `runs/demo-q9c`): world 8, judge 24, encoder 83, centre 1, cache 6, decoder 224, lm 31,
        # vpit 270, eval 18 (666 s); machine speed varies ~15% between hours
        stage_budget_s={
            "world": 10,
            "judge": 30,
            "encoder": 85,
            "center": 2,
            "cache": 8,
            "decoder": 230,
            "lm": 35,
            "vpit": 280,
            "eval": 25,
        },  # fmt: skip
    ),
    "full": Preset(
        images=8000,
        # the encoder whose 3x3 token grid is the world's grid of positions (see ``Preset``):
        # session 8, seed 0, with the LM below and VPiT 2200 steps (stages after `decoder`
        # rerun on one run): generation 0.42 -> 0.885, reasoning 0.23 -> 0.683,
        # reconstruction 0.51 -> 0.909, understanding 0.85 -> 0.77, in 35 minutes
        encoder_image=48,
        encoder_patch=16,
        num_tokens=9,
        encoder_steps=2000,
        # patched: 6000 steps took 1010-1157 s (sessions 7-8); with the 4x4 encoder the
        # reconstructions stopped at 0.51 (squares drawn as circles: the tokens could not tell
        # them apart), with the 3x3 one they reach 0.909
        decoder_steps=6000,
        decoder_channels=(32, 64, 64),
        lm_steps=1000,
        # the quick preset's LM size: 192 x 6 layers learnt the 9 visual tokens worse at
        # lr 2e-3 (session 8: VPiT visual loss 0.080 vs 0.027 at the end, generated tokens'
        # nearest scene 0.048 vs 0.898, generation 0.026 vs 0.885) and took 2.5x as long
        lm_hidden=128,
        lm_layers=4,
        vpit_steps=3000,  # 711 s (session 8; 2200 steps: 521 s)
        understanding=12000,
        generation=8000,
        text_repeats=8,
        judge_steps=800,
        vqa_test=600,
        generation_test=540,
        reasoning_test=300,
        sample_steps=20,
        # no ``tune`` stage: with this encoder and LM the decoder trained on the encoder's
        # tokens draws the LLM's tokens better than the one fine-tuned on them (session 8,
        # `runs/demo-full8` evaluated both ways: generation 0.935 vs 0.863, reasoning 0.673 vs
        # 0.620), and the stages cost 135 s
        decoder_tune_steps=0,
        open_requests=0.25,  # reasoning 0.667 -> 0.917 (see ``Preset``)
        # 2487 s of the hour; measured (session 9, `runs/demo-full9o`): world 22, judge 41,
        # encoder 222, centre 1, cache 21, decoder 1134, lm 87, vpit 706, eval 58 (2292 s)
        stage_budget_s={
            "world": 30,
            "judge": 60,
            "encoder": 240,
            "center": 2,
            "cache": 25,
            "decoder": 1200,
            "lm": 110,
            "vpit": 750,
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


def run_record(preset: Preset, options: Options) -> dict:
    """The settings a run records (``metrics.json`` "run"): the preset's, with what the options
    override."""
    overrides = {k: v for k, v in asdict(options).items() if v is not None}
    return {**asdict(preset), **overrides}


__all__ = ["PRESETS", "Options", "Preset", "run_record"]
