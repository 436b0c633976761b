"""Offline corpora, the project tokenizer, token shards and batch loaders (docs/data.md)."""

from engramlm.data.build import parse_source, prepare, summary
from engramlm.data.corpora import Document, SourceSpec, load_corpus
from engramlm.data.dataset import TokenDataset
from engramlm.data.loader import BatchLoader, EvalLoader
from engramlm.data.manifest import Manifest
from engramlm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_tokenizer, train_tokenizer

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "BatchLoader",
    "Document",
    "EvalLoader",
    "Manifest",
    "SourceSpec",
    "TokenDataset",
    "load_corpus",
    "load_tokenizer",
    "parse_source",
    "prepare",
    "summary",
    "train_tokenizer",
]
