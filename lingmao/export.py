"""Final weights + model config + tokenizer in one folder, and loading them back without Hydra."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors
from tokenizers import Tokenizer

from lingmao.errors import LingmaoError
from lingmao.model import SimpleTransformer
from lingmao.module import MODEL_KEYS, build_model
from lingmao.tokenizer import load_tokenizer

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


def export_model(
    directory: str | Path, model: SimpleTransformer, tokenizer: Tokenizer, model_cfg: dict[str, Any],
    data_cfg: dict[str, Any] | None = None,
) -> Path:
    """Write `directory/{model.safetensors, config.json, tokenizer.json}`.

    The folder is built beside the target and swapped in at the end, so a failure never leaves a
    half-written export in place of the previous one.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    data_cfg = data_cfg or {}
    config = {
        "format": "lingmao-1",
        "vocab_size": model.vocab_size,
        "model": {k: model_cfg[k] for k in MODEL_KEYS if k in model_cfg},
        "data": {k: data_cfg.get(k) for k in ("context_length", "text_key", "template", "convert")},
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_safetensors(_unwrap(model), str(staging / WEIGHTS))
        (staging / CONFIG).write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        tokenizer.save(str(staging / TOKENIZER))
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        staging.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module


@dataclass
class LingmaoModel:
    """An exported model, ready to use: `.model` (eval mode), `.tokenizer`, `.config`."""

    model: SimpleTransformer
    tokenizer: Tokenizer
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> LingmaoModel:
        self.model.to(device)
        return self


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> LingmaoModel:
    """Load what `export_model` wrote."""
    directory = Path(directory)
    if not (directory / CONFIG).is_file():
        raise LingmaoError(f"{directory}: not an exported lingmao model (no {CONFIG})")
    try:
        config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
        vocab_size = int(config["vocab_size"])
        model_cfg = config["model"]
    except (ValueError, KeyError) as exc:
        raise LingmaoError(f"{directory / CONFIG}: damaged model config ({exc})") from None
    tokenizer = load_tokenizer(directory / TOKENIZER)
    if tokenizer.get_vocab_size() != vocab_size:
        raise LingmaoError(
            f"{directory}: tokenizer has {tokenizer.get_vocab_size()} tokens but the model was trained with {vocab_size}"
        )
    model = build_model(vocab_size, model_cfg)
    try:
        load_safetensors(model, str(directory / WEIGHTS), strict=True, device=str(device))
    except (OSError, RuntimeError, FileNotFoundError) as exc:
        first = str(exc).splitlines()[0]
        raise LingmaoError(f"{directory / WEIGHTS}: cannot load the weights ({first})") from None
    model.to(device).eval()
    return LingmaoModel(model, tokenizer, config)
