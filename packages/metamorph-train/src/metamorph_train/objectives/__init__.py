"""Training objectives: what the trainer optimises (:class:`Objective`), registered as
plugins of kind ``objective`` and named by a recipe's ``objective:`` section.

- ``vpit`` (:class:`VPiTObjective`): a :class:`~metamorph_core.MetaMorphModel`, text +
  visual loss, with a named trainable policy (``full``, ``projector``, ``lora``).
- ``decoder`` (:class:`DecoderObjective`): a visual decoder learning to draw from tokens.
- ``siglip`` (:class:`SiglipObjective`): SigLIP sigmoid-loss pretraining of a small encoder.
- ``causal-lm`` (:class:`CausalLMObjective`): text-only causal-LM pretraining.
"""

from metamorph_train.objectives.base import NoOptions, Objective
from metamorph_train.objectives.causal_lm import CausalLMModel, CausalLMObjective
from metamorph_train.objectives.decoder import (
    DecoderLoss,
    DecoderModel,
    DecoderObjective,
    DecoderOptions,
)
from metamorph_train.objectives.siglip import SiglipModel, SiglipObjective
from metamorph_train.objectives.vpit import POLICIES, Policy, VPiTObjective, VPiTOptions

__all__ = [
    "POLICIES",
    "CausalLMModel",
    "CausalLMObjective",
    "DecoderLoss",
    "DecoderModel",
    "DecoderObjective",
    "DecoderOptions",
    "NoOptions",
    "Objective",
    "Policy",
    "SiglipModel",
    "SiglipObjective",
    "VPiTObjective",
    "VPiTOptions",
]
