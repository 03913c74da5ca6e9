"""Sampling images from an ``sd-unet`` decoder: :class:`DiffusionSampler`, the denoising loop
with classifier-free guidance (the pipeline half of diffusers' model/pipeline split; the
decoder holds the modules and the conditioning, the sampler only reads them).

Guidance runs the conditional and unconditional (null-context) branches in one batched UNet
call, ``[uncond, cond]``, and mixes their predictions as ``uncond + s * (cond - uncond)``; at
``guidance_scale`` 1.0 only the conditional branch runs. The initial noise is float32, drawn on
the generator's device (the CPU when there is none) and moved to the UNet's.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch

from metamorph_core.decoding import DecodeConfig
from metamorph_decoders.schedulers import make_scheduler


class Denoiser(Protocol):
    """What the sampler reads of a decoder (:class:`~metamorph_decoders.sd_unet.
    DiffusionDecoder` is one): the UNet, its training noise schedule and prediction type, the
    conditioning, and the conversions into and out of the UNet's sample space."""

    unet: Any  # a diffusers UNet2DConditionModel
    scheduler_config: dict[str, Any]
    prediction_type: str
    sample_channels: int

    def context(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def null(self, batch: int, like: torch.Tensor) -> torch.Tensor: ...

    def spatial_map(self, tokens: torch.Tensor) -> torch.Tensor | None: ...

    def unet_input(self, x: torch.Tensor, spatial: torch.Tensor | None) -> torch.Tensor: ...

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor: ...


OUTPUT_TYPES = ("pt", "pil")


def check_output_type(output_type: str) -> None:
    """A ``ValueError`` unless ``output_type`` is ``"pt"`` or ``"pil"``."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pt' or 'pil', got '{output_type}'")


class DiffusionSampler:
    """Samples images from ``decoder``'s UNet, conditioned through its ``context``,
    ``spatial_map`` and ``null``; a fresh diffusers scheduler of ``config.scheduler`` is built
    from the decoder's training noise schedule on every call."""

    def __init__(self, decoder: Denoiser) -> None:
        self.decoder = decoder

    @torch.no_grad()
    def sample(
        self,
        tokens: torch.Tensor,
        config: DecodeConfig | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pt",
        progress: bool = False,
    ) -> Any:
        """Images for ``tokens`` ``(b, n, c)``: ``output_type`` ``"pt"`` gives a float32
        ``(b, 3, h, w)`` tensor in [0, 1] (h, w: the decoder's ``image_size``), ``"pil"`` a list
        of ``b`` RGB PIL images. ``config`` (default :class:`DecodeConfig`'s defaults) names the
        scheduler, the steps, the guidance scale and the seed; ``generator``, when given, draws
        the noise instead of ``config.seed``. The same tokens, config and seed give the same
        pixels. ``progress``: a bar with ETA over the denoising steps (on a terminal)."""
        config = config if config is not None else DecodeConfig()
        check_output_type(output_type)
        dec = self.decoder
        unet = dec.unet
        device = unet.device
        sched = make_scheduler(config.scheduler, dec.scheduler_config, dec.prediction_type)
        sched.set_timesteps(config.steps, device=device)
        if generator is None and config.seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(config.seed)
        cond = dec.context(tokens).to(unet.dtype)
        b = cond.shape[0]
        guided = config.guidance_scale != 1.0
        ctx = torch.cat([dec.null(b, cond), cond]) if guided else cond
        spatial = dec.spatial_map(tokens)
        if spatial is not None and guided:
            spatial = torch.cat([torch.zeros_like(spatial), spatial])
        c = dec.sample_channels
        s = int(unet.config.sample_size)
        draw = generator.device if generator is not None else "cpu"
        x = torch.randn((b, c, s, s), generator=generator, device=draw).to(device)  # float32
        x = x * sched.init_noise_sigma
        # stochastic schedulers take the generator; deterministic ones have no such argument
        step_kw = (
            {"generator": generator}
            if "generator" in inspect.signature(sched.step).parameters
            else {}
        )
        for t in _steps(sched.timesteps, progress):
            inp = sched.scale_model_input(torch.cat([x, x]) if guided else x, t)
            inp = dec.unet_input(inp.to(unet.dtype), spatial)
            pred = unet(inp, t, encoder_hidden_states=ctx).sample.float()
            if guided:
                uncond, cond_pred = pred.chunk(2)
                pred = uncond + config.guidance_scale * (cond_pred - uncond)
            x = sched.step(pred, t, x, **step_kw).prev_sample
        images = dec.to_pixels(x)
        return to_pil(images) if output_type == "pil" else images


def _steps(timesteps: Any, progress: bool) -> Any:
    if not progress:
        return timesteps
    from tqdm.auto import tqdm

    # disable=None: quiet when stderr is not a terminal
    return tqdm(timesteps, desc="decoding", unit="step", disable=None, leave=False)


def to_pil(images: torch.Tensor) -> list[Any]:
    """``(b, 3, h, w)`` in [0, 1] -> ``b`` RGB PIL images (values rounded to 8 bits)."""
    from PIL import Image

    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]
