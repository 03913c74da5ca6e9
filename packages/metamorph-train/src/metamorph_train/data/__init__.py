"""Training data: LLaVA-style records, images under a data root, task builders, streaming
sources (sharded JSONL, webdataset tar shards, parquet, Hugging Face datasets: one record
schema, exact resume; :mod:`metamorph_train.data.sources`) and mixtures."""

from metamorph_train.data.dataset import (
    ConversationDataset,
    ErrorCounts,
    ImageDataset,
    ImageItem,
    PairDataset,
    RecordDataset,
    TextDataset,
)
from metamorph_train.data.formats import FORMATS, open_stream
from metamorph_train.data.hf_source import HFStream
from metamorph_train.data.images import ImageRoot
from metamorph_train.data.mixture import Mixture
from metamorph_train.data.parquet_source import ParquetStream
from metamorph_train.data.records import read_records
from metamorph_train.data.sources import ImageBytes
from metamorph_train.data.stream import ShardedJsonl
from metamorph_train.data.webdataset_source import WebDatasetStream

__all__ = [
    "FORMATS",
    "ConversationDataset",
    "ErrorCounts",
    "HFStream",
    "ImageBytes",
    "ImageDataset",
    "ImageItem",
    "ImageRoot",
    "Mixture",
    "PairDataset",
    "ParquetStream",
    "RecordDataset",
    "ShardedJsonl",
    "TextDataset",
    "WebDatasetStream",
    "open_stream",
    "read_records",
]
