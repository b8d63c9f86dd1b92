"""lingmao (灵猫墨韵): train, resume, sweep and sample language models of classical Chinese.

The names below are imported on first use, so `import lingmao`, `lingmao.load_model(...)` and generation
need torch, tokenizers and safetensors only; Lightning and Hydra are loaded when training starts.
"""

from __future__ import annotations

import importlib
from typing import Any

from lingmao.errors import LingmaoError

__version__ = "0.2.0"

_LAZY = {
    "LingmaoModel": "lingmao.export", "export_model": "lingmao.export", "load_model": "lingmao.export",
    "ModelConfig": "lingmao.model", "GPT": "lingmao.model", "SimpleTransformer": "lingmao.model",
    "PositionalEncoding": "lingmao.model", "build_model": "lingmao.model", "train_model": "lingmao.api",
}
__all__ = ["LingmaoError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lingmao' has no attribute {name!r}")
