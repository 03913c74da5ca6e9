"""Loading checkpoints trained with the authors' research code (facebookresearch/metamorph):
:func:`convert_research_checkpoint` and the ``metamorph convert-research`` command."""

from metamorph_train.research.convert import convert_research_checkpoint

__all__ = ["convert_research_checkpoint"]
