"""`init_from=DIR`: a run that starts from a trained model's weights and tokenizer (fine-tuning).

The source is an export folder (`model.safetensors`, `tokenizer.json`, `config.json`) or a training checkpoint
(`.ckpt`, its tokenizer found as `lingmao.generate ckpt=` finds it). The run takes from it the weights, the
tokenizer and the model's shape (`model.*` keys other than dropout and compile are the source's); the optimizer,
the learning-rate schedule (warm-up included) and the data are this run's own, from step 0. A run that resumes
from its own checkpoint continues from that checkpoint as any run does.

The training data may hold characters (or header tokens of `data.condition`) that the source's tokenizer lacks:
that is a one-line error naming how many and which, unless `init_from_extend_vocab=true`, which appends them to
the vocabulary (most frequent first) and adds a row for each to every vocabulary-sized weight (embedding, output
layer): the mean of the source's rows, so a new token starts as an average token (its logit the mean logit)
rather than as noise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from lingmao.data.condition import ranked_authors
from lingmao.data.tokenizer import (
    CODE_POINTS,
    ESCAPED,
    MARKERS,
    RESERVED,
    SPECIAL_TOKENS,
    FastEncoder,
    special_ids,
)
from lingmao.errors import LingmaoError

log = logging.getLogger(__name__)

SHOWN = 20  # missing characters named in the error
FREE_KEYS = ("name", "dropout", "compile")  # model keys a fine-tuning run may set itself


def init_problem(path: Path) -> str | None:
    """Why `path` cannot be an `init_from` source (None: it can); reads no weights."""
    from lingmao.checkpointing import checkpoint_problem
    from lingmao.export import is_export

    if not path.exists():
        return f"{path}: not found (an export folder or a .ckpt checkpoint)"
    if path.is_dir():
        if is_export(path):
            return None
        if (path / "export").is_dir() and is_export(path / "export"):
            return f"{path}: a run folder; give its export, init_from={path / 'export'}"
        return f"{path}: not an exported lingmao model (no config.json with a model); give an export or a .ckpt"
    return checkpoint_problem(path)


@dataclass
class InitSource:
    """The weights, tokenizer and model settings a run starts from."""

    path: Path
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    model: dict[str, Any]
    config: dict[str, Any]
    lines: Any = None  # the source's training lines (`lingmao.verse.lines.LineSet`), if its export kept them

    @classmethod
    def load(cls, path: str | Path) -> InitSource:
        from lingmao.export import LingmaoModel, load_model

        path = Path(path)
        problem = init_problem(path)
        if problem:
            raise LingmaoError(f"init_from: {problem}")
        lm = load_model(path) if path.is_dir() else LingmaoModel.from_checkpoint(path)
        weights = {k: v.detach() for k, v in lm.model.state_dict().items()}  # lm goes; load_into copies them
        return cls(path, weights, lm.tokenizer, dict(lm.config["model"]), dict(lm.config), lm.lines)

    def model_config(self, run_model: Any) -> Any:
        """This run's ModelConfig: the source's shape, this run's dropout and compile."""
        from lingmao.export import model_config_from_dict

        values = dict(self.model)
        for key in FREE_KEYS:
            values[key] = getattr(run_model, key)
        changed = [f"model.{k}" for k, v in dataclasses.asdict(run_model).items()
                   if k not in FREE_KEYS and k in self.model and self.model[k] != v]
        if changed:
            log.info("init_from: the model's shape is the source's (%s as in %s)", ", ".join(changed), self.path)
        return model_config_from_dict(values)

    def with_source_authors(self, record: dict[str, Any] | None) -> dict[str, Any] | None:
        """This run's conditioning record (`LMDataModule.condition_record`) with the source's authors added to its
        own, poems counted together: a fine-tuned model still knows every poet its source was conditioned on."""
        source = (self.config.get("condition") or {}).get("authors") or {}
        if not record or "authors" not in record or not source:
            return record
        counts = Counter(source)
        counts.update(record["authors"])
        return {**record, "authors": ranked_authors(counts)}

    # -- vocabulary ----------------------------------------------------------------------------------
    def tokenizer_for(self, counts: np.ndarray, extend: bool) -> tuple[Tokenizer, int]:
        """(tokenizer, rows added): the source's, extended by the symbols of `counts` it lacks when `extend`;
        otherwise a LingmaoError names them."""
        missing = missing_tokens(self.tokenizer, counts)
        if not missing:
            return self.tokenizer, 0
        if not extend:
            shown = " ".join(repr(t)[1:-1] if len(t) == 1 else t for t in missing[:SHOWN])
            more = f" (first {SHOWN} shown)" if len(missing) > SHOWN else ""
            raise LingmaoError(
                f"init_from: the tokenizer of {self.path} lacks {len(missing)} of the training data's tokens: "
                f"{shown}{more}; add init_from_extend_vocab=true to add them (new rows of the embedding and "
                "output layer)"
            )
        log.info("init_from: %d new tokens added to the vocabulary of %s: %s%s", len(missing), self.path,
                 " ".join(missing[:SHOWN]), " ..." if len(missing) > SHOWN else "")
        return extend_tokenizer(self.tokenizer, missing), len(missing)

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the source's weights into `model` (of the same shape, or with more vocabulary rows)."""
        target = model.state_dict()
        new_state = {}
        for key, value in target.items():
            source = self.weights.get(key)
            if source is None:
                raise LingmaoError(f"init_from: {self.path} has no weight {key}")
            if source.shape == value.shape:
                new_state[key] = source
            elif source.dim() >= 1 and source.shape[1:] == value.shape[1:] and source.shape[0] < value.shape[0]:
                extra = source.float().mean(0, keepdim=True).to(source.dtype).expand(
                    value.shape[0] - source.shape[0], *source.shape[1:])
                new_state[key] = torch.cat([source, extra])
            else:
                raise LingmaoError(f"init_from: {key} of {self.path} has shape {tuple(source.shape)}, the model "
                                   f"{tuple(value.shape)}")
        model.load_state_dict(new_state, strict=True)
        log.info("initialized from %s (a fresh optimizer and learning-rate schedule)", self.path)


