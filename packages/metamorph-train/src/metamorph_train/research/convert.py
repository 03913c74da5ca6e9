""":func:`convert_research_checkpoint`: a checkpoint of the research code
(facebookresearch/metamorph, ``MetaMorphLlamaForCausalLM``) as a MetaMorph checkpoint.

Key mapping (research -> ours):

=========================================  ==============================================
``model.embed_tokens.weight``,             ``backbone/`` (a plain ``LlamaForCausalLM``,
``model.layers.*``, ``model.norm.weight``,  same keys, ``model_type`` ``llama``, with the
``lm_head.weight``                          checkpoint's tokenizer)
``model.mm_projector.{i}.*``               ``projector.net.{i}.*`` (``mlp{N}x_gelu``)
``model.mm_projector.*`` (``linear``)      ``projector.net.0.*``
``vision_head.{i}.*``                      ``head.net.{i}.*`` (``mlp``, ``mlp2x_gelu``)
``vision_head.*`` (no head type)           ``head.net.0.*`` (``linear``)
``model.vision_tower.vision_tower.*``      ``encoder/`` (a ``SiglipVisionModel``; the
                                           unused pooling ``head.*`` is dropped)
``model.vision_proj.*``                    dropped (never used by the research code)
=========================================  ==============================================

Nothing is downloaded: the encoder comes from the checkpoint's tower, or from a local
directory / the local Hugging Face cache (``encoder``). The result is self-contained.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from metamorph_core import MetaMorphModel, create
from metamorph_core.checkpoint import (
    CONFIG_NAME,
    atomic_directory,
    is_checkpoint,
    read_json,
    write_json,
)
from metamorph_core.config import ComponentSpec, MetaMorphConfig
from metamorph_core.dtypes import dtype_name, resolve_dtype
from metamorph_core.errors import CheckpointError
from metamorph_core.saving import FORMAT
from metamorph_train.research.encoder import build_encoder
from metamorph_train.research.spec import (
    HEAD_PREFIX,
    IGNORED_PREFIXES,
    PROJECTOR_PREFIX,
    RESEARCH_FIELDS,
    RESEARCH_MODEL_TYPE,
    TOWER_PREFIX,
    ResearchSpec,
    llama_config,
    map_weights,
    read_spec,
)
from metamorph_train.research.weights import TensorSource, read_config

logger = logging.getLogger("metamorph")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
BOS_NOTE = (
    "the research code tokenises prompts with two BOS tokens (<|begin_of_text|> from the "
    "tokenizer and from the template); MetaMorph's llama3 template writes one"
)


def convert_research_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    visualizer: str | Path | None = None,
    sd15: str | Path | None = None,
    encoder: str | None = None,
    dtype: str | None = None,
) -> Path:
    """Convert the research checkpoint directory ``ckpt`` into a MetaMorph checkpoint at
    ``out`` (written atomically; ``out`` must be new, empty or an earlier MetaMorph
    checkpoint) and return ``out``; ``MetaMorphModel.from_pretrained(out)`` loads it.

    ``visualizer``: a directory with ``adapter_checkpoint.pt``, ``unet_checkpoint.pt`` and
    ``model_config.json``, converted into the attached ``sd-unet`` decoder on the Stable
    Diffusion 1.5 directory ``sd15`` (required with it). ``encoder``: a local directory or a
    hub id already in the local cache, used for the SigLIP tower's config and preprocessing
    (and for its weights when the checkpoint holds no tower); default the research code's
    ``google/siglip-so400m-patch14-384``. ``dtype``: of the converted weights, default the
    dtype the LLM weights are stored in. Anything that cannot be converted exactly is a
    ``CheckpointError`` naming it; weights are read from safetensors, or from pickles with
    ``weights_only=True`` only."""
    ckpt, out = Path(ckpt), Path(out)
    if (visualizer is None) != (sd15 is None):
        raise ValueError(
            "a visualizer is converted onto Stable Diffusion 1.5's VAE and configs: give both "
            "visualizer= (--visualizer DIR) and sd15= (--sd15 DIR, with unet/ vae/ scheduler/)"
        )
    _check_out(ckpt, out)
    config = read_config(ckpt, RESEARCH_MODEL_TYPE)
    spec = read_spec(config)
    tensors = TensorSource(ckpt)
    groups = _group_keys(tensors)
    # the small modules' tensors, read before the LLM's (a pickled file is then dropped once)
    aux = {k: tensors.get(k) for k in groups["aux"]}
    embed = tensors.get("model.embed_tokens.weight")
    rows, weight_dtype = int(embed.shape[0]), embed.dtype
    del embed
    torch_dtype = resolve_dtype(dtype) if dtype is not None else weight_dtype
    name = dtype_name(torch_dtype)
    if groups["ignored"]:
        logger.info(
            "ignoring %d weights the research code never uses: %s",
            len(groups["ignored"]),
            ", ".join(groups["ignored"]),
        )
    record: dict[str, Any] = {
        "code": "facebookresearch/metamorph (MetaMorphLlamaForCausalLM)",
        "checkpoint": str(ckpt.resolve()),
        "weights": tensors.description,
        "research_config": {k: config[k] for k in sorted(RESEARCH_FIELDS & set(config))},
        "ignored_weights": groups["ignored"],
        "notes": [BOS_NOTE],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.stage-", dir=out.parent) as tmp:
        stage = Path(tmp)
        backbone = _build_backbone(ckpt, config, tensors, groups["llm"], torch_dtype, stage)
        _check_image_ids(backbone, rows, ckpt)
        enc, enc_record = build_encoder(aux, spec, encoder, torch_dtype, stage)
        record.update(enc_record)
        model = _assemble(out, spec, enc, backbone, aux, torch_dtype)
        if visualizer is not None:
            from metamorph_train.research.visualizer import convert_visualizer

            decoder, record["visualizer"] = convert_visualizer(
                Path(visualizer), Path(sd15), stage, enc.hidden_size, spec.num_tokens, name
            )
            model.attach_decoder(decoder)
        logger.info("research checkpoint: %s", BOS_NOTE)
        _save(model, out, record)
    return out


def _check_out(ckpt: Path, out: Path) -> None:
    if out.resolve() == ckpt.resolve():
        raise ValueError(f"the output '{out}' is the research checkpoint itself; pick a new one")
    if out.exists() and not (
        out.is_dir() and (not any(out.iterdir()) or is_checkpoint(out, FORMAT))
    ):
        raise CheckpointError(
            f"refusing to write into '{out}': it exists and is not a MetaMorph checkpoint (the "
            "output directory is replaced as a whole); pick a new or empty directory"
        )


def _group_keys(tensors: TensorSource) -> dict[str, list[str]]:
    """The checkpoint's keys by destination: ``llm`` (the backbone), ``aux`` (projector,
    head, vision tower), ``ignored``; keys of any other module are refused."""
    groups: dict[str, list[str]] = {"llm": [], "aux": [], "ignored": [], "other": []}
    own = (PROJECTOR_PREFIX + ".", HEAD_PREFIX + ".", TOWER_PREFIX)
    for key in tensors.names():
        if key.startswith(IGNORED_PREFIXES):
            groups["ignored"].append(key)
        elif key.startswith(own):
            groups["aux"].append(key)
        elif key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")):
            groups["llm"].append(key)
        else:
            groups["other"].append(key)
    if groups["other"]:
        raise CheckpointError(
            f"the checkpoint holds weights of modules the converter does not know: "
            f"{groups['other'][:8]}; it was not written by the research code's "
            "MetaMorphLlamaForCausalLM with the paper's settings"
        )
    if "model.embed_tokens.weight" not in tensors:
        raise CheckpointError("the checkpoint has no model.embed_tokens.weight (no LLM weights)")
    return groups


def _build_backbone(
    ckpt: Path,
    config: dict[str, Any],
    tensors: TensorSource,
    keys: list[str],
    torch_dtype: torch.dtype,
    stage: Path,
) -> Any:
    """Write the LLM as a plain Llama directory (weights, config, the checkpoint's tokenizer)
    and load it as our ``hf-causal-lm`` backbone."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg_dict, dropped = llama_config(config)
    logger.info("research config fields left out of the Llama config: %s", ", ".join(dropped))
    cfg = LlamaConfig.from_dict(cfg_dict)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    state = {k: tensors.get(k).to(torch_dtype) for k in keys}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    expected = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
    missing = sorted(set(expected) - set(state) - ({"lm_head.weight"} if tied else set()))
    extra = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {expected[k]}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != expected[k]
    ]
    if missing or extra or wrong:
        raise CheckpointError(
            f"the LLM weights of '{ckpt}' do not fit the Llama its config.json describes: "
            f"missing {missing[:8]}, unexpected {extra[:8]}, wrong shapes {wrong[:8]}"
        )
    lm.load_state_dict(state, strict=False, assign=True)
    if tied:
        lm.tie_weights()
    target = stage / "backbone"
    lm.save_pretrained(str(target))
    del lm, state
    tensors.release()
    copied = [f for f in TOKENIZER_FILES if (ckpt / f).is_file()]
    if not any(f in copied for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CheckpointError(
            f"'{ckpt}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:5])}, ...); copy the "
            "tokenizer saved with the checkpoint (it holds <image_start> and <image_end>)"
        )
    for f in [*copied, "generation_config.json"]:
        if (ckpt / f).is_file():
            shutil.copyfile(ckpt / f, target / f)
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(target)).get_vocab()
    lacking = [t for t in ("<image_start>", "<image_end>") if t not in vocab]
    if lacking:  # the backbone would add them and overwrite their trained rows
        raise CheckpointError(
            f"the tokenizer saved in '{ckpt}' lacks {lacking}, which the research code adds "
            "before training; copy the tokenizer files saved with the checkpoint"
        )
    return create(
        "backbone",
        "hf-causal-lm",
        pretrained=str(target),
        dtype=dtype_name(torch_dtype),
        strict=True,
    )


