"""``hf-causal-lm`` (aliases ``llama``, ``qwen2``, ``qwen3``): any transformers causal LM.

Loads from a hub id or local directory (``pretrained``; ``revision`` and ``cache_dir`` apply to
hub ids) or builds a random model from a config dict (``config``, with ``model_type``), always
with an explicit dtype (transformers 5 would otherwise keep a checkpoint's own dtype). Adds
``<image_start>`` / ``<image_end>`` when the tokenizer lacks them, initialising their embedding
rows (and untied ``lm_head`` rows) to the mean of the existing token rows. An embedding matrix
padded beyond the tokenizer (Qwen) is never shrunk: new tokens take padded rows when there are
any. ``quantize="nf4"`` loads the linear layers' weights in 4 bits (bitsandbytes NF4 with double
quantisation, the ``qlora`` extra) for QLoRA: such a backbone trains through LoRA and is saved as
its adapter.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metamorph_core.dtypes import dtype_name, resolve_dtype
from metamorph_core.errors import CheckpointError
from metamorph_core.hub import is_repo_id
from metamorph_core.interfaces import CHECKPOINT_DIR, SUBFOLDER, Backbone, BackboneOutput

IMAGE_START = "<image_start>"
IMAGE_END = "<image_end>"


class HFCausalLM(Backbone):
    """A transformers ``AutoModelForCausalLM`` with its tokenizer and the image tokens."""

    def __init__(
        self,
        pretrained: str | Path | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | Path | None = None,
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        seed: int | None = None,
        strict: bool = False,
        lora_adapter: str | Path | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        quantize: str | None = None,
    ) -> None:
        super().__init__()
        self._lora: dict[str, Any] | None = None
        # the image tokens' input rows as a parameter of their own (train_image_token_rows)
        self.register_parameter("image_token_rows", None)
        # where a LoRA checkpoint finds its base: an existing directory (made absolute, so a
        # later change of working directory does not matter), else the Hub id
        self._base_dir: Path | None = None
        if pretrained is not None and Path(pretrained).expanduser().is_dir():
            self._base_dir = pretrained = Path(pretrained).expanduser().resolve()
        self._source = str(pretrained) if pretrained is not None else None
        self._revision = revision
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if (pretrained is None) == (config is None):
            raise ValueError(
                "backbone 'hf-causal-lm' needs exactly one of pretrained= (hub id or directory) "
                "or config= (a dict with 'model_type', for random init)"
            )
        torch_dtype = resolve_dtype(dtype)
        tok_source = tokenizer if tokenizer is not None else pretrained
        if tok_source is None:
            raise ValueError(
                "backbone 'hf-causal-lm' built from config= needs tokenizer= (hub id or directory)"
            )
        hub = {"revision": revision, "cache_dir": cache_dir}  # for hub ids, not directories
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(tok_source), trust_remote_code=trust_remote_code, **_hub_options(tok_source, **hub)
        )
        extra: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
        if attn_implementation is not None:
            extra["attn_implementation"] = attn_implementation
        if quantize is not None:
            extra.update(_quantization(quantize, torch_dtype, pretrained))
        if pretrained is not None and torch.get_default_device().type == "meta":
            # building the shape only (FSDP2 meta-device initialisation: the weights arrive
            # from another rank once the model is sharded)
            if lora_adapter is not None:
                raise ValueError("a LoRA checkpoint cannot be built on the meta device")
            cfg = AutoConfig.from_pretrained(
                str(pretrained),
                trust_remote_code=trust_remote_code,
                **_hub_options(pretrained, **hub),
            )
            self.lm = AutoModelForCausalLM.from_config(cfg, **extra)
        elif pretrained is not None:
            try:
                self.lm, info = AutoModelForCausalLM.from_pretrained(
                    str(pretrained),
                    output_loading_info=True,
                    **extra,
                    **_hub_options(pretrained, **hub),
                )
            except OSError as e:
                if lora_adapter is None:
                    raise CheckpointError(f"backbone: cannot load '{pretrained}': {e}") from e
                at = f" at revision '{revision}'" if revision else ""
                raise CheckpointError(
                    f"backbone: cannot load the LoRA adapter's base model '{pretrained}'{at}: "
                    f"{e}. A LoRA checkpoint holds the adapter alone and needs its base model: "
                    "make that loadable (online, or logged in for a private or gated repo), or "
                    "point to a local copy of it (in a MetaMorph checkpoint: set "
                    "components.backbone.load_kwargs.pretrained in its config.json)"
                ) from e
            bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
            if strict and bad:
                raise CheckpointError(
                    f"backbone weights in '{pretrained}' do not match its config: "
                    + "; ".join(f"{k}: {sorted(v)[:8]}" for k, v in bad.items())
                )
        else:
            cfg_kwargs = dict(config)
            model_type = cfg_kwargs.pop("model_type", None)
            if model_type is None:
                raise ValueError("backbone config= must contain 'model_type' (e.g. 'llama')")
            cfg = AutoConfig.for_model(model_type, **cfg_kwargs)
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                self.lm = AutoModelForCausalLM.from_config(cfg, **extra)
        text_config = self.lm.config.get_text_config()
        self.hidden_size = int(text_config.hidden_size)
        self.max_length = int(getattr(text_config, "max_position_embeddings", 1 << 30))
        self._softcap = getattr(text_config, "final_logit_softcapping", None)
        self._add_image_tokens()
        # transformers renamed `past_key_values` to `cache` during 5.x; the old name would be
        # swallowed by **kwargs and the cache silently ignored, so ask the signature.
        params = inspect.signature(self.lm.base_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.image_start_id = self.tokenizer.convert_tokens_to_ids(IMAGE_START)
        self.image_end_id = self.tokenizer.convert_tokens_to_ids(IMAGE_END)
        if lora_adapter is not None:
            peft = _import_peft()
            self.lm = peft.PeftModel.from_pretrained(self.lm, str(lora_adapter), is_trainable=True)
            cfg = self.lm.peft_config["default"]
            self._lora = {
                "r": cfg.r,
                "alpha": cfg.lora_alpha,
                "dropout": cfg.lora_dropout,
                "target_modules": cfg.target_modules,
            }
        self._init_kwargs = {
            "trust_remote_code": trust_remote_code,
            "attn_implementation": attn_implementation,
        }
        self.quantize = quantize
        if quantize is not None:
            self._init_kwargs["quantize"] = quantize

    def _add_image_tokens(self) -> None:
        """Add the image tokens if the tokenizer lacks them, and give every token id an
        embedding row (a tokenizer saved with a LoRA adapter already has them while its base
        model does not). New rows start at the mean of the existing rows."""
        from transformers import AddedToken

        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (IMAGE_START, IMAGE_END) if t not in vocab]
        if missing:
            self.tokenizer.add_tokens(
                [AddedToken(t, special=True, normalized=False) for t in missing],
                special_tokens=True,
            )
        ids = self.tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_END])
        rows = self.lm.get_input_embeddings().num_embeddings
        if not missing and max(ids) < rows:
            return
        n_before = min(ids) if not missing else len(self.tokenizer) - len(missing)
        n_before = min(n_before, rows)
        if max(ids) >= rows:  # only ever grow; padded matrices keep their rows
            self.lm.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
        # the image tokens and any rows the matrix grew by (a tokenizer that outgrew its
        # matrix) start at the mean: nothing random, so a LoRA checkpoint rebuilds them
        new_ids = sorted({i for i in ids if i >= n_before} | set(range(rows, max(ids) + 1)))
        with torch.no_grad():
            w_in = self.lm.get_input_embeddings().weight
            w_in[new_ids] = w_in[:n_before].mean(dim=0, keepdim=True)
            head = self.lm.get_output_embeddings()
            if head is not None and head.weight.data_ptr() != w_in.data_ptr():
                head.weight[new_ids] = head.weight[:n_before].mean(dim=0, keepdim=True)

    # -- the image tokens' rows --------------------------------------------------------------
    def train_image_token_rows(self) -> nn.Parameter:
        """Give the input-embedding rows of ``<image_start>`` and ``<image_end>`` a parameter
        of their own, ``image_token_rows`` ``(2, d)``, which :meth:`embed` uses for those two
        ids; a trainer can then train these two rows alone while the embedding matrix stays
        frozen (the paper's stage 1 trains them with the projector). :meth:`save_pretrained`
        writes them back into the embedding matrix, so the saved model is a plain one and the
        next stage loads them with it. Returns the parameter (created once)."""
        if self._lora is not None:
            raise ValueError(
                "with LoRA the image tokens' rows already train through peft's trainable tokens"
            )
        if self.image_token_rows is None:
            weight = self.causal_lm.get_input_embeddings().weight
            ids = [self.image_start_id, self.image_end_id]
            self.image_token_rows = nn.Parameter(weight[ids].detach().clone())
        return self.image_token_rows

    def _tied(self) -> bool:
        lm = self.causal_lm
        head = lm.get_output_embeddings()
        return head is not None and head.weight is lm.get_input_embeddings().weight

    def _write_back_image_token_rows(self) -> None:
        if self.image_token_rows is None:
            return
        with torch.no_grad():
            weight = self.causal_lm.get_input_embeddings().weight
            weight[[self.image_start_id, self.image_end_id]] = self.image_token_rows.to(weight)

    # -- LoRA ------------------------------------------------------------------------------
    def apply_lora(
        self,
        r: int = 16,
        alpha: int = 32,
        dropout: float = 0.0,
        target_modules: list[str] | str = "all-linear",
    ) -> None:
        """Wrap the LLM with peft LoRA. The base weights freeze; LoRA matrices train, and the
        image tokens' rows train through peft's trainable tokens (on the input embedding and,
        when it is not tied, on ``lm_head``)."""
        peft = _import_peft()
        if self._lora is not None:
            raise ValueError("the backbone already has LoRA applied")
        tied = (
            self.lm.get_output_embeddings().weight.data_ptr()
            == self.lm.get_input_embeddings().weight.data_ptr()
        )
        ids = [self.image_start_id, self.image_end_id]
        names = {m: n.rsplit(".", 1)[-1] for n, m in self.lm.named_modules()}
        tokens = {names[self.lm.get_input_embeddings()]: ids}
        if not tied:
            tokens[names[self.lm.get_output_embeddings()]] = ids
        self._lora = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": target_modules}
        config = peft.LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=target_modules,
            trainable_token_indices=tokens,
            task_type="CAUSAL_LM",
        )
        self.lm = peft.get_peft_model(self.lm, config)

    def merge_lora(self) -> None:
        if self._lora is None:
            raise ValueError("the backbone has no LoRA to merge")
        if self.quantize is not None:
            raise ValueError(
                f"the backbone's base weights are {self.quantize}-quantised: merging LoRA into "
                "them would round the merged weights to 4 bits again and lose most of what "
                "LoRA learnt. Merge into the full-precision base instead: `metamorph "
                "merge-lora CKPT OUT` does (it loads the checkpoint with "
                "backbone_kwargs={'quantize': None}, then merges)"
            )
        self.lm = self.lm.merge_and_unload()
        self._lora = None

    @property
    def lora(self) -> dict[str, Any] | None:
        """The LoRA settings (``r``, ``alpha``, ``dropout``, ``target_modules``) while LoRA is
        applied, else ``None``."""
        return None if self._lora is None else dict(self._lora)

    @property
    def causal_lm(self) -> Any:
        """The transformers causal LM (inside peft's wrapper when LoRA is applied)."""
        return self.lm.get_base_model() if self._lora is not None else self.lm

    @property
    def pad_id(self) -> int:
        for tid in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if tid is not None:
                return int(tid)
        return 0

    @property
    def dtype(self) -> torch.dtype:
        return self.causal_lm.get_input_embeddings().weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.causal_lm.get_input_embeddings()(input_ids)
        if self.image_token_rows is None:
            return embeds
        rows = self.image_token_rows.to(embeds.dtype)
        embeds = torch.where((input_ids == self.image_start_id)[..., None], rows[0], embeds)
        return torch.where((input_ids == self.image_end_id)[..., None], rows[1], embeds)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
    ) -> BackboneOutput:
        out = self.causal_lm.base_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{self._cache_arg: cache},
        )
        return BackboneOutput(out.last_hidden_state, getattr(out, self._cache_arg, None))

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        head = self.causal_lm.get_output_embeddings()
        logits = head(hidden_states)
        if self.image_token_rows is not None and self._tied():  # the rows are the head's too
            ids = torch.tensor([self.image_start_id, self.image_end_id], device=logits.device)
            rows = hidden_states @ self.image_token_rows.to(hidden_states.dtype).T  # (..., 2)
            logits = logits.index_copy(-1, ids, rows.to(logits.dtype))
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def blocks(self) -> list[nn.Module]:
        return transformer_blocks(self.causal_lm)

    def static_cache(self, max_length: int) -> Any:
        from transformers import StaticCache

        return StaticCache(config=self.causal_lm.config, max_cache_len=max_length)

    def save_pretrained(self, directory: Path) -> dict[str, Any]:
        """The full model in transformers format (trained image-token rows written into its
        embedding matrix); with LoRA, only the peft adapter (and the tokenizer), referring to
        the base model by its source: a hub id (with its revision), or a local directory as a
        path relative to the checkpoint (``directory``'s parent), so that the two can move
        together."""
        self.tokenizer.save_pretrained(str(directory))
        kwargs = {**self._init_kwargs, "dtype": dtype_name(self.dtype)}
        self._write_back_image_token_rows()
        if self._lora is None and self.quantize is not None:
            raise ValueError(
                f"a backbone loaded with quantize='{self.quantize}' is saved as its LoRA "
                "adapter (its base stays where it was loaded from); apply LoRA to train it, "
                "or load the base without quantize to save it whole"
            )
        if self._lora is None:
            self.lm.save_pretrained(str(directory))
            return {**kwargs, "strict": True}
        if self._source is None or (self._base_dir is None and not is_repo_id(self._source)):
            raise ValueError(
                "a LoRA checkpoint refers to its base model, but this backbone was built from a "
                "config; save the base with save_pretrained first and build from that directory"
            )
        if self._base_dir is not None and not self._base_dir.is_dir():
            raise ValueError(
                f"a LoRA checkpoint refers to its base model, but the base model directory "
                f"'{self._base_dir}' this backbone was loaded from is gone; put it back, or "
                "merge LoRA first (model.merge_lora()) and save a full checkpoint"
            )
        # the adapter alone: peft would add the whole embedding matrix and head (gigabytes for
        # an 8B model) because the image tokens grew the vocabulary, but loading rebuilds
        # every added row from the base model as here (deterministically: _add_image_tokens),
        # and the trained rows are the adapter's trainable tokens
        self.lm.save_pretrained(str(directory), save_embedding_layers=False)
        kwargs.update(tokenizer=SUBFOLDER, lora_adapter=SUBFOLDER)
        if self._base_dir is None:  # a Hub id
            revision = {"revision": self._revision} if self._revision else {}
            return {**kwargs, "pretrained": self._source, **revision}
        try:
            checkpoint = Path(directory).resolve().parent
            relative = Path(os.path.relpath(self._base_dir, checkpoint)).as_posix()
        except ValueError:  # another drive: only an absolute path can say where it is
            return {**kwargs, "pretrained": str(self._base_dir)}
        return {**kwargs, "pretrained": f"{CHECKPOINT_DIR}/{relative}"}


