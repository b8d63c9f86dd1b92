"""Bits per character of texts scored one document at a time, the header's tokens left out of the count.

`text_bits` scores `<bos> [header] text <eos>` for each document and sums the bits of the text's tokens and of
`<eos>` (what predicts the text), over the text's characters: the header conditions the prediction but is not
predicted. So a model with a header, the same model without one (`<bos> <body> text <eos>`) and a model trained
without headers (`<bos> text <eos>`) are scored on exactly the same targets (`scripts/bench_condition.py`,
`scripts/bench_finetune.py`). A document longer than the context is scored in windows that overlap by half
a context, each token once, with as much preceding context as the window holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lingmao.data.condition import BODY_MARK, Conditioning, model_conditioning
from lingmao.data.reading import TextSource
from lingmao.data.tokenizer import FastEncoder, special_ids
from lingmao.errors import LingmaoError


@dataclass
class Score:
    bits: float
    characters: int
    documents: int

    @property
    def bits_per_char(self) -> float:
        return self.bits / self.characters if self.characters else math.nan


def documents_of(lm: Any, path: str | Path, header: str = "full") -> list[str]:
    """The documents of a JSONL file as the model reads them. header: 'full' (every field the model was
    conditioned on, no dropout), 'none' (an empty header), or one field name ('title', 'author', 'keywords');
    a model without conditioning gets its plain texts whatever `header` says."""
    config = lm.config or {}
    data = config.get("data") or {}
    cond = model_conditioning(config, lm.tokenizer)
    plain = TextSource(data.get("text_key") or "text", None, data.get("convert") or "none")
    if cond is None:
        return list(plain.texts(Path(path)))
    if header == "none":
        return [BODY_MARK + t for t in plain.texts(Path(path))]
    fields = cond.fields if header == "full" else (header,)
    if header != "full" and header not in cond.fields:
        raise LingmaoError(f"header={header}: the model was conditioned on {', '.join(cond.fields)}")
    if "keywords" in fields and cond.frequencies is None:
        raise LingmaoError("the model's export has no keyword statistics (an export of a run with keywords has)")
    every = Conditioning(fields, cond.keywords, 0.0, cond.frequencies, cond.documents)
    source = TextSource(data.get("text_key") or "text", None, data.get("convert") or "none", condition=every)
    return list(source.texts(Path(path)))


@torch.inference_mode()
def text_bits(lm: Any, documents: Sequence[str], batch_size: int = 16, context_length: int | None = None) -> Score:
    """The bits of the texts of `documents` (each with a header or none, as `documents_of` makes them)."""
    tok, model = lm.tokenizer, lm.model
    encoder = FastEncoder.for_tokenizer(tok)
    if encoder is None:
        raise LingmaoError("text_bits needs a character tokenizer")
    ctx = min(int(context_length or (lm.config or {}).get("data", {}).get("context_length") or model.max_len),
              model.max_len)
    headed = model_conditioning(lm.config or {}, tok) is not None
    ids, lengths = encoder.encode_batch(list(documents), headed=headed)
    body_id = tok.token_to_id("<body>")
    pad = special_ids(tok)["pad"]
    windows: list[tuple[np.ndarray, int, int]] = []  # (tokens, first scored target, targets)
    characters = 0
    offset = 0
    for doc, n in zip(documents, lengths.tolist(), strict=True):
        tokens = ids[offset : offset + n]
        offset += n
        first = 1
        if headed:
            first = int(np.flatnonzero(tokens == body_id)[0]) + 1
            characters += len(doc.partition(BODY_MARK)[2])
        else:
            characters += len(doc)
        # Targets first..n-1 (the text's tokens and <eos>); a window of ctx + 1 tokens predicts ctx of them.
        start, scored = max(0, first - ctx), first
        while scored < n:
            end = min(start + ctx + 1, n)
            windows.append((tokens[start:end], scored - start - 1, end - scored))
            scored = end
            start = max(0, end - 1 - ctx // 2)
    device = next(model.parameters()).device
    bits = 0.0
    for b in range(0, len(windows), batch_size):
        chunk = windows[b : b + batch_size]
        width = max(len(w[0]) for w in chunk) - 1
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        y = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, (tokens, at, count) in enumerate(chunk):
            t = torch.from_numpy(tokens.astype(np.int64))
            x[r, : len(t) - 1] = t[:-1]
            y[r, at : at + count] = t[at + 1 : at + 1 + count]
        logits = model(x.to(device)).float()
        nats = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.to(device).reshape(-1), ignore_index=-100,
                               reduction="sum")
        bits += float(nats) / math.log(2)
    return Score(bits, characters, len(documents))
