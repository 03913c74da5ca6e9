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
1/p^2 of the positions.

``spatial_channels`` (off by default; not in the paper) adds a second, local path for the same
tokens: when they form a square grid (an encoder's patch grid), a linear map of each token to
``spatial_channels`` channels is laid over its patch's area of the UNet's sample (nearest
upsampling; the sample size need not be a multiple of the grid) and concatenated to the UNet's
input, as InstructPix2Pix conditions on an image, so every position sees its own patch's token.
Conditioning dropout and the unconditional branch zero this map with the context. A pretrained
UNet without those input channels gets them as InstructPix2Pix does: ``conv_in`` widened with
zero weights, so it starts out computing exactly what it did (logged).

``spatial_detail`` d (default 1, the flat map above) gives each token a learned d x d pattern
of those channels over its patch instead of one value: a linear "unpatchify" at a coarse
resolution, the (grid*d)^2 map resized bilinearly to the sample. ``spatial_hidden`` h puts a
hidden layer of h GELU units between each token and its pattern.

The parts: :class:`~metamorph_decoders.settings.DecoderSettings` (what a decoder records, and
how arguments merge with a saved ``config.json``), :class:`DiffusionDecoder` (the modules, the
conditioning, the training loss, checkpoints) and
:class:`~metamorph_decoders.sampler.DiffusionSampler` (the sampling loop behind
:meth:`DiffusionDecoder.decode`).

Checkpoint layout (Stable Diffusion's, plus ours): ``unet/``, ``vae/`` (latent mode),
``scheduler/``, ``adapter.safetensors`` and ``config.json`` (the decoder's settings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from metamorph_core.checkpoint import atomic_directory, write_json
from metamorph_core.decoding import DecodeConfig
from metamorph_core.dtypes import dtype_name, resolve_dtype
from metamorph_core.interfaces import VisualDecoder
from metamorph_core.plugins.registry import create
from metamorph_core.vision import perturb_tokens
from metamorph_decoders.building import (
    DEFAULT_NOISE_SCHEDULE,
    build_unet,
    build_vae,
    cast,
    fit_channels,
    image_side,
    load_adapter_file,
    read_noise_schedule,
    read_unet_config,
)
from metamorph_decoders.loading import read_saved_config, resolve_decoder_dir
from metamorph_decoders.sampler import DiffusionSampler, check_output_type
from metamorph_decoders.schedulers import check_scheduler, make_scheduler
from metamorph_decoders.settings import (
    PREDICTION_TYPES,
    DecoderSettings,
    resolve_settings,
    settings_attribute,
)
from metamorph_decoders.spatial import SpatialMap

FORMAT = "metamorph-decoder"
__all__ = ["DEFAULT_NOISE_SCHEDULE", "FORMAT", "PREDICTION_TYPES", "DiffusionDecoder"]


class DiffusionDecoder(VisualDecoder):
    """Visual tokens ``(b, num_tokens, token_dim)`` -> images ``(b, 3, h, w)`` in [0, 1].

    ``config`` is the decoder's :class:`~metamorph_decoders.settings.DecoderSettings`; its
    fields are also attributes (``token_dim``, ``mode``, ``patch_size`` ...), read-only except
    the training settings ``cond_dropout``, ``snr_gamma`` and ``token_noise`` and the default
    ``sampling``."""

    token_dim = settings_attribute("token_dim")
    num_tokens = settings_attribute("num_tokens")
    mode = settings_attribute("mode")
    context_length = settings_attribute("context_length")
    prediction_type = settings_attribute("prediction_type")
    null_conditioning = settings_attribute("null_conditioning")
    spatial_channels = settings_attribute("spatial_channels")
    spatial_detail = settings_attribute("spatial_detail")
    spatial_hidden = settings_attribute("spatial_hidden")
    patch_size = settings_attribute("patch_size")
    cond_dropout = settings_attribute("cond_dropout", writable=True)
    snr_gamma = settings_attribute("snr_gamma", writable=True)
    token_noise = settings_attribute("token_noise", writable=True)
    sampling = settings_attribute("sampling", writable=True)

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
        spatial_hidden: int | None = None,
        patch_size: int | None = None,
        snr_gamma: float | None = None,
        token_noise: float | None = None,
        sampling: DecodeConfig | dict[str, Any] | None = None,
        dtype: str | torch.dtype = "float32",
        seed: int | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
    ) -> None:
        """Settings left as ``None`` come from a pretrained decoder's ``config.json`` when there
        is one, else from the defaults (``mlp`` adapter, 77 context tokens, epsilon, dropout
        0.75, ``zeros`` null); giving a setting that contradicts a saved decoder is an error
        (see :func:`~metamorph_decoders.settings.resolve_settings`). ``pretrained`` (a Stable
        Diffusion layout directory, or a Hugging Face Hub repo id holding one, in ``subfolder``
        when given, fetched at ``revision`` into ``cache_dir``, from the cache alone with
        ``local_files_only``: see :func:`~metamorph_decoders.loading.resolve_decoder_dir`) or
        ``unet_config`` (a fresh UNet) is required, not both;
        ``vae_config`` / ``scheduler_config`` build a fresh VAE / noise schedule when there is
        no directory. ``seed`` fixes the fresh weights of the adapter, UNet and spatial map
        (drawn from a forked RNG; a fresh VAE and a widened ``conv_in`` draw from torch's
        global one); ``dtype`` is the precision the UNet, adapter, spatial map and VAE are
        cast to. Bad settings are ``ValueError``s naming them (see
        :class:`~metamorph_decoders.settings.DecoderSettings`)."""
        super().__init__()
        self._progress_bar = False  # set_progress_bar
        if (pretrained is None) == (unet_config is None):
            raise ValueError(
                "decoder 'sd-unet' needs exactly one of pretrained= (a Stable-Diffusion-layout "
                "directory with unet/, scheduler/ and, for latent mode, vae/, or a Hub repo id "
                "of one) or unet_config="
            )
        where = {"subfolder": subfolder, "revision": revision, "cache_dir": cache_dir}
        where["local_files_only"] = local_files_only
        if pretrained is None and any(v is not None for v in where.values()):
            given = sorted(k for k, v in where.items() if v is not None)
            raise ValueError(
                f"decoder 'sd-unet': {given} say where pretrained= is read from, but there is "
                "no pretrained=; drop them or give pretrained="
            )
        root = None
        if pretrained is not None:
            root = resolve_decoder_dir(pretrained, subfolder, revision, cache_dir, local_files_only)
        saved = read_saved_config(root) if root is not None else {}
        if root is not None and scheduler_config is not None:
            raise ValueError(
                "scheduler_config= cannot be combined with pretrained=: the noise schedule is the "
                f"one the UNet was trained with, in '{root}/scheduler/'"
            )
        given = {
            "token_dim": token_dim,
            "num_tokens": num_tokens,
            "mode": mode,
            "adapter": adapter,
            "context_length": context_length,
            "prediction_type": prediction_type,
            "cond_dropout": cond_dropout,
            "snr_gamma": snr_gamma,
            "token_noise": token_noise,
            "sampling": sampling,
            "null_conditioning": null_conditioning,
            "spatial_channels": spatial_channels,
            "spatial_detail": spatial_detail,
            "spatial_hidden": spatial_hidden,
            "patch_size": patch_size,
        }
        has_vae = vae_config is not None or (root is not None and (root / "vae").is_dir())
        self.config: DecoderSettings = resolve_settings(given, saved, root=root, has_vae=has_vae)
        torch_dtype = resolve_dtype(dtype)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self._build_conditioned_unet(root, unet_config, reshape_cross_attention)
        self.unet = cast(self.unet, torch_dtype)
        self.adapter.to(torch_dtype)
        if self.spatial is not None:
            self.spatial.to(torch_dtype)
        self.vae = None
        if self.mode == "latent":  # a fresh VAE draws from torch's global RNG, not ``seed``
            self.vae = build_vae(root, vae_config)
            self.vae = cast(self.vae, torch_dtype).requires_grad_(False).eval()
        self.scheduler_config = read_noise_schedule(root, scheduler_config)
        self.noise_scheduler = make_scheduler("ddpm", self.scheduler_config, self.prediction_type)
        self.sample_channels = fit_channels(self.unet, self.vae, self.config, root is not None)
        side = image_side(self.unet, self.vae, self.patch_size)
        self.image_size = (side, side)

    def _build_conditioned_unet(
        self, root: Path | None, unet_config: dict[str, Any] | None, reshape: bool
    ) -> None:
        """The adapter, the UNet, the spatial map and the learned null context, in that order
        (the order their fresh weights are drawn), then the saved adapter weights if any."""
        unet_cfg = read_unet_config(root) if root is not None else dict(unet_config)
        spec = self.config.adapter
        width = int(unet_cfg["cross_attention_dim"])
        self.adapter = create(
            "adapter", spec.name, **{"in_dim": self.token_dim, "out_dim": width, **spec.kwargs}
        )
        self.unet = build_unet(root, unet_cfg, self.adapter, reshape)
        self.spatial = (
            SpatialMap(
                self.token_dim,
                self.spatial_channels,
                self.num_tokens,
                self.spatial_detail,
                self.spatial_hidden,
            )
            if self.spatial_channels
            else None
        )
        if self.null_conditioning == "learned":
            rows = max(self.context_length, self.adapter.out_tokens(self.num_tokens))
            self.null_context = torch.nn.Parameter(torch.zeros(rows, self.adapter.out_dim))
        if root is not None and (root / "adapter.safetensors").is_file():
            load_adapter_file(
                root / "adapter.safetensors",
                self.config,
                self.adapter,
                self.spatial,
                getattr(self, "null_context", None),
            )

    @property
    def adapter_spec(self) -> dict[str, Any]:
        """The adapter's registry name and kwargs, ``{"name": ..., "kwargs": {...}}``."""
        return self.config.adapter_spec

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

    def unet_input(self, x: torch.Tensor, spatial: torch.Tensor | None) -> torch.Tensor:
        """The UNet's input: the sample ``x``, then the spatial map's channels if any."""
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
        inp = self.unet_input(noisy.to(dtype), spatial)
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
        config: DecodeConfig | dict[str, Any] | None = None,
        *,
        generator: torch.Generator | None = None,
        output_type: str = "pt",
        **options: Any,
    ) -> Any:
        """Sample images for ``tokens`` ``(b, n, c)``: ``output_type`` ``"pt"`` gives ``(b, 3,
        h, w)`` float32 in [0, 1], ``"pil"`` a list of PIL images. ``config`` (a
        :class:`~metamorph_core.decoding.DecodeConfig`; or a dict of some of its fields, or
        ``None``, over this decoder's ``sampling`` setting) with ``options`` (its fields as keywords: ``scheduler``, ``steps``,
        ``guidance_scale``, ``seed``) overriding it says how; ``generator``, when given, draws
        the noise instead of the seed. With ``guidance_scale`` != 1 the conditional and
        unconditional (null-context) branches run in one batched UNet call:
        ``uncond + s * (cond - uncond)``. Bad options are ``ValueError``s naming them. The
        loop is :meth:`~metamorph_decoders.sampler.DiffusionSampler.sample`."""
        if config is None or isinstance(config, dict):  # fields over this decoder's sampling
            config = DecodeConfig.of(self.sampling, **(config or {}), **options)
        else:
            config = DecodeConfig.of(config, **options)
        check_output_type(output_type)
        return DiffusionSampler(self).sample(
            tokens, config, generator, output_type, self._progress_bar
        )

    def check_decoding(self, config: DecodeConfig) -> None:
        """``ValueError`` when ``config.scheduler`` is unknown or cannot sample this decoder's
        ``prediction_type``."""
        check_scheduler(config.scheduler, self.prediction_type)

    def set_progress_bar(self, enabled: bool = True) -> None:
        self._progress_bar = enabled

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The UNet's sample space ``(b, c, s, s)`` -> float32 images ``(b, 3, h, w)`` in
        [0, 1]: patches unfolded, latents decoded by the VAE, values clamped."""
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
        """What ``config.json`` records: the :class:`DecoderSettings` fields (the adapter as
        ``{"name": ..., "kwargs": {...}}``) and ``dtype``, the UNet's."""
        return {**self.config.to_dict(), "dtype": dtype_name(self.unet.dtype)}

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
        if self.spatial is not None:  # spatial.weight (and spatial.hidden.* with a hidden layer)
            for key, value in self.spatial.state_dict().items():
                tensors[f"spatial.{key}"] = value.detach().contiguous()
        save_file(tensors, str(path / "adapter.safetensors"))
        write_json(
            path / "config.json", {"format": FORMAT, **self.settings(), "weights": sorted(tensors)}
        )
