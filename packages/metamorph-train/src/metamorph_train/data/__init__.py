"""Training data: LLaVA-style records, images under a data root, task builders and mixtures."""

from metamorph_train.data.dataset import ConversationDataset, ErrorCounts
from metamorph_train.data.images import ImageRoot
from metamorph_train.data.mixture import Mixture
from metamorph_train.data.records import read_records

__all__ = ["ConversationDataset", "ErrorCounts", "ImageRoot", "Mixture", "read_records"]
