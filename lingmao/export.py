"""Final weights + model config + tokenizer in one folder, and loading them back without Hydra."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors
from tokenizers import Tokenizer

from lingmao.data.tokenizer import load_tokenizer
from lingmao.errors import LingmaoError
from lingmao.model import SimpleTransformer
from lingmao.module import MODEL_KEYS, build_model

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
        "data": {k: data_cfg.get(k) for k in ("context_length", "text_key", "template", "convert", "txt_mode")},
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    old = directory.with_name(f".{directory.name}.old")
    try:
        save_safetensors(_unwrap(model), str(staging / WEIGHTS))
        (staging / CONFIG).write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        tokenizer.save(str(staging / TOKENIZER))
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        staging.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not directory.exists():
            old.rename(directory)  # the previous export goes back in place
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

    def generate(self, prompt: str = "", **options: Any) -> list[str]:
        """Sample text; returns `num_samples` strings, each the prompt followed by the generated text.

        Options (see `lingmao.sampling.generate`): form (wujue, qijue, wulv, qilv), acrostic, rhyme,
        title, temperature (0 = greedy), top_k, top_p, repetition_penalty, max_new_tokens (free
        text only: a form fixes the length), num_samples, seed, convert, context_length, stream.
        """
        from lingmao.sampling import generate  # lazy: sampling imports data and forms

        return generate(self, prompt, **options)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, tokenizer: str | Path | None = None, device: str | torch.device = "cpu"
    ) -> LingmaoModel:
        """Load a Lightning checkpoint of `lingmao.module.LingmaoLM` (a `.ckpt` of a training run).

        The tokenizer is `tokenizer`, else the first `tokenizer.json` found beside the checkpoint, in
        its run directory or in the run's `export/` folder. The data settings (context length,
        template, conversion) come from the run's exported `config.json` when there is one.
        Checkpoints are pickles: load only your own.
        """
        path = Path(path)
        if not path.is_file():
            raise LingmaoError(f"{path}: checkpoint not found")
        run_dirs = [path.parent, path.parent.parent, path.parent.parent / "export"]
        if tokenizer is None:
            found = [d / TOKENIZER for d in run_dirs if (d / TOKENIZER).is_file()]
            if not found:
                raise LingmaoError(
                    f"{path}: no {TOKENIZER} beside the checkpoint or in its run directory; pass tokenizer=PATH"
                )
            tokenizer = found[0]
        tok = load_tokenizer(tokenizer)
        try:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
            hparams = ckpt["hyper_parameters"]
            vocab_size, model_cfg = int(hparams["vocab_size"]), dict(hparams["model"])
            state = ckpt["state_dict"]
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError) as exc:
            raise LingmaoError(f"{path}: not a lingmao training checkpoint ({str(exc).splitlines()[0]})") from None
        if tok.get_vocab_size() != vocab_size:
            raise LingmaoError(
                f"{tokenizer}: tokenizer has {tok.get_vocab_size()} tokens but the checkpoint was trained with "
                f"{vocab_size}; pass the run's tokenizer=PATH"
            )
        weights = {}
        for key, value in state.items():
            if key.startswith("model."):
                weights[key[len("model."):].replace("_orig_mod.", "", 1)] = value
        model = build_model(vocab_size, model_cfg)
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise LingmaoError(f"{path}: cannot load the weights ({str(exc).splitlines()[0]})") from None
        model.to(device).eval()
        config: dict[str, Any] = {"vocab_size": vocab_size, "model": model_cfg, "data": {}}
        for d in run_dirs:
            if (d / CONFIG).is_file():
                try:
                    config["data"] = json.loads((d / CONFIG).read_text(encoding="utf-8")).get("data") or {}
                except ValueError:
                    pass
                break
        return cls(model, tok, config)


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> LingmaoModel:
    """Load what `export_model` wrote."""
    directory = Path(directory)
    if not (directory / CONFIG).is_file():
        raise LingmaoError(f"{directory}: not an exported lingmao model (no {CONFIG})")
    try:
        config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
        vocab_size = int(config["vocab_size"])
        model_cfg = dict(config["model"])
    except (ValueError, KeyError, TypeError) as exc:
        raise LingmaoError(f"{directory / CONFIG}: damaged model config ({exc})") from None
    tokenizer = load_tokenizer(directory / TOKENIZER)
    if tokenizer.get_vocab_size() != vocab_size:
        raise LingmaoError(
            f"{directory}: tokenizer has {tokenizer.get_vocab_size()} tokens "
            f"but the model was trained with {vocab_size}"
        )
    try:
        model = build_model(vocab_size, model_cfg)
    except (TypeError, ValueError) as exc:
        raise LingmaoError(f"{directory / CONFIG}: damaged model config ({exc})") from None
    try:
        load_safetensors(model, str(directory / WEIGHTS), strict=True, device=str(device))
    except (OSError, RuntimeError, SafetensorError) as exc:
        first = str(exc).splitlines()[0]
        raise LingmaoError(f"{directory / WEIGHTS}: cannot load the weights ({first})") from None
    model.to(device).eval()
    return LingmaoModel(model, tokenizer, config)
