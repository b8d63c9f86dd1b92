"""Corpora -> token caches -> training windows: reading, tokenizing, caching, splitting, loading.

- `reading`: which files an input names; the documents of .jsonl(.gz) and .txt(.gz) files.
- `tokenizer`: the character tokenizer (HF tokenizer.json) and the vectorised encoder that matches it.
- `cache`: one token cache per file, written while reading, opened memory-mapped.
- `windows`: training windows over the caches; the sampler and loader that resume mid-epoch.
- `datamodule`: LMDataModule (train / validation / test) from the `data` config (a DataConfig).
- `config`: DataConfig, the `data` keys and the checks of the files they name.

Names are imported from their module when first used (PEP 562): reading and tokenizing (the worker processes
that tokenize files, the benchmark, generation's text conversion) do not import torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Every public name, once: the module it lives in -> its names. `__all__` and the lazy import are made from it.
_NAMES = {
    "cache": ("CacheEntry", "TokenFile", "document_hashes", "load_or_tokenize", "open_caches", "tokenize_files"),
    "config": ("DataConfig",),
    "datamodule": ("LMDataModule", "default_tokenizer_path", "validation_masks"),
    "reading": ("CONVERSIONS", "ReadReport", "TextSource", "document_chunks", "input_files", "input_problems",
                "iter_documents", "make_converter"),
    "tokenizer": ("SPECIAL_TOKENS", "FastEncoder", "load_tokenizer", "save_tokenizer", "special_ids", "text_symbols",
                  "tokenizer_fingerprint", "train_tokenizer", "train_tokenizer_from_counts"),
    "windows": ("EpochShuffleSampler", "ResumableDataLoader", "WindowDataset"),
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'lingmao.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"lingmao.data.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # editors and type checkers read the submodules' own `__all__` through these star imports
    from lingmao.data.cache import *  # noqa: F403
    from lingmao.data.config import *  # noqa: F403
    from lingmao.data.datamodule import *  # noqa: F403
    from lingmao.data.reading import *  # noqa: F403
    from lingmao.data.tokenizer import *  # noqa: F403
    from lingmao.data.windows import *  # noqa: F403