#: ``quantize`` values: the frozen base weights' storage for QLoRA (bitsandbytes)
QUANTIZE = ("nf4",)


def _quantization(
    quantize: str, dtype: torch.dtype, pretrained: str | Path | None
) -> dict[str, Any]:
    """``from_pretrained`` options loading the linear layers' weights in 4-bit NF4 with double
    quantisation (QLoRA), computing in ``dtype``, on this process's accelerator or the CPU."""
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize '{quantize}'; use one of {QUANTIZE} or None")
    if pretrained is None:
        raise ValueError("quantize needs pretrained weights (pretrained=), not a random config")
    if torch.get_default_device().type == "meta":
        raise ValueError(
            "a quantised backbone cannot be built on the meta device (FSDP2's meta_init): "
            "train QLoRA with train.strategy=ddp"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"quantize='{quantize}' stores the LLM's weights in 4 bits with bitsandbytes, "
            "which is not installed: pip install 'metamorph-core[qlora]'"
        ) from e
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    if torch.cuda.is_available():  # quantised as it loads, onto this process's GPU
        device: str = f"cuda:{int(os.environ.get('LOCAL_RANK', torch.cuda.current_device()))}"
    else:
        device = "cpu"
    return {"quantization_config": config, "device_map": {"": device}}


def transformer_blocks(lm: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a transformers model, in order: the submodules whose class
    the model names in ``_no_split_modules`` (the units transformers itself never splits
    across devices), outermost only. Found this way rather than by an attribute path, which
    differs between families (``model.layers``, ``gpt_neox.layers``, ``transformer.h``)."""
    names = set(getattr(lm, "_no_split_modules", None) or ())
    found: list[tuple[str, nn.Module]] = []
    for name, module in lm.named_modules():
        if type(module).__name__ in names and not any(
            name.startswith(outer + ".") for outer, _ in found
        ):
            found.append((name, module))
    if not found:
        raise ValueError(
            f"cannot find the transformer blocks of {type(lm).__name__}: its "
            f"_no_split_modules ({sorted(names) or 'not set'}) match none of its submodules; "
            "FSDP2 (train.strategy=fsdp) shards block by block and train.compile compiles "
            "blocks, so train it with train.strategy=ddp and without train.compile, or set "
            "_no_split_modules on the model class to its decoder layer class"
        )
    return [module for _, module in found]


def _hub_options(
    source: str | Path, revision: str | None, cache_dir: str | Path | None
) -> dict[str, str]:
    """``revision`` and ``cache_dir`` for a hub id; nothing for a local path."""
    if Path(source).exists():
        return {}
    given = {"revision": revision, "cache_dir": cache_dir}
    return {k: str(v) for k, v in given.items() if v is not None}


def _import_peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise ImportError(
            "LoRA needs peft, which metamorph-core does not install by default: "
            "pip install 'metamorph-core[lora]'"
        ) from e
    return peft
