"""Corpora -> token caches -> training windows: reading, tokenizing, caching, splitting, loading.

- `reading`: which files an input names; the documents of .jsonl(.gz) and .txt(.gz) files.
- `tokenizer`: the character tokenizer (HF tokenizer.json) and the vectorised encoder that matches it.
- `cache`: one token cache per file, written while reading, opened memory-mapped.
- `windows`: training windows over the caches; the sampler and loader that resume mid-epoch.
- `datamodule`: LMDataModule (train / validation / test), `build_datamodule` from the `data` config.
- `config`: DataConfig, the `data` keys and the checks of the files they name.

Names are imported from their module when first used (PEP 562): reading and tokenizing (the worker processes
that tokenize files, the benchmark, generation's text conversion) do not import torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_MODULE_OF = {
    "CacheEntry": "cache", "TokenFile": "cache", "document_hashes": "cache", "load_or_tokenize": "cache",
    "open_caches": "cache", "tokenize_files": "cache",
    "DataConfig": "config",
    "LMDataModule": "datamodule", "build_datamodule": "datamodule", "default_tokenizer_path": "datamodule",
    "validation_masks": "datamodule",
    "CONVERSIONS": "reading", "ReadReport": "reading", "TextSource": "reading", "document_chunks": "reading",
    "input_files": "reading", "input_problems": "reading", "iter_documents": "reading", "make_converter": "reading",
    "SPECIAL_TOKENS": "tokenizer", "FastEncoder": "tokenizer", "load_tokenizer": "tokenizer",
    "save_tokenizer": "tokenizer", "special_ids": "tokenizer", "text_symbols": "tokenizer",
    "tokenizer_fingerprint": "tokenizer", "train_tokenizer": "tokenizer", "train_tokenizer_from_counts": "tokenizer",
    "EpochShuffleSampler": "windows", "ResumableDataLoader": "windows", "WindowDataset": "windows",
}
__all__ = [
    "CONVERSIONS", "SPECIAL_TOKENS", "CacheEntry", "DataConfig", "EpochShuffleSampler", "FastEncoder",
    "LMDataModule", "ReadReport", "ResumableDataLoader", "TextSource", "TokenFile", "WindowDataset",
    "build_datamodule", "default_tokenizer_path", "document_chunks", "document_hashes", "input_files",
    "input_problems", "iter_documents", "load_or_tokenize", "load_tokenizer", "make_converter", "open_caches",
    "save_tokenizer", "special_ids", "text_symbols", "tokenize_files", "tokenizer_fingerprint", "train_tokenizer",
    "train_tokenizer_from_counts", "validation_masks",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'lingmao.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"lingmao.data.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # type checkers and editors see the same names, imported at once
    from lingmao.data.cache import (
        CacheEntry,
        TokenFile,
        document_hashes,
        load_or_tokenize,
        open_caches,
        tokenize_files,
    )
    from lingmao.data.config import DataConfig
    from lingmao.data.datamodule import LMDataModule, build_datamodule, default_tokenizer_path, validation_masks
    from lingmao.data.reading import (
        CONVERSIONS,
        ReadReport,
        TextSource,
        document_chunks,
        input_files,
        input_problems,
        iter_documents,
        make_converter,
    )
    from lingmao.data.tokenizer import (
        SPECIAL_TOKENS,
        FastEncoder,
        load_tokenizer,
        save_tokenizer,
        special_ids,
        text_symbols,
        tokenizer_fingerprint,
        train_tokenizer,
        train_tokenizer_from_counts,
    )
    from lingmao.data.windows import EpochShuffleSampler, ResumableDataLoader, WindowDataset
