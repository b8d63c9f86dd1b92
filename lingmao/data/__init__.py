"""Corpora -> token caches -> training windows: reading, tokenizing, caching, splitting, loading.

- `reading`: which files an input names; the documents of .jsonl(.gz) and .txt(.gz) files.
- `tokenizer`: the character tokenizer (HF tokenizer.json) and the vectorised encoder that matches it.
- `cache`: one token cache per file, written while reading, opened memory-mapped.
- `windows`: training windows over the caches; the sampler and loader that resume mid-epoch.
- `datamodule`: LMDataModule (train / validation / test), `build_datamodule` from the `data` config.
- `config`: DataConfig, the `data` keys and the checks of the files they name.
"""

from lingmao.data.cache import CacheEntry, TokenFile, document_hashes, load_or_tokenize, open_caches, tokenize_files
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

__all__ = [
    "CONVERSIONS", "SPECIAL_TOKENS", "CacheEntry", "DataConfig", "EpochShuffleSampler", "FastEncoder",
    "LMDataModule", "ReadReport", "ResumableDataLoader", "TextSource", "TokenFile", "WindowDataset",
    "build_datamodule", "default_tokenizer_path", "document_chunks", "document_hashes", "input_files",
    "input_problems", "iter_documents", "load_or_tokenize", "load_tokenizer", "make_converter", "open_caches",
    "save_tokenizer", "special_ids", "text_symbols", "tokenize_files", "tokenizer_fingerprint", "train_tokenizer",
    "train_tokenizer_from_counts", "validation_masks",
]