def start_from(conf: Any, dm: Any) -> InitSource:
    """Set a run up to start from `conf.init_from`: the data module takes the source's tokenizer (extended when
    `init_from_extend_vocab`) and keyword statistics, `conf.model` the source's shape. The caller builds the
    model and calls `load_into` on it."""
    from lingmao.config import check_context

    init = InitSource.load(conf.init_from)
    dm.use_keyword_statistics(init.config.get("condition"))
    tokenizer, _ = init.tokenizer_for(dm.symbol_counts("train"), conf.init_from_extend_vocab)
    dm.use_tokenizer(tokenizer)
    conf.model = init.model_config(conf.model)
    check_context(conf)
    return init


def missing_tokens(tok: Tokenizer, counts: np.ndarray) -> list[str]:
    """The tokens (characters, or reserved tokens of a header) that symbols with `counts` > 0 need and `tok`
    lacks, most frequent first (ties by code point)."""
    encoder = FastEncoder.for_tokenizer(tok)
    if encoder is None:
        raise LingmaoError("init_from: the source's tokenizer is not a character tokenizer of lingmao's")
    counts = np.asarray(counts)
    unk = special_ids(tok)["unk"]
    found = np.flatnonzero((counts > 0) & (encoder.table[: len(counts)] == unk))
    unk_marker = MARKERS + SPECIAL_TOKENS.index("<unk>")
    found = found[found != unk_marker]
    found = found[np.lexsort((found, -counts[found]))]
    out = []
    for symbol in found.tolist():
        if MARKERS <= symbol < MARKERS + len(RESERVED):
            out.append(RESERVED[symbol - MARKERS])
        elif symbol >= ESCAPED:
            out.append(chr(MARKERS + symbol - ESCAPED))
        elif symbol < CODE_POINTS:
            out.append(chr(symbol))
    return list(dict.fromkeys(out))


def extend_tokenizer(tok: Tokenizer, tokens: list[str]) -> Tokenizer:
    """`tok` with `tokens` appended to its vocabulary (ids from its size on); everything else as it was."""
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    next_id = max(vocab.values()) + 1
    for token in tokens:
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
