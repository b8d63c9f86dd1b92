"""Decoding several generations at once: one model step for all of them, each with its own random generator, rules,
length and stop, and each with exactly the tokens it gets when decoded alone.

A `Generation` is one request's decoding: its prompt, how many samples (rows) it decodes and for how many tokens,
how it samples (temperature, top-k, top-p, a `torch.Generator` of its own) and its `rules`: callables that change
its rows' next-token scores (a repetition penalty, banned tokens, a verse form's mask, ...). Whatever state a rule
keeps belongs to that generation; the decoder only calls the rules, in order, and knows nothing of what they do.

A `BatchDecoder` holds the generations in flight. Each `step()` gives every one of them one token. A generation
that has just arrived, or whose context window is full (`context_start`), runs its context through the model on
its own rows, exactly as when it is decoded alone; all the others advance together in one `DecodeStep` over every
row of the shared KV cache, whose per-row arithmetic does not depend on the other rows (see
`lingmao.model.DecodeStep`). Their scores then go through each generation's rules and are sampled row by row
(`choose`), again with row-wise operations only, each generation drawing from its own generator. So a generation's
tokens are the same whether it is decoded alone or beside others, and whichever others. Models without a KV cache
(the design architecture) run each generation's context through the model at every step instead.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

# (scores [samples, V], tokens [samples, T], start) -> scores: the rows' next-token scores, the tokens so far (the
# prompt is tokens[:, :start]); -inf marks a token that may not come next. A rule may change `scores` in place
# (they are its generation's own rows) and return them.
Rule = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
StepMask = Callable[[int, torch.Tensor], torch.Tensor]

# Model scores are clamped to +-LARGE (NaN to 0): big enough to dominate any real logit, small enough that the
# rules' and the sampler's arithmetic on them stays finite.
LARGE = 1e30


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


class RepetitionPenalty:
    """The rule of `penalize_repetition` over the prompt and everything generated."""

    def __init__(self, penalty: float, eligible: torch.Tensor | None = None) -> None:
        self.penalty, self.eligible = penalty, eligible

    def __call__(self, scores: torch.Tensor, tokens: torch.Tensor, start: int) -> torch.Tensor:
        if self.eligible is not None and self.eligible.device != scores.device:
            self.eligible = self.eligible.to(scores.device)
        return penalize_repetition(scores, tokens, self.penalty, self.eligible)


class Banned:
    """These tokens are never sampled."""

    def __init__(self, ids: Sequence[int], vocab_size: int) -> None:
        self.ids = torch.tensor(sorted(set(ids)), dtype=torch.long)
        if len(self.ids) and not 0 <= int(self.ids.min()) <= int(self.ids.max()) < vocab_size:
            raise ValueError(f"banned token ids must be in [0, {vocab_size})")

    def __call__(self, scores: torch.Tensor, tokens: torch.Tensor, start: int) -> torch.Tensor:
        if self.ids.device != scores.device:
            self.ids = self.ids.to(scores.device)
        return scores.index_fill_(1, self.ids, float("-inf"))


class AllowedTokens:
    """`mask(step, generated [samples, step]) -> bool [samples, V]`: the tokens allowed next (a verse form's
    layout, tones and rhymes: `lingmao.verse.forms.FormConstraint.mask`)."""

    def __init__(self, mask: StepMask) -> None:
        self.mask = mask

    def __call__(self, scores: torch.Tensor, tokens: torch.Tensor, start: int) -> torch.Tensor:
        return scores.masked_fill_(~self.mask(tokens.size(1) - start, tokens[:, start:]), float("-inf"))


def sorted_descending(x: torch.Tensor) -> torch.Tensor:
    """The values of each row of x [R, V], largest first (on a CPU through NumPy's vectorised sort, which is
    about twenty times faster there than `torch.sort`, and no indices are needed)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=-1)[:, ::-1].copy())
    return torch.sort(x, dim=-1, descending=True).values


