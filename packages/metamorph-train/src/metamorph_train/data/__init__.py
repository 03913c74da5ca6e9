"""Training data: LLaVA-style records, images under a data root, task builders, streaming
sharded sources and mixtures."""

from metamorph_train.data.dataset import (
    ConversationDataset,
    ErrorCounts,
    ImageDataset,
    ImageItem,
    PairDataset,
    RecordDataset,
    TextDataset,
)
from metamorph_train.data.images import ImageRoot
from metamorph_train.data.mixture import Mixture
from metamorph_train.data.records import read_records
from metamorph_train.data.stream import ShardedJsonl

__all__ = [
    "ConversationDataset",
    "ErrorCounts",
    "ImageDataset",
    "ImageItem",
    "ImageRoot",
    "Mixture",
    "PairDataset",
    "RecordDataset",
    "ShardedJsonl",
    "TextDataset",
    "read_records",
]
