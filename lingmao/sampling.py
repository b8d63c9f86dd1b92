"""Autoregressive sampling: temperature, top-k, top-p, repetition penalty, constrained verse forms.

A model with a KV cache (`new_cache`, the gpt architecture) runs the prompt once and then one token per
step; any other model runs again on its whole context at every step. Both follow one rule for text
longer than the context window (`context_start`). All samples of one call run as one batch; they share
the prompt, so no padding is needed. `prepare` turns options into a `lingmao.decoding.Generation` (which a
server decodes beside others), `generate` decodes one alone.
"""

from __future__ import annotations

import logging
import math
import unicodedata
from collections.abc import Callable
from typing import Any

import torch

from lingmao.data import make_converter
from lingmao.data.condition import check_author, model_conditioning
from lingmao.data.tokenizer import FastEncoder, header_ids, special_ids
from lingmao.decoding import AllowedTokens, Banned, Generation, RepetitionPenalty, StepMask, decode
from lingmao.errors import LingmaoError
from lingmao.verse.forms import FormConstraint, normalize_form, normalize_pattern, normalize_rhyme, normalize_tones
from lingmao.verse.keywords import KeywordConstraint, normalize_keywords
from lingmao.verse.lines import copy_filter
from lingmao.verse.vocab import vocab_tables

log = logging.getLogger(__name__)

# The meaningful ranges of the sampling options (beyond them the arithmetic stops meaning anything: a
# temperature of 1e-40 or a penalty of 1e40 only overflows float32).
TEMPERATURE = (0.01, 100.0)  # or 0 = greedy
REPETITION_PENALTY = (0.1, 10.0)


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
    """Bad sampling options are user errors (one line naming the range), not tracebacks from inside torch."""

    def finite(x: Any) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

    low, high = TEMPERATURE
    if not finite(temperature) or not (temperature == 0 or low <= temperature <= high):
        raise LingmaoError(f"temperature: {temperature} must be 0 (greedy) or in [{low:g}, {high:g}]")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise LingmaoError(f"top_k: {top_k} must be an integer >= 0 (0 = off)")
    if not finite(top_p) or not 0 < top_p <= 1:
        raise LingmaoError(f"top_p: {top_p} must be in (0, 1] (1 = off)")
    low, high = REPETITION_PENALTY
    if not finite(repetition_penalty) or not low <= repetition_penalty <= high:
        raise LingmaoError(f"repetition_penalty: {repetition_penalty} must be in [{low:g}, {high:g}] (1 = off)")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise LingmaoError(f"max_new_tokens: {max_new_tokens} must be an integer >= 0")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise LingmaoError(f"num_samples: {num_samples} must be an integer >= 1")


def text_problem(text: str, newlines: bool = False) -> str | None:
    """Why `text` cannot be a prompt, title or other text option, or None: a lone UTF-16 surrogate (not a
    character: nothing can encode it) or a control character (line breaks only where `newlines`)."""
    for i, ch in enumerate(text, start=1):
        kind = unicodedata.category(ch)
        if kind == "Cs":
            return f"a lone surrogate U+{ord(ch):04X} at character {i} (not valid Unicode text)"
        if kind == "Cc" and not (newlines and ch == "\n"):
            allowed = "only line breaks are allowed" if newlines else "no control characters are allowed"
            return f"control character U+{ord(ch):04X} at character {i} ({allowed})"
    return None


def check_text(name: str, text: str | None, newlines: bool = False) -> None:
    problem = text_problem(text, newlines) if text else None
    if problem:
        raise LingmaoError(f"{name}: {problem}")


_PER_TOKENIZER: dict[tuple[str, int], tuple[Any, int, Any]] = {}


def _per_tokenizer(name: str, tok: Any, make: Callable[[Any], Any]) -> Any:
    """`make(tok)`, remembered per tokenizer object and vocabulary size (tokens can only be added, which changes
    the size): what every request would otherwise pay again."""
    size = tok.get_vocab_size()
    known = _PER_TOKENIZER.get((name, id(tok)))
    if known is None or known[0] is not tok or known[1] != size:
        if len(_PER_TOKENIZER) >= 16:
            _PER_TOKENIZER.pop(next(iter(_PER_TOKENIZER)))
        known = _PER_TOKENIZER[(name, id(tok))] = (tok, size, make(tok))
    return known[2]


def token_pieces(tok: Any) -> list[str]:
    """The text of every token id (\"\" for none); reading a vocabulary of 6,000 tokens takes milliseconds."""
    def pieces_of(tok: Any) -> list[str]:
        pieces = [""] * tok.get_vocab_size()
        for piece, i in tok.get_vocab().items():
            pieces[i] = piece
        return pieces

    return _per_tokenizer("pieces", tok, pieces_of)


def sampling_rules(
    vocab_size: int, repetition_penalty: float = 1.0, penalty_tokens: torch.Tensor | None = None,
    banned: list[int] | None = None, step_mask: StepMask | None = None,
) -> list[Any]:
    """The rules of one generation, in the order they apply: repetition penalty, banned tokens, allowed tokens."""
    rules: list[Any] = []
    if repetition_penalty != 1.0:
        rules.append(RepetitionPenalty(repetition_penalty, penalty_tokens))
    if banned:
        rules.append(Banned(banned, vocab_size))
    if step_mask is not None:
        rules.append(AllowedTokens(step_mask))
    return rules