def filter_probs(
    probs: torch.Tensor, top_k: int | torch.Tensor | None, top_p: float | torch.Tensor
) -> torch.Tensor:
    """Keep the `top_k` likeliest tokens, then the smallest set of likeliest tokens that holds `top_p` of what is
    left (probability 0 elsewhere, not renormalised); tokens tied with the last one kept are kept too.

    probs [R, V]; `top_k` and `top_p` are numbers or one per row (top_k 0 and top_p 1 leave a row as it is).
    Each row is filtered on its own values only."""
    rows, vocab = probs.shape
    k = torch.as_tensor(0 if top_k is None else top_k, device=probs.device).expand(rows)
    p = torch.as_tensor(top_p, dtype=probs.dtype, device=probs.device).expand(rows)
    by_k, by_p = (k > 0) & (k < vocab), p < 1
    if not bool((by_k | by_p).any()):
        return probs
    ranked = sorted_descending(probs)
    if bool(by_k.any()):
        kth = ranked.gather(1, (k.clamp(1, vocab) - 1).unsqueeze(1)).masked_fill_(~by_k.unsqueeze(1), 0.0)
        probs = torch.where(probs >= kth, probs, 0.0)
        ranked = torch.where(ranked >= kth, ranked, 0.0)
    if bool(by_p.any()):
        # A token stays while the likelier ones hold less than top_p of the total (the likeliest always stays).
        running = ranked.cumsum(-1)
        before = (running - ranked).contiguous()
        kept = torch.searchsorted(before, (p.unsqueeze(1) * running[:, -1:]).contiguous(), right=False)
        last = ranked.gather(1, kept.clamp_(1, vocab) - 1).masked_fill_(~by_p.unsqueeze(1), 0.0)
        probs = torch.where(probs >= last, probs, 0.0)
    return probs


def finite_scores(logits: torch.Tensor) -> torch.Tensor:
    """The model's logits as float32 scores a sampler can always use: NaN -> 0, +-inf and beyond -> +-LARGE."""
    return torch.nan_to_num(logits.float(), nan=0.0).clamp_(-LARGE, LARGE)


def choose(
    scores: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
    uniform: torch.Tensor, fallback: torch.Tensor, greedy: bool | None = None,
) -> torch.Tensor:
    """The next token of each row: scores [R, V] (finite, or -inf = not allowed), one temperature (0 = greedy),
    top_k, top_p (None: off for every row), uniform draw in [0, 1) and fallback token (for a row that allows no
    token) per row; `greedy`: whether some row is greedy (None: find out).

    Sampling is by the inverse of the cumulative distribution: the first token where the running sum of
    probabilities exceeds `uniform` times their total (kept below the total), so a token of probability 0 is
    never chosen. The scores are shifted so that each row's best is 0 before they are divided by the
    temperature: for any finite scores and temperature > 0 the best token's exp(0) = 1 is in every sum, and the
    probabilities are finite."""
    top = scores.amax(-1, keepdim=True)
    none = top.squeeze(1) == float("-inf")
    if bool(none.any()):
        top = top.masked_fill(none.unsqueeze(1), 0.0)
        scores = scores.masked_fill(none.unsqueeze(1), 0.0)  # any token: the fallback replaces it below
    sampling = temperature > 0
    if greedy is None:
        greedy = not bool(sampling.all())
    t = torch.where(sampling, temperature, 1.0) if greedy else temperature
    probs = torch.softmax((scores - top) / t.unsqueeze(1), dim=-1)
    if top_k is not None or top_p is not None:
        probs = filter_probs(probs, top_k, 1.0 if top_p is None else top_p)
    cdf = probs.cumsum_(-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniform.unsqueeze(1).to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    chosen = torch.searchsorted(cdf, target, right=True).squeeze(1)
    if greedy:
        chosen = torch.where(sampling, chosen, scores.argmax(-1))
    return torch.where(none, fallback, chosen)


class Generation:
    """One request's decoding: `num_samples` continuations of `prompt_ids`, at most `max_new_tokens` each; a
    sample ends at `eos_id`. See the module docstring; `rules` change the scores of its rows in order, `on_step
    (tokens [samples], active [samples])` sees each step's tokens (it may raise: the generation then fails with
    that error). `cancel(reason)` ends it at the next step (any thread may call it), as does passing
    `deadline` (a `time.monotonic()` time)."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        *,
        eos_id: int,
        max_new_tokens: int,
        num_samples: int = 1,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        rules: Sequence[Rule] = (),
        seed: int | None = None,
        context_length: int | None = None,
        on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
        deadline: float | None = None,
    ) -> None:
        if not prompt_ids:
            raise ValueError("prompt_ids must hold at least <bos>")
        self.prompt_ids, self.eos_id, self.max_new_tokens = list(prompt_ids), eos_id, max_new_tokens
        self.num_samples, self.temperature, self.top_k, self.top_p = num_samples, temperature, top_k or 0, top_p
        self.rules, self.context_length, self.on_step, self.deadline = list(rules), context_length, on_step, deadline
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**63)
        self.start = len(self.prompt_ids)
        self.length = self.start  # tokens so far
        self.tokens: torch.Tensor | None = None  # [samples, start + max_new_tokens], once decoding begins
        self.active: torch.Tensor | None = None  # bool [samples]: not ended by <eos>
        self.generator: torch.Generator | None = None
        self.window = 0  # the most tokens the model sees at once (set by the decoder)
        self.context = 0  # where the model's context begins in `tokens`
        self.filled = False  # whether its rows of the cache hold its context (else: run the whole context)
        self.row = 0  # its first row in the decoder's cache
        self.stop_reason: str | None = None
        self.error: BaseException | None = None
        self.done = False
        self.text: Callable[[list[list[int]]], list[str]] | None = None  # token ids -> texts (lingmao.sampling)

    def cancel(self, reason: str = "cancelled") -> None:
        """End the generation at the next step (what it has sampled stays)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    @property
    def new_tokens(self) -> int:
        return self.length - self.start

    def begin(self, device: torch.device, window: int) -> None:
        self.window = window
        self.tokens = torch.empty(self.num_samples, self.start + self.max_new_tokens, dtype=torch.long, device=device)
        self.tokens[:, : self.start] = torch.tensor(self.prompt_ids, dtype=torch.long, device=device)
        self.active = torch.ones(self.num_samples, dtype=torch.bool, device=device)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)
        if self.max_new_tokens <= 0:
            self.done = True

    def rows(self) -> list[list[int]]:
        """The new token ids of each sample so far, without `<eos>`."""
        if self.tokens is None:
            return [[] for _ in range(self.num_samples)]
        out = []
        for row in self.tokens[:, self.start : self.length].tolist():
            out.append(row[: row.index(self.eos_id)] if self.eos_id in row else row)
        return out

    def texts(self) -> list[str]:
        """The text of each sample so far (needs `text`, which `lingmao.sampling.prepare` sets)."""
        if self.text is None:
            raise ValueError("this generation has no detokenizer")
        return self.text(self.rows())


