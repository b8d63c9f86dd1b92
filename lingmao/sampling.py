"""Autoregressive sampling: temperature, top-k, top-p, repetition penalty, constrained verse forms.

A model with a KV cache (`new_cache`, the gpt architecture) runs the prompt once and then one token per
step; any other model runs again on its whole context at every step. Both follow one rule for text
longer than the context window (`context_start`). All samples of one call run as one batch; they share
the prompt, so no padding is needed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import torch

from lingmao.data import make_converter
from lingmao.data.condition import check_author, model_conditioning
from lingmao.data.tokenizer import FastEncoder, header_ids, special_ids
from lingmao.errors import LingmaoError
from lingmao.verse.forms import FormConstraint, normalize_form, normalize_pattern, normalize_rhyme, normalize_tones
from lingmao.verse.keywords import KeywordConstraint, normalize_keywords
from lingmao.verse.vocab import vocab_tables

log = logging.getLogger(__name__)

StepMask = Callable[[int, torch.Tensor], torch.Tensor]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) -> cuda, else mps, else cpu; an explicit device must exist on this machine."""
    from lingmao.hardware import available_accelerators, best_accelerator

    if isinstance(device, torch.device):
        return device
    name = str(device or "auto")
    if name == "auto":
        return torch.device(best_accelerator())
    have = available_accelerators()
    kind = name.split(":", 1)[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise LingmaoError(f"device: '{name}' is not one of auto, cpu, cuda, mps")
    if kind not in have:
        raise LingmaoError(f"device={name}: not available on this machine (available: {', '.join(have)})")
    return torch.device(name)


def check_options(
    temperature: float, top_k: int | None, top_p: float, repetition_penalty: float, max_new_tokens: int,
    num_samples: int,
) -> None:
    """Bad sampling options are user errors (one line), not tracebacks from inside torch."""
    if temperature is None or temperature < 0:
        raise LingmaoError(f"temperature: {temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 0:
        raise LingmaoError(f"top_k: {top_k} must be >= 0 (0 = off)")
    if top_p is None or not 0 < top_p <= 1:
        raise LingmaoError(f"top_p: {top_p} must be in (0, 1] (1 = off)")
    if repetition_penalty is None or repetition_penalty <= 0:
        raise LingmaoError(f"repetition_penalty: {repetition_penalty} must be > 0 (1 = off)")
    if max_new_tokens is None or max_new_tokens < 0:
        raise LingmaoError(f"max_new_tokens: {max_new_tokens} must be >= 0")
    if num_samples is None or num_samples < 1:
        raise LingmaoError(f"num_samples: {num_samples} must be >= 1")


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Keep the `top_k` best tokens and the smallest set whose probability reaches `top_p` (-inf elsewhere)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked before it already reach top_p (the best one always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def penalize_repetition(
    logits: torch.Tensor, seq: torch.Tensor, penalty: float, eligible: torch.Tensor | None = None
) -> torch.Tensor:
    """CTRL-style penalty on tokens already in `seq`: positive logits divided, negative multiplied.

    `eligible` (bool [V]) limits it to some tokens: poems repeat punctuation and newlines by design.
    """
    if penalty == 1.0:
        return logits
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, seq, True)
    if eligible is not None:
        seen &= eligible
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def context_start(length: int, start: int, window: int) -> int:
    """Where the context begins for predicting token number `length`, when it began at `start` before.

    The context grows until it holds `window` tokens; when one more arrives, it restarts from the last
    `window // 2` tokens (at least one) and grows again. With a KV cache that restart is one prefill of
    half a window every half window of new tokens, instead of a full recomputation at every step; the
    uncached path follows the same rule, so both see the same context and sample the same text.
    """
    if length - start <= window:
        return start
    return length - max(1, window // 2)


@torch.inference_mode()
def sample_ids(
    model: torch.nn.Module,
    prompt_ids: list[int],
    *,
    eos_id: int,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    penalty_tokens: torch.Tensor | None = None,
    banned: list[int] | None = None,
    step_mask: StepMask | None = None,
    context_length: int | None = None,
    seed: int | None = None,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Sample `num_samples` continuations of `prompt_ids` in one batch; each stops at `eos_id`.

    `step_mask(step, generated[B, step]) -> bool[B, V]` restricts each step to the allowed tokens
    (constrained decoding); `banned` tokens are never sampled. `on_step(tokens[B], active[B])` sees
    each step's tokens (for streaming). The model sees at most `context_length` tokens (see
    `context_start`); `use_cache=False` recomputes the context at every step even when the model has a
    KV cache. Returns the new token ids of each sample, without `<eos>`.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least <bos>")
    device = next(model.parameters()).device
    window = min(context_length or model.max_len, model.max_len)
    seq = torch.tensor(prompt_ids, dtype=torch.long, device=device).unsqueeze(0).repeat(num_samples, 1)
    start = seq.size(1)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
    active = torch.ones(num_samples, dtype=torch.bool, device=device)
    ban = None
    if banned:
        ban = torch.zeros(model.vocab_size, dtype=torch.bool, device=device)
        ban[torch.tensor(banned, device=device)] = True
    eligible = penalty_tokens.to(device) if penalty_tokens is not None else None
    cache = model.new_cache(num_samples, window) if use_cache and hasattr(model, "new_cache") else None
    context = 0  # where the model's context begins in seq
    for step in range(max_new_tokens):
        moved = context_start(seq.size(1), context, window)
        if cache is None:
            logits = model(seq[:, moved:])
        elif step == 0 or moved != context:  # (re)fill the cache with the whole context
            cache.clear()
            logits = model(seq[:, moved:], cache=cache)
        else:
            logits = model(seq[:, -1:], cache=cache)
        context = moved
        logits = logits[:, -1, :].float()
        logits = penalize_repetition(logits, seq, repetition_penalty, eligible)
        if ban is not None:
            logits = logits.masked_fill(ban, float("-inf"))
        if step_mask is not None:
            logits = logits.masked_fill(~step_mask(step, seq[:, start:]), float("-inf"))
        if temperature == 0:
            next_ids = torch.argmax(logits, dim=-1)
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        next_ids = torch.where(active, next_ids, torch.full_like(next_ids, eos_id))
        seq = torch.cat([seq, next_ids.unsqueeze(1)], dim=1)
        if on_step is not None:
            on_step(next_ids, active)
        active &= next_ids != eos_id
        if not bool(active.any()):
            break
    out = []
    for row in seq[:, start:].tolist():
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


def generate(
    lm: Any,
    prompt: str = "",
    *,
    form: str | None = None,
    tune: str | None = None,
    acrostic: str | None = None,
    rhyme: str | bool | None = None,
    tones: str | None = None,
    pattern: str | None = "auto",
    first_line_rhymes: bool | None = None,
    title: str | None = None,
    author: str | None = None,
    keywords: str | list[str] | None = None,
    enforce_keywords: bool = False,
    temperature: float = 0.8,
    top_k: int | None = 0,
    top_p: float = 0.9,
    repetition_penalty: float = 1.0,
    max_new_tokens: int = 200,
    num_samples: int = 1,
    seed: int | None = None,
    convert: str | None = None,
    context_length: int | None = None,
    stream: Callable[[str], None] | None = None,
    on_token: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Generate text with a loaded model (`lingmao.load_model(dir)`); see `LingmaoModel.generate`.

    Each result is the prompt followed by what was generated (for a form: the whole poem). The title
    is not part of the result. A model trained with `data.condition` starts from a header of the title, author
    and keywords given (`lingmao.data.condition`); `enforce_keywords=True` makes each keyword appear in every
    sample (`lingmao.verse.keywords`), with any model. `stream(piece)` receives the text as it is produced
    (num_samples=1); `on_token(sample, piece)` receives each sample's, and may raise to stop the generation.
    Verse options (`lingmao.verse.forms`): form (wujue qijue wulv qilv, or ci with tune=NAME), acrostic,
    rhyme (pingshui | modern | none; None = pingshui with a form), tones (strict | lenient | off; None =
    lenient for a shi form), pattern (auto | 平起 | 仄起), first_line_rhymes (None = either).
    """
    check_options(temperature, top_k, top_p, repetition_penalty, max_new_tokens, num_samples)
    tok, model, config = lm.tokenizer, lm.model, lm.config or {}
    data_cfg = config.get("data") or {}
    convert = convert if convert is not None else (data_cfg.get("convert") or "none")
    converter = make_converter(convert) or (lambda s: s)
    prompt = converter(prompt or "")
    acrostic = converter(acrostic or "")
    if tune and form is None:
        form = "ci"
    form = normalize_form(form)
    if acrostic and form is None:
        raise LingmaoError("acrostic needs a verse form: form=wujue, qijue, wulv or qilv")
    rhyme = normalize_rhyme(rhyme, form)
    tones = normalize_tones(tones, form)
    pattern = normalize_pattern(pattern, form, tones)
    if first_line_rhymes is not None and (form is None or form == "ci"):
        raise LingmaoError("first_line_rhymes: for the shi forms (wujue, qijue, wulv, qilv) only")
    ids = special_ids(tok)
    keywords = [converter(k) for k in normalize_keywords(keywords)]
    prefix = [ids["bos"]] + _header_prefix(lm, title, author, keywords, enforce_keywords, converter)
    prompt_ids = tok.encode(prompt, add_special_tokens=False).ids if prompt else []
    unknown = sorted({ch for ch, i in zip(prompt, prompt_ids, strict=False) if i == ids["unk"]})
    if unknown:
        log.warning("prompt: %s not in the model's vocabulary (read as <unk>)", " ".join(unknown))

    constraint = None
    steps = max_new_tokens
    if form is not None:
        constraint = FormConstraint(
            tok, form, prompt, acrostic, rhyme=rhyme, tones=tones, pattern=pattern,
            first_line_rhymes=first_line_rhymes, tune=tune,
        )
        steps = constraint.steps  # the form fixes the length; max_new_tokens does not apply
    step_mask = constraint.mask if constraint is not None else None
    if enforce_keywords and keywords:
        placing = KeywordConstraint(tok, keywords, steps, constraint, prompt, ids["eos"])
        step_mask = placing.mask if constraint is None else (
            lambda step, generated: constraint.mask(step, generated) & placing.mask(step, generated))
    eligible = vocab_tables(tok).han
    pieces = [tok.id_to_token(i) or "" for i in range(tok.get_vocab_size())]

    on_step = None
    if on_token is not None or (stream is not None and num_samples == 1):
        def on_step(tokens: torch.Tensor, active: torch.Tensor) -> None:
            for i, (t, alive) in enumerate(zip(tokens.tolist(), active.tolist(), strict=True)):
                if alive and t != ids["eos"]:
                    if on_token is not None:
                        on_token(i, pieces[t])
                    if stream is not None and num_samples == 1:
                        stream(pieces[t])

    rows = sample_ids(
        model, prefix + prompt_ids, eos_id=ids["eos"], max_new_tokens=steps, num_samples=num_samples,
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        penalty_tokens=eligible, banned=[ids["pad"], ids["unk"], ids["bos"], *header_ids(tok).values()],
        step_mask=step_mask,
        context_length=context_length or data_cfg.get("context_length"), seed=seed, on_step=on_step,
    )
    return [prompt + "".join(pieces[i] for i in row) for row in rows]


def _header_prefix(lm: Any, title: str | None, author: str | None, keywords: list[str], enforce: bool,
                   converter: Callable[[str], str]) -> list[int]:
    """Token ids after `<bos>`: the conditioning header of a model trained with one, else the title as the
    model's `data.template` wrote it (or nothing)."""
    tok, config = lm.tokenizer, lm.config or {}
    cond = model_conditioning(config, tok)
    if cond is None:
        if author:
            raise LingmaoError("author: this model was not trained with authors (data.condition=[title,author,...])")
        if keywords and not enforce:
            raise LingmaoError("keywords: this model was not trained with keywords (data.condition); add "
                               "enforce_keywords=true to have them written into the text")
        return _title_prefix(tok, title, (config.get("data") or {}).get("template"), converter)
    for name, value in (("title", title), ("author", author), ("keywords", keywords)):
        if value and name not in cond.fields:
            trained = ", ".join(cond.fields) or "none"
            if name == "keywords" and enforce:
                continue  # placed by construction only
            raise LingmaoError(f"{name}: this model was conditioned on {trained} only (data.condition)")
    author = converter(author) if author else None
    authors = (config.get("condition") or {}).get("authors")
    if author and authors is not None:
        check_author(author, authors)
    header = cond.header(converter(title) if title else None, author, "".join(keywords) or None)
    encoder = FastEncoder.for_tokenizer(tok)
    if encoder is None:
        raise LingmaoError("this model's tokenizer is not a character tokenizer; it cannot take a header")
    header_tokens, _ = encoder.encode_batch([header], headed=True)
    unknown = sorted({ch for ch, i in zip(header, header_tokens[1:-1].tolist(), strict=False)
                      if i == special_ids(tok)["unk"]})
    if unknown:
        log.warning("title/keywords: %s not in the model's vocabulary (read as <unk>)", " ".join(unknown))
    return header_tokens[1:-1].tolist()


def _title_prefix(tok: Any, title: str | None, template: str | None, converter: Callable[[str], str]) -> list[int]:
    """Token ids of the part of the training template before `{text}`, filled with the title."""
    if not title:
        return []
    if not template or "{title}" not in template:
        log.warning("title: the model was not trained with titles (its data.template has no {title}); ignored")
        return []
    head = template.split("{text}", 1)[0]

    class _Fields(dict):
        def __missing__(self, key: str) -> str:
            log.warning("title: the model's template field {%s} is left empty", key)
            return ""

    try:
        text = head.format_map(_Fields(title=converter(title)))
    except (ValueError, IndexError) as exc:
        raise LingmaoError(f"data.template '{template}' of the model cannot be filled ({exc})") from None
    return tok.encode(text, add_special_tokens=False).ids