def sample_ids(
    model: torch.nn.Module,
    prompt_ids: list[int],
    *,
    repetition_penalty: float = 1.0,
    penalty_tokens: torch.Tensor | None = None,
    banned: list[int] | None = None,
    step_mask: StepMask | None = None,
    use_cache: bool = True,
    **options: Any,
) -> list[list[int]]:
    """Sample continuations of `prompt_ids` in one batch; `options` are `lingmao.decoding.Generation`'s (eos_id,
    max_new_tokens, num_samples, temperature, top_k, top_p, seed, context_length, on_step); each sample stops at
    `eos_id`.

    `step_mask(step, generated[B, step]) -> bool[B, V]` restricts each step to the allowed tokens
    (constrained decoding); `banned` tokens are never sampled. `on_step(tokens[B], active[B])` sees
    each step's tokens (for streaming). The model sees at most `context_length` tokens (see
    `context_start`); `use_cache=False` recomputes the context at every step even when the model has a
    KV cache. Returns the new token ids of each sample, without `<eos>`.
    """
    rules = sampling_rules(model.vocab_size, repetition_penalty, penalty_tokens, banned, step_mask)
    return decode(model, Generation(prompt_ids, rules=rules, **options), use_cache=use_cache)


def generate(lm: Any, prompt: str = "", **options: Any) -> list[str]:
    """Generate text with a loaded model (`lingmao.load_model(dir)`); see `LingmaoModel.generate` and, for the
    options, `prepare`. Each result is the prompt followed by what was generated (for a form: the whole poem)."""
    generation = prepare(lm, prompt, **options)
    decode(lm.model, generation)
    return generation.texts()


def prepare(
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
    distinct_rhymes: bool = True,
    refuse_copies: bool | None = None,
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
) -> Generation:
    """The options of a generation checked (a bad one is a one-line `LingmaoError`) and turned into a
    `lingmao.decoding.Generation`, not yet decoded; its `texts()` are the results of `generate`.

    The title is not part of the result. A model trained with `data.condition` starts from a header of the title,
    author and keywords given (`lingmao.data.condition`); `enforce_keywords=True` makes each keyword appear in every
    sample (`lingmao.verse.keywords`), with any model. `stream(piece)` receives the text as it is produced
    (num_samples=1); `on_token(sample, piece)` receives each sample's, and may raise to stop the generation.
    Verse options (`lingmao.verse.forms`): form (wujue qijue wulv qilv, or ci with tune=NAME), acrostic,
    rhyme (pingshui | modern | none; None = pingshui with a form), tones (strict | lenient | off; None =
    lenient for a shi form), pattern (auto | 平起 | 仄起), first_line_rhymes (None = either), distinct_rhymes
    (no character ends two lines that rhyme, 重韵, in a shi form). refuse_copies (`lingmao.verse.lines`): never
    complete a line of a form into a line of the training data; None = on with a form when `lm.lines` is set.
    """
    check_options(temperature, top_k, top_p, repetition_penalty, max_new_tokens, num_samples)
    check_text("prompt", prompt, newlines=True)
    check_text("title", title)
    check_text("acrostic", acrostic)
    check_text("author", author)
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
    keywords = normalize_keywords(keywords)
    for keyword in keywords:
        check_text("keywords", keyword)
    keywords = list(dict.fromkeys(converter(k) for k in keywords))  # 雲 and 云 are one keyword after t2s
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
            first_line_rhymes=first_line_rhymes, tune=tune, distinct_rhymes=distinct_rhymes,
        )
        steps = constraint.steps  # the form fixes the length; max_new_tokens does not apply
    step_mask = constraint.mask if constraint is not None else None
    if enforce_keywords and keywords:
        placing = KeywordConstraint(tok, keywords, steps, constraint, prompt, ids["eos"])
        step_mask = placing.mask if constraint is None else (
            lambda step, generated: constraint.mask(step, generated) & placing.mask(step, generated))
    copies = copy_filter(getattr(lm, "lines", None), constraint, tok, prompt, refuse_copies)
    if copies is not None:
        step_mask = copies.restrict(step_mask)
    eligible = vocab_tables(tok).han
    pieces = token_pieces(tok)

    on_step = None
    if on_token is not None or (stream is not None and num_samples == 1):
        def on_step(tokens: torch.Tensor, active: torch.Tensor) -> None:
            for i, (t, alive) in enumerate(zip(tokens.tolist(), active.tolist(), strict=True)):
                if alive and t != ids["eos"]:
                    if on_token is not None:
                        on_token(i, pieces[t])
                    if stream is not None and num_samples == 1:
                        stream(pieces[t])

    generation = Generation(
        prefix + prompt_ids, eos_id=ids["eos"], max_new_tokens=steps, num_samples=num_samples,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        rules=sampling_rules(model.vocab_size, repetition_penalty, eligible,
                             [ids["pad"], ids["unk"], ids["bos"], *header_ids(tok).values()], step_mask),
        context_length=context_length or data_cfg.get("context_length"), on_step=on_step,
    )
    generation.text = lambda rows: [prompt + "".join(pieces[i] for i in row) for row in rows]
    return generation


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
    encoder = _per_tokenizer("encoder", tok, FastEncoder.for_tokenizer)  # building one reads the whole tokenizer
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
