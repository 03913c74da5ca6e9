"""``sd-unet``: a diffusers UNet that generates images from visual tokens (the paper's
"visualizer": SD 1.5's UNet conditioned on 64 SigLIP tokens instead of text).

The adapter maps the tokens to the UNet's cross-attention width; its output, zero-padded to
``context_length`` tokens, is ``encoder_hidden_states``. Conditioning dropout replaces that
context with the *null context* (``zeros``: all-zero, as the paper zeroes the adapter output;
or ``learned``), and the sampler's unconditional branch uses the same null context.
``latent`` mode runs in an ``AutoencoderKL``'s latent space (scaled by the VAE's
``scaling_factor``, as SD does); ``pixel`` mode denoises pixels directly (small images).

``patch_size`` p (default 1; not in the paper) lets the UNet work on p x p patches of that space
folded into channels (``pixel_unshuffle``: a 32x32 RGB image is a 16x16 sample of 12 channels
at p=2), as "simple diffusion" (Hoogeboom et al. 2023) and DiT-style patching do. The diffusion
process is unchanged (the same noise on the same values, only rearranged); the UNet runs at
1/p^2 of the positions, so a step costs about that much less. Measured on the toy world's
decoder: see ``metamorph_train.toy.presets``.

``spatial_channels`` (off by default; not in the paper) adds a second, local path for the same
tokens: when they form a square grid (an encoder's patch grid), a linear map of each token to
``spatial_channels`` channels is laid over its patch's area of the UNet's sample (nearest
upsampling; the sample size need not be a multiple of the grid) and concatenated to the UNet's
input, as InstructPix2Pix conditions on an image. Every position then sees its own patch's
token, which a small UNet with cross-attention only at its lowest resolution learns slowly.
Conditioning dropout and the unconditional branch zero this map with the context. A pretrained
UNet without those input channels gets them as InstructPix2Pix does: ``conv_in`` widened with
zero weights, so it starts out computing exactly what it did (logged).

``spatial_detail`` d (default 1, the flat map above) gives each token a learned d x d pattern
of those channels over its patch instead of one value: a linear "unpatchify" at a coarse
resolution, the (grid*d)^2 map resized bilinearly to the sample. Measured on the toy world
(9 tokens, one shape a token; 1400 steps of a small pixel UNet): reconstructions' shape right
0.34 at d=6 vs 0.14 at d=1 (see ``metamorph_train.toy.presets``); a per-pixel unpatchify of
16 tokens, MAE-style, was worse than d=1 at equal steps.

Checkpoint layout (Stable Diffusion's, plus ours): ``unet/``, ``vae/`` (latent mode),
``scheduler/``, ``adapter.safetensors`` and ``config.json`` (the decoder's settings).
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from metamorph_core.checkpoint import atomic_directory, write_json
from metamorph_core.config import ComponentSpec
from metamorph_core.dtypes import dtype_name, resolve_dtype
from metamorph_core.errors import CheckpointError
from metamorph_core.interfaces import VisualDecoder
from metamorph_core.plugins.registry import create
from metamorph_core.vision import perturb_tokens
from metamorph_decoders.loading import (
    load_unet_weights,
    plan_weight_load,
    read_saved_config,
    subfolder,
)
from metamorph_decoders.schedulers import make_scheduler
from metamorph_decoders.spatial import SpatialMap, widen_conv_in

logger = logging.getLogger("metamorph")
FORMAT = "metamorph-decoder"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DEFAULT_NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "clip_sample": False,
}


class DiffusionDecoder(VisualDecoder):
    """Visual tokens ``(b, num_tokens, token_dim)`` -> images ``(b, 3, h, w)`` in [0, 1]."""

    def __init__(
        self,
        token_dim: int | None = None,
        num_tokens: int | None = None,
        pretrained: str | Path | None = None,
        unet_config: dict[str, Any] | None = None,
        vae_config: dict[str, Any] | None = None,
        scheduler_config: dict[str, Any] | None = None,
        mode: str | None = None,
        adapter: str | dict[str, Any] | None = None,
        context_length: int | None = None,
        prediction_type: str | None = None,
        cond_dropout: float | None = None,
        null_conditioning: str | None = None,
        reshape_cross_attention: bool = False,
        spatial_channels: int | None = None,
        spatial_detail: int | None = None,
        patch_size: int | None = None,
        snr_gamma: float | None = None,
        token_noise: float | None = None,
        dtype: str | torch.dtype = "float32",
        seed: int | None = None,
    ) -> None:
        """Settings left as ``None`` come from a pretrained decoder's ``config.json`` when there
        is one, else from the defaults (``mlp`` adapter, 77 context tokens, epsilon, dropout
        0.75, ``zeros`` null). Giving a setting that contradicts a saved decoder is an error."""
        super().__init__()
        from diffusers import AutoencoderKL, UNet2DConditionModel

        if (pretrained is None) == (unet_config is None):
            raise ValueError(
                "decoder 'sd-unet' needs exactly one of pretrained= (a Stable-Diffusion-layout "
                "directory with unet/, scheduler/ and, for latent mode, vae/) or unet_config="
            )
        root = Path(pretrained) if pretrained is not None else None
        saved = read_saved_config(root) if root is not None else {}
        if root is not None and scheduler_config is not None:
            raise ValueError(
                "scheduler_config= cannot be combined with pretrained=: the noise schedule is the "
                f"one the UNet was trained with, in '{root}/scheduler/'"
            )
        given = {
            "token_dim": token_dim,
            "num_tokens": num_tokens,
            "adapter": adapter,
            "context_length": context_length,
            "null_conditioning": null_conditioning,
            "prediction_type": _prediction_type(prediction_type) if prediction_type else None,
            "spatial_channels": spatial_channels,
            "spatial_detail": spatial_detail,
            "patch_size": patch_size,
        }
        conf = _resolve(given, saved, root)
        if conf["token_dim"] is None or conf["num_tokens"] is None:
            raise ValueError("decoder 'sd-unet' needs token_dim= and num_tokens= (the encoder's)")
        cond_dropout = saved.get("cond_dropout", 0.75) if cond_dropout is None else cond_dropout
        if not 0.0 <= cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1], got {cond_dropout}")
        snr_gamma = saved.get("snr_gamma") if snr_gamma is None else snr_gamma
        if snr_gamma is not None and not snr_gamma > 0:
            raise ValueError(f"snr_gamma must be > 0 (5 is usual) or None, got {snr_gamma}")
        self.snr_gamma = snr_gamma
        token_noise = saved.get("token_noise", 0.0) if token_noise is None else token_noise
        if not token_noise >= 0.0:
            raise ValueError(
                f"token_noise must be >= 0 (0: off; 0.5 to 1 is usual), got {token_noise}"
            )
        self.token_noise = float(token_noise)
        if conf["null_conditioning"] not in ("zeros", "learned"):
            raise ValueError(
                f"null_conditioning must be 'zeros' or 'learned', got '{conf['null_conditioning']}'"
            )
        torch_dtype = resolve_dtype(dtype)
        self.token_dim, self.num_tokens = int(conf["token_dim"]), int(conf["num_tokens"])
        self.context_length = int(conf["context_length"])
        self.prediction_type = conf["prediction_type"]
        self.cond_dropout, self.null_conditioning = cond_dropout, conf["null_conditioning"]
        self.spatial_channels = int(conf["spatial_channels"])
        if self.spatial_channels < 0:
            raise ValueError(f"spatial_channels must be >= 0, got {self.spatial_channels}")
        self.spatial_detail = int(conf["spatial_detail"])
        if self.spatial_detail < 1:
            raise ValueError(
                f"spatial_detail must be >= 1 (1: one value per patch), got {self.spatial_detail}"
            )
        if self.spatial_detail > 1 and not self.spatial_channels:
            raise ValueError(
                f"spatial_detail={self.spatial_detail} shapes the spatial conditioning map, which "
                "is off (spatial_channels=0); set spatial_channels > 0 or drop spatial_detail"
            )
        self.patch_size = int(conf["patch_size"])
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1 (1: no patching), got {self.patch_size}")

        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            if root is not None:
                unet_dir = subfolder(root, "unet")
                unet_cfg = dict(UNet2DConditionModel.load_config(str(unet_dir)))
            else:
                unet_cfg = dict(unet_config)
            spec = ComponentSpec.parse(conf["adapter"], "decoder adapter")
            self.adapter_spec = {"name": spec.name, "kwargs": dict(spec.kwargs)}
            width = int(unet_cfg["cross_attention_dim"])
            self.adapter = create(
                "adapter", spec.name, **{"in_dim": self.token_dim, "out_dim": width, **spec.kwargs}
            )
            if self.adapter.out_dim != width:
                self.unet = self._reshaped_unet(root, unet_cfg, reshape_cross_attention)
            elif root is not None:
                self.unet = UNet2DConditionModel.from_pretrained(
                    str(unet_dir), use_safetensors=True
                )
            else:
                self.unet = UNet2DConditionModel.from_config(unet_cfg)
            self.spatial = (
                SpatialMap(
                    self.token_dim, self.spatial_channels, self.num_tokens, self.spatial_detail
                )
                if self.spatial_channels
                else None
            )
            if self.null_conditioning == "learned":
                rows = max(self.context_length, self.adapter.out_tokens(self.num_tokens))
                self.null_context = torch.nn.Parameter(torch.zeros(rows, self.adapter.out_dim))
            if root is not None and (root / "adapter.safetensors").is_file():
                self._load_adapter(root / "adapter.safetensors")
        self.unet = _cast(self.unet, torch_dtype)
        self.adapter.to(torch_dtype)
        if self.spatial is not None:
            self.spatial.to(torch_dtype)

        if mode is None:
            has_vae = vae_config is not None or (root is not None and (root / "vae").is_dir())
            mode = saved.get("mode", "latent" if has_vae else "pixel")
        if mode not in ("latent", "pixel"):
            raise ValueError(f"decoder mode must be 'latent' or 'pixel', got '{mode}'")
        self.mode = mode
        self.vae = None
        if mode == "latent":
            if vae_config is not None:
                self.vae = AutoencoderKL.from_config(vae_config)
            elif root is not None:
                self.vae = AutoencoderKL.from_pretrained(
                    str(subfolder(root, "vae")), use_safetensors=True
                )
            else:
                raise ValueError(
                    "latent mode needs vae_config= or a pretrained directory with vae/"
                )
            self.vae = _cast(self.vae, torch_dtype).requires_grad_(False).eval()
        if root is not None:
            with open(subfolder(root, "scheduler") / "scheduler_config.json") as f:
                sched = json.load(f)
        else:  # x0 clipping would fight latents; off unless asked for
            sched = {"clip_sample": False, **(scheduler_config or DEFAULT_NOISE_SCHEDULE)}
        self.scheduler_config = {k: v for k, v in sched.items() if not k.startswith("_")}
        self.noise_scheduler = make_scheduler("ddpm", self.scheduler_config, self.prediction_type)
        channels = self.unet.config.in_channels
        base = self.vae.config.latent_channels if self.vae is not None else 3
        self.sample_channels = base * self.patch_size**2
        want = self.sample_channels + self.spatial_channels
        if root is not None and self.spatial_channels and channels == self.sample_channels:
            widen_conv_in(self.unet, want)
            channels = want
        base_name = "the VAE latent channels" if self.vae is not None else "RGB"
        patched = (
            f" x {self.patch_size**2} (patch_size {self.patch_size})" if self.patch_size > 1 else ""
        )
        if channels != want:
            extra = f" + {self.spatial_channels} spatial_channels" if self.spatial_channels else ""
            raise ValueError(
                f"{mode} mode needs a UNet with {want} input channels "
                f"({base_name}{patched}{extra}), this one has {channels}"
            )
        if int(self.unet.config.out_channels) != self.sample_channels:
            raise ValueError(
                f"{mode} mode needs a UNet with {self.sample_channels} output channels "
                f"({base_name}{patched}), "
                f"this one has {self.unet.config.out_channels}"
            )
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        side = int(self.unet.config.sample_size) * factor * self.patch_size
        self.image_size = (side, side)

    # -- construction helpers ----------------------------------------------------------------
    def _reshaped_unet(self, root: Path | None, cfg: dict[str, Any], allowed: bool) -> Any:
        from diffusers import UNet2DConditionModel

        old, new = int(cfg["cross_attention_dim"]), self.adapter.out_dim
        if not allowed:
            raise ValueError(
                f"the base UNet's cross-attention width is {old} but adapter "
                f"'{type(self.adapter).__name__}' outputs {new}; set reshape_cross_attention=True "
                "to re-initialise the cross-attention K/V weights (they are logged), or give the "
                f"adapter out_dim={old}"
            )
        unet = UNet2DConditionModel.from_config({**cfg, "cross_attention_dim": new})
        if root is None:
            return unet
        source = load_unet_weights(subfolder(root, "unet"))
        plan = plan_weight_load(
            {k: tuple(v.shape) for k, v in source.items()},
            {k: tuple(v.shape) for k, v in unet.state_dict().items()},
            str(root),
        )
        unet.load_state_dict({k: source[k] for k in plan.load}, strict=False)
        logger.warning(
            "UNet cross-attention width %d -> %d: re-initialised %d weights: %s",
            old,
            new,
            len(plan.reinit),
            ", ".join(plan.reinit),
        )
        return unet

    def _load_adapter(self, path: Path) -> None:
        state = load_file(str(path))
        null = state.pop("null_context", None)
        spatial = state.pop("spatial.weight", None)
        if (spatial is not None) != (self.spatial is not None):
            raise CheckpointError(
                f"{path}: spatial conditioning weights present={spatial is not None} but "
                f"spatial_channels={self.spatial_channels}"
            )
        if (null is not None) != (self.null_conditioning == "learned"):
            raise CheckpointError(
                f"{path}: learned null context present={null is not None} but "
                f"null_conditioning='{self.null_conditioning}'"
            )
        try:
            self.adapter.load_state_dict(state)
            if null is not None:
                self.null_context.data.copy_(null)
            if spatial is not None:
                self.spatial.load_state_dict({"weight": spatial})
        except RuntimeError as e:
            raise CheckpointError(
                f"{path}: the saved adapter does not fit adapter {self.adapter_spec} with "
                f"token_dim={self.token_dim}: {str(e)[:300]}"
            ) from e

    # -- conditioning ------------------------------------------------------------------------
    def context(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(b, n, c)`` tokens -> ``(b, context_length, d)``: the adapter's output, zero-padded."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.token_dim:
            raise ValueError(
                f"decoder expects tokens (b, n, {self.token_dim}) for adapter "
                f"'{type(self.adapter).__name__}', got {tuple(tokens.shape)}; the tokens must "
                "come from the encoder this decoder was trained on"
            )
        param = next(self.adapter.parameters())
        out = self.adapter(tokens.to(param.device, param.dtype))
        pad = self.context_length - out.shape[1]
        return F.pad(out, (0, 0, 0, pad)) if pad > 0 else out

    def spatial_map(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """``(b, n, c)`` tokens -> ``(b, spatial_channels, s, s)`` at the UNet's sample size (each
        token's linear map laid over its patch's area), or ``None`` without spatial
        conditioning."""
        if self.spatial is None:
            return None
        return self.spatial.layout(tokens, int(self.unet.config.sample_size))

    def _unet_input(self, x: torch.Tensor, spatial: torch.Tensor | None) -> torch.Tensor:
        return x if spatial is None else torch.cat([x, spatial.to(x.dtype)], dim=1)

    def null(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """The null context: used by conditioning dropout *and* the unconditional branch."""
        if self.null_conditioning == "learned":
            return self.null_context[: like.shape[1]].to(like.dtype).expand(batch, -1, -1)
        return torch.zeros(batch, *like.shape[1:], dtype=like.dtype, device=like.device)

    # -- training ----------------------------------------------------------------------------
    def _to_model_space(
        self, pixel_values: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(b, 3, h, w)`` in [0, 1] -> float32 diffusion space ([-1, 1] pixels or scaled
        latents)."""
        x = pixel_values.float() * 2.0 - 1.0
        if self.vae is None:
            return self._fold(x)
        with torch.no_grad():
            latents = self.vae.encode(x.to(self.vae.dtype)).latent_dist.sample(generator=generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return self._fold((latents.float() - shift) * self.vae.config.scaling_factor)

    def _fold(self, x: torch.Tensor) -> torch.Tensor:
        """Image-space ``(b, c, h, w)`` -> the UNet's sample ``(b, c p^2, h/p, w/p)``."""
        if self.patch_size == 1:
            return x
        p, (h, w) = self.patch_size, x.shape[-2:]
        if h % p or w % p:
            raise ValueError(
                f"patch_size {p} needs images whose sides divide by it; got {h}x{w}. Resize "
                f"the images to the decoder's image_size {self.image_size}"
            )
        return F.pixel_unshuffle(x, p)

    def loss(
        self,
        tokens: torch.Tensor,
        pixel_values: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Diffusion loss of reconstructing ``pixel_values`` ``(b, 3, h, w)`` in [0, 1] from
        ``tokens`` (with ``snr_gamma``, each sample weighted by Min-SNR); conditioning is dropped
        to the null context with ``cond_dropout`` while training. Noise, timesteps and dropout
        are drawn from ``generator`` (on its device) when given; the noising and the target are
        computed in float32."""
        device = self.unet.device
        x0 = self._to_model_space(pixel_values.to(device), generator)
        b = x0.shape[0]
        draw = generator.device if generator is not None else device
        noise = torch.randn(x0.shape, generator=generator, device=draw).to(device)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (b,), generator=generator, device=draw).to(device)
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        else:
            target = x0
        if self.training and self.token_noise > 0:
            tokens = perturb_tokens(tokens, self.token_noise, generator)
        ctx = self.context(tokens)
        spatial = self.spatial_map(tokens)
        if self.training and self.cond_dropout > 0:
            drop = torch.rand(b, generator=generator, device=draw).to(device) < self.cond_dropout
            ctx = torch.where(drop[:, None, None], self.null(b, ctx), ctx)
            if spatial is not None:
                spatial = spatial.masked_fill(drop[:, None, None, None], 0.0)
        dtype = self.unet.dtype
        inp = self._unet_input(noisy.to(dtype), spatial)
        pred = self.unet(inp, t, encoder_hidden_states=ctx.to(dtype)).sample
        if self.snr_gamma is None:
            return F.mse_loss(pred.float(), target)
        per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)
        return (per_sample * self._snr_weight(t)).mean()

    def _snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023): the clean-image loss weighted by
        ``min(SNR, gamma)``, expressed for this prediction type's target (the epsilon loss is
        the clean-image loss times SNR, the v loss times SNR + 1)."""
        alphas = self.noise_scheduler.alphas_cumprod.to(t.device)[t].float()
        snr = alphas / (1.0 - alphas)
        clipped = snr.clamp(max=self.snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1.0)
        return clipped

    def training_step(
        self, tokens: torch.Tensor, pixel_values: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> float:
        """One optimiser step on the UNet and adapter; returns the loss."""
        self.train()
        loss = self.loss(tokens, pixel_values)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    def train(self, mode: bool = True) -> DiffusionDecoder:
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # frozen
        return self

    # -- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(
        self,
        tokens: torch.Tensor,
        scheduler: str = "ddim",
        steps: int = 50,
        guidance_scale: float = 7.5,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pt",
    ) -> Any:
        """Sample images for ``tokens`` ``(b, n, c)``: ``output_type`` ``"pt"`` gives ``(b, 3,
        h, w)`` in [0, 1], ``"pil"`` a list of PIL images. With ``guidance_scale`` != 1 the
        conditional and unconditional (null-context) branches run in one batched UNet call:
        ``uncond + s * (cond - uncond)``."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if output_type not in ("pt", "pil"):
            raise ValueError(f"output_type must be 'pt' or 'pil', got '{output_type}'")
        device = self.unet.device
        sched = make_scheduler(scheduler, self.scheduler_config, self.prediction_type)
        sched.set_timesteps(steps, device=device)
        if generator is None and seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(seed)
        cond = self.context(tokens).to(self.unet.dtype)
        b = cond.shape[0]
        guided = guidance_scale != 1.0
        ctx = torch.cat([self.null(b, cond), cond]) if guided else cond
        spatial = self.spatial_map(tokens)
        if spatial is not None and guided:
            spatial = torch.cat([torch.zeros_like(spatial), spatial])
        c = self.sample_channels
        s = int(self.unet.config.sample_size)
        draw = generator.device if generator is not None else "cpu"
        x = torch.randn((b, c, s, s), generator=generator, device=draw).to(device)  # float32
        x = x * sched.init_noise_sigma
        # stochastic schedulers take the generator; deterministic ones have no such argument
        step_kw = (
            {"generator": generator}
            if "generator" in inspect.signature(sched.step).parameters
            else {}
        )
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]) if guided else x, t)
            inp = self._unet_input(inp.to(self.unet.dtype), spatial)
            pred = self.unet(inp, t, encoder_hidden_states=ctx).sample.float()
            if guided:
                uncond, cond_pred = pred.chunk(2)
                pred = uncond + guidance_scale * (cond_pred - uncond)
            x = sched.step(pred, t, x, **step_kw).prev_sample
        images = self._to_pixels(x)
        return _to_pil(images) if output_type == "pil" else images

    def _to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch_size > 1:
            x = F.pixel_shuffle(x, self.patch_size)
        if self.vae is not None:
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            x = self.vae.decode(
                (x / self.vae.config.scaling_factor + shift).to(self.vae.dtype)
            ).sample
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    # -- checkpoints -------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {
            "token_dim": self.token_dim,
            "num_tokens": self.num_tokens,
            "mode": self.mode,
            "adapter": self.adapter_spec,
            "context_length": self.context_length,
            "prediction_type": self.prediction_type,
            "cond_dropout": self.cond_dropout,
            "snr_gamma": self.snr_gamma,
            "token_noise": self.token_noise,
            "null_conditioning": self.null_conditioning,
            "spatial_channels": self.spatial_channels,
            "spatial_detail": self.spatial_detail,
            "patch_size": self.patch_size,
            "dtype": dtype_name(self.unet.dtype),
        }

    def save_pretrained(self, directory: str | Path) -> dict[str, Any]:
        """Write the SD layout plus ``adapter.safetensors`` and ``config.json``; returns the
        keyword arguments that reload it (with ``pretrained=directory``)."""
        with atomic_directory(Path(directory), FORMAT) as tmp:
            self._write(tmp)
        return self.settings()

    def _write(self, path: Path) -> None:
        self.unet.save_pretrained(str(path / "unet"))
        if self.vae is not None:
            self.vae.save_pretrained(str(path / "vae"))
        self.noise_scheduler.save_pretrained(str(path / "scheduler"))
        tensors = {k: v.contiguous() for k, v in self.adapter.state_dict().items()}
        if self.null_conditioning == "learned":
            tensors["null_context"] = self.null_context.detach().contiguous()
        if self.spatial is not None:
            tensors["spatial.weight"] = self.spatial.weight.detach().contiguous()
        save_file(tensors, str(path / "adapter.safetensors"))
        write_json(
            path / "config.json", {"format": FORMAT, **self.settings(), "weights": sorted(tensors)}
        )


def _cast(model: Any, dtype: torch.dtype) -> Any:
    return model if model.dtype == dtype else model.to(dtype)


def _prediction_type(value: str) -> str:
    value = "v_prediction" if value == "v" else value
    if value not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type '{value}'; use epsilon, v or sample")
    return value


_DEFAULTS = {
    "adapter": "mlp",
    "context_length": 77,
    "null_conditioning": "zeros",
    "prediction_type": "epsilon",
    "token_dim": None,
    "num_tokens": None,
    "spatial_channels": 0,
    "spatial_detail": 1,
    "patch_size": 1,
}


def _resolve(given: dict[str, Any], saved: dict[str, Any], root: Path | None) -> dict[str, Any]:
    """Explicit settings, else the saved decoder's, else defaults; a contradiction is an error."""
    out = {}
    for key, default in _DEFAULTS.items():
        value, stored = given[key], saved.get(key)
        if key == "adapter" and value is not None:
            value = ComponentSpec.parse(value, "decoder adapter")
            value = {"name": value.name, "kwargs": value.kwargs}
            if stored is not None and stored["name"] == value["name"] and not value["kwargs"]:
                value = stored  # a bare name means "as saved"
        if value is not None and stored is not None and value != stored:
            raise CheckpointError(
                f"decoder in '{root}' was saved with {key}={stored!r} but {key}={value!r} was "
                "given; drop the argument to use the saved value"
            )
        out[key] = value if value is not None else stored if stored is not None else default
    return out


def _to_pil(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]