def _check_image_ids(backbone: Any, rows: int, ckpt: Path) -> None:
    """The research code appends ``<image_start>``, ``<image_end>`` after the base vocabulary
    (ids ``rows - 2``, ``rows - 1``: 128256, 128257 for Llama 3); the tokenizer must agree."""
    got = (backbone.image_start_id, backbone.image_end_id)
    now = backbone.causal_lm.get_input_embeddings().num_embeddings
    if got != (rows - 2, rows - 1) or now != rows:
        raise CheckpointError(
            f"the tokenizer of '{ckpt}' gives <image_start>, <image_end> the ids {got}, but the "
            f"research model's {rows}-row embedding holds them at {(rows - 2, rows - 1)}; use "
            "the tokenizer files saved with the checkpoint"
        )


def _assemble(
    out: Path,
    spec: ResearchSpec,
    encoder: Any,
    backbone: Any,
    aux: dict[str, torch.Tensor],
    torch_dtype: torch.dtype,
) -> MetaMorphModel:
    """The model, its projector and head filled from the research weights."""
    if encoder.hidden_size != spec.token_dim:
        raise CheckpointError(
            f"config.json says mm_hidden_size={spec.token_dim} but the vision tower gives "
            f"{encoder.hidden_size}-d tokens; pass the encoder the checkpoint was trained with"
        )
    root = out.resolve()  # where the encoder's and backbone's weights will be
    config = MetaMorphConfig(
        encoder=ComponentSpec(
            "siglip", {"pretrained": str(root / "encoder"), **spec.encoder_options}
        ),
        backbone=ComponentSpec("hf-causal-lm", {"pretrained": str(root / "backbone")}),
        projector=ComponentSpec(spec.projector),
        head=ComponentSpec(spec.head),
        template=ComponentSpec("llama3"),
    )
    model = MetaMorphModel.from_config(config, {"encoder": encoder, "backbone": backbone})
    parts = [
        (model.projector, PROJECTOR_PREFIX, spec.projector_sequential, "projector (mm_projector)"),
        (model.head, HEAD_PREFIX, spec.head_sequential, "vision head (vision_head)"),
    ]
    for module, prefix, sequential, what in parts:
        found = {k: v for k, v in aux.items() if k.startswith(prefix + ".")}
        module.load_state_dict(map_weights(module, found, prefix, sequential, what))
        module.to(torch_dtype)
    return model


def _save(model: MetaMorphModel, out: Path, record: dict[str, Any]) -> None:
    """``model.save_pretrained`` into ``out``, with ``converted_from`` in its config.json."""
    with atomic_directory(out, FORMAT) as tmp:
        model.save_pretrained(tmp)
        meta = read_json(tmp / CONFIG_NAME)
        meta["converted_from"] = record
        write_json(tmp / CONFIG_NAME, meta)
