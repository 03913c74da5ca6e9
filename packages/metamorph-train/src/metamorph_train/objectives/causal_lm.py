"""``causal-lm``: next-token pretraining of a transformers causal LM on ``{"text"}`` records
(or conversations without images), built from a config with random weights or continued from
``pretrained``. Without ``model.tokenizer`` a tokenizer is trained on the sources. Saves a
transformers directory the ``hf-causal-lm`` backbone loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from metamorph_core.components.hf_causal_lm import transformer_blocks
from metamorph_core.sequence import IGNORE_INDEX
from metamorph_train.data import TextDataset
from metamorph_train.objectives.base import Objective, checkpoint_transformers

if TYPE_CHECKING:  # pragma: no cover
    from metamorph_train.recipe import Recipe


@dataclass
class CausalLMModel:
    """The ``model:`` section of a ``causal-lm`` recipe: a transformers architecture built
    from a config (random weights), or ``pretrained`` to continue from."""

    architecture: str = "llama"  # a transformers model_type
    config: dict[str, Any] = field(default_factory=dict)  # its config fields
    pretrained: str | None = None  # instead of architecture + config
    tokenizer: str | None = None  # a tokenizer directory; None: train one on the sources
    vocab_size: int = 2000  # of a trained tokenizer
    max_length: int = 512  # tokens per text, EOS included
    seed: int = 0


class CausalLMObjective(Objective):
    """Next-token prediction on text; each text ends with the tokenizer's EOS token and is cut
    to ``max_length`` tokens."""

    name = "causal-lm"
    Model = CausalLMModel
    dataset = TextDataset
    terms = ("text",)
    units = ("tokens",)
    throughput_unit = "tokens"

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int) -> None:
        super().__init__(model)
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("language-model pretraining needs a tokenizer with EOS and pad tokens")
        self.tokenizer, self.max_length = tokenizer, max_length

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> CausalLMObjective:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from metamorph_train.data.records import check_text_record, record_text
        from metamorph_train.tokenizer import source_tokenizer

        m: CausalLMModel = recipe.model
        if m.pretrained:
            if m.config or m.tokenizer:
                raise ValueError(
                    "model.pretrained continues from a saved model with its own config and "
                    "tokenizer; drop model.config and model.tokenizer"
                )
            model = AutoModelForCausalLM.from_pretrained(m.pretrained, dtype=torch.float32)
            return cls(model, AutoTokenizer.from_pretrained(m.pretrained), m.max_length)
        tokenizer = source_tokenizer(
            m.tokenizer,
            Path(recipe.train.output_dir) / "tokenizer",
            recipe.data.sources,
            m.vocab_size,
            check_text_record,
            record_text,
        )
        fields = {
            "vocab_size": len(tokenizer),
            "max_position_embeddings": m.max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **m.config,
        }
        try:
            config = AutoConfig.for_model(m.architecture, **fields)
        except ValueError as e:
            raise ValueError(f"recipe key 'model.architecture': {e}") from e
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(m.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        return cls(model, tokenizer, m.max_length)

    def batch(self, items: list[str], seed: int) -> dict[str, Any]:
        tok = self.tokenizer
        rows = []
        for text in items:
            ids = tok(text, add_special_tokens=True)["input_ids"][: self.max_length - 1]
            rows.append([*ids, tok.eos_token_id])
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        device = self.device()
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": mask.to(device),
            "labels": labels.to(device),
        }

    def counts(self, batch: dict[str, Any]) -> list[float]:
        return [float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())]

    def loss_sums(self, call: Any, batch: dict[str, Any]) -> list[torch.Tensor]:
        logits = call(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        return [
            F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        ]

    def throughput(self, batch: dict[str, Any]) -> int:
        return int(batch["attention_mask"].sum())

    def shard_units(self) -> list[nn.Module]:
        return transformer_blocks(self.module)

    def enable_gradient_checkpointing(self, every: int = 1, offload: bool = False) -> None:
        checkpoint_transformers(self.module, every, offload)

    def save(self, path: Path) -> Path:
        from metamorph_core.checkpoint import atomic_directory

        with atomic_directory(Path(path), self.module.config.model_type) as tmp:
            self.module.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
        return Path(path)