class BatchDecoder:
    """The generations in flight and their shared KV cache (see the module docstring).

    `add(generation)` takes one in (it starts at the next step); `step()` gives each one token and returns those
    that ended, done or stopped (`stop_reason`) or failed (`error`: a rule or `on_step` raised). `capacity` is the
    cache's length in tokens: a generation's window must not exceed it, and decoded alone it gets the same
    arithmetic only in a decoder of the same capacity (the server uses the model's context length for all).
    `use_cache=False` runs every generation's context through the model at every step.

    Each generation holds rows `row .. row + num_samples - 1` of the cache and of the per-row state kept here (the
    newest token, the cache position of the next one, whether the sample is still going); the rows of a
    generation that ends are closed up."""

    def __init__(self, model: torch.nn.Module, capacity: int | None = None, use_cache: bool = True) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.capacity = min(capacity or model.max_len, model.max_len)
        self.step_fn = model.decode_step() if use_cache and hasattr(model, "decode_step") else None
        self.cache: Any = None
        self.generations: list[Generation] = []
        self.rows = 0
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)  # [rows] newest token
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # [rows] where it goes in the cache
        self.active = torch.zeros(0, dtype=torch.bool, device=self.device)  # [rows] not ended by <eos>
        self._settings_of: list[int] = []
        self._settings: tuple = ()

    def __len__(self) -> int:
        return len(self.generations)

    def add(self, generation: Generation) -> None:
        window = min(generation.context_length or self.model.max_len, self.model.max_len)
        if self.step_fn is not None and window > self.capacity:
            raise ValueError(f"a window of {window} tokens does not fit a cache of {self.capacity}")
        generation.top_k = min(generation.top_k, self.model.vocab_size)  # more is all of them
        generation.begin(self.device, window)
        if generation.done:
            return
        n = generation.num_samples
        generation.row = self.rows
        self.rows += n
        self.last = torch.cat([self.last, torch.zeros(n, dtype=torch.long, device=self.device)])
        self.positions = torch.cat([self.positions, torch.zeros(n, dtype=torch.long, device=self.device)])
        self.active = torch.cat([self.active, torch.ones(n, dtype=torch.bool, device=self.device)])
        if self.step_fn is not None and (self.cache is None or self.cache.batch_size < self.rows):
            grown = self.model.new_cache(max(self.rows, 2 * (self.cache.batch_size if self.cache else 0)),
                                         self.capacity)
            if self.cache is not None:
                for old, new in zip(self.cache.keys + self.cache.values, grown.keys + grown.values, strict=True):
                    new[: old.size(0)] = old
            self.cache = grown
        self.generations.append(generation)

    @torch.inference_mode()
    def step(self) -> list[Generation]:
        now = time.monotonic()
        for g in self.generations:
            if g.deadline is not None and now > g.deadline:
                g.cancel("time limit")
        ended = [g for g in self.generations if g.stop_reason is not None]
        self._remove(ended)
        if not self.generations:
            return ended
        scores = finite_scores(self._forward())
        for g in self.generations:
            rows = scores[g.row : g.row + g.num_samples]
            try:
                s = rows
                for rule in g.rules:
                    s = rule(s, g.tokens[:, : g.length], g.start)
                if s is not rows:
                    rows.copy_(s)
            except Exception as exc:  # this generation's rules failed; the others go on
                g.error = exc
        self._sample(scores)
        finished = [g for g in self.generations if g.error is not None or g.done]
        self._remove(finished)
        return ended + finished

    def _forward(self) -> torch.Tensor:
        """The logits of every row's next token [rows, V]."""
        fills = []
        for g in self.generations:
            moved = context_start(g.length, g.context, g.window)
            if not g.filled or moved != g.context:
                g.context = moved
                fills.append(g)
        out = None
        if len(fills) < len(self.generations):
            # One step for every row; a filling generation's rows get a dummy token at position 0, which its
            # prefill below overwrites, and their logits are replaced.
            for g in fills:
                self.last[g.row : g.row + g.num_samples] = 0
                self.positions[g.row : g.row + g.num_samples] = 0
            out = self.step_fn(self.last, self.positions, self.cache)
            self.positions += 1
        for g in fills:
            context = g.tokens[:, g.context : g.length]
            if self.step_fn is None:
                logits = self.model(context)[:, -1]
            else:
                rows = self.cache.rows(g.row, g.row + g.num_samples)
                logits = self.model(context, cache=rows)[:, -1]
                self.positions[g.row : g.row + g.num_samples] = rows.length
            g.filled = self.step_fn is not None  # without a cache, the context runs again at the next step
            if out is None:
                out = torch.empty(self.rows, logits.size(-1), dtype=logits.dtype, device=self.device)
            out[g.row : g.row + g.num_samples] = logits
        return out

    def _sample(self, scores: torch.Tensor) -> None:
        live = self.generations

        def per_row(values: list[Any], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([v for g, v in zip(live, values, strict=True) for _ in range(g.num_samples)],
                                dtype=dtype, device=self.device)

        key = [id(g) for g in live]
        if key != self._settings_of:  # the per-row settings, made again when the generations change
            self._settings_of = key
            self._settings = (
                per_row([g.temperature for g in live], scores.dtype),
                per_row([g.top_k for g in live], torch.long) if any(g.top_k for g in live) else None,
                per_row([g.top_p for g in live], scores.dtype) if any(g.top_p < 1 for g in live) else None,
                per_row([g.eos_id for g in live], torch.long),
                any(g.temperature == 0 for g in live),
            )
        temperature, top_k, top_p, eos, greedy = self._settings
        uniform = [
            torch.rand(g.num_samples, generator=g.generator, device=self.device)
            if g.temperature > 0 else torch.zeros(g.num_samples, device=self.device)
            for g in live
        ]
        chosen = choose(scores, temperature, top_k, top_p, torch.cat(uniform) if len(uniform) > 1 else uniform[0],
                        eos, greedy)
        chosen = torch.where(self.active, chosen, eos)
        was_active, self.last = self.active, chosen
        self.active = was_active & (chosen != eos)
        going = self.active.tolist()
        for g in live:
            if g.error is not None:  # its rules failed: no token
                continue
            rows = slice(g.row, g.row + g.num_samples)
            tokens = chosen[rows]
            g.tokens[:, g.length] = tokens
            g.length += 1
            try:
                if g.on_step is not None:
                    g.on_step(tokens, was_active[rows])
            except Exception as exc:
                g.error = exc
            g.active = self.active[rows]
            if g.new_tokens >= g.max_new_tokens or not any(going[rows]):
                g.done = True

    def _remove(self, gone: list[Generation]) -> None:
        for g in gone:
            g.done = True
        if not gone:
            return
        gone_ids = {id(g) for g in gone}
        row, kept, keep_rows = 0, [], []
        for g in self.generations:
            if id(g) in gone_ids:
                continue
            if g.row != row and self.cache is not None:
                self.cache.move_rows(g.row, g.row + g.num_samples, row)
            keep_rows.extend(range(g.row, g.row + g.num_samples))
            g.row = row
            row += g.num_samples
            kept.append(g)
        index = torch.tensor(keep_rows, dtype=torch.long, device=self.device)
        self.last, self.positions, self.active = (t.index_select(0, index) for t in (self.last, self.positions,
                                                                                     self.active))
        self.generations, self.rows = kept, row
        if not kept:
            self.cache = None  # its memory goes back while nothing is decoded


def decode(model: torch.nn.Module, generation: Generation, use_cache: bool = True) -> list[list[int]]:
    """Decode one generation alone (to its end; an error of its rules or `on_step` is raised) and return its
    token ids (`Generation.rows`)."""
    decoder = BatchDecoder(model, min(generation.context_length or model.max_len, model.max_len), use_cache)
    decoder.add(generation)
    while decoder.generations:
        for g in decoder.step():
            if g.error is not None:
                raise g.error
    return generation.rows()
