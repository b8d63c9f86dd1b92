"""Verse forms as constraints on what may be sampled at each position (constrained decoding).

A form fixes the whole layout of a poem: for a 五言绝句 (wujue) it is `XXXXX，XXXXX。\\nXXXXX，XXXXX。<eos>`; for
a ci tune (`form=ci tune=浣溪沙`) the tune's clauses, a line break after each stop and a blank line at the
stanza break. Every position of the layout is a *slot* that accepts either a Han character or one exact token
(`，` `。` `\\n` `<eos>`). During decoding the logits of every token a slot does not accept are set to -inf, so
the output of a form is well-formed whatever the model.

On top of the layout come the verse rules, as *variants*: for a shi form with `tones=strict|lenient` each
standard tonal pattern (`lingmao.verse.meter`) is a variant giving every character position a tone (平, 仄 or
free) and listing the rhyming positions; a ci tune is one variant with its rhyme sets. Each sample keeps the set
of variants, and of rhyme classes per rhyme set, that agree with what it has produced so far; a position then
admits the characters that some living (variant, class) admits. So each sample of a batch settles its own
pattern (with `pattern=auto`) and rhyme group as it goes.

No dead end can arise, by construction: before sampling, every variant is kept only if each of its positions
has an admissible character in the vocabulary (fixed characters of the prompt or acrostic included) and each
rhyme set has a class with characters for all of its positions. A sampled character was admitted by some living
(variant, class), which therefore survives, and what it admits later is fixed in advance except for one rule:
after a 仄-only character at the first free position of a B line (平平仄仄平), the third must be 平 (no 孤平);
the vocabulary's 平 characters were checked to exist. When no variant is viable, the error says why before
sampling starts.

No 重韵 (`distinct_rhymes`, shi forms with a rhyme): no character ends two of the lines that may rhyme (line 1
and the even lines), so whichever pattern a reader fits the poem to, its rhymes are distinct. At such a line end
the characters of the earlier ones are excluded, in both their traditional and simplified forms (華 and 华 are
one character). This keeps decoding free of dead ends because a rhyme class is viable only if it has, at every
rhyme position, at least as many different admissible characters (counted in simplified form) as there are such
line ends: at most that many minus one are used when one is sampled. Ci are left alone: some tunes repeat a rhyme by
design (长相思's 汴水流，泗水流; 如梦令's 如梦，如梦).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from lingmao.data.tokenizer import special_ids
from lingmao.errors import LingmaoError
from lingmao.verse import meter, tunes
from lingmao.verse.han import is_han
from lingmao.verse.pingshui import PING, ZE
from lingmao.verse.pingshui import tones as char_tones
from lingmao.verse.tunes import Tune
from lingmao.verse.vocab import (
    FREE,
    KNOWN,
    LEVEL,
    NEED_NAMES,
    OBLIQUE,
    RHYME_TONES,
    char_rhyme_classes,
    char_tone_fits,
    class_sizes,
    rhyme_masks,
    variant_ids,
    vocab_tables,
)

log = logging.getLogger(__name__)

# name -> (characters per line, lines)
FORMS: dict[str, tuple[int, int]] = {"wujue": (5, 4), "qijue": (7, 4), "wulv": (5, 8), "qilv": (7, 8)}
CI = "ci"
FORM_ALIASES = {
    "五绝": "wujue", "五絕": "wujue", "七绝": "qijue", "七絕": "qijue", "五律": "wulv", "七律": "qilv",
    "词": CI, "詞": CI,
}
FORM_NAMES = {"wujue": "五绝", "qijue": "七绝", "wulv": "五律", "qilv": "七律", CI: "词"}
COMMA, PERIOD, NEWLINE = "，", "。", "\n"
RHYMES = ("pingshui", "modern", "none")
TONES = ("strict", "lenient", "off")
PATTERNS = ("auto", "平起", "仄起")
_PATTERN_ALIASES = {"pingqi": "平起", "ping": "平起", "zeqi": "仄起", "ze": "仄起", "平": "平起", "仄": "仄起"}


def normalize_form(form: str | None) -> str | None:
    """'wujue', '五绝', 'ci', '词' ... -> the form's name; None / '' / 'none' -> None; anything else is an error."""
    if form in (None, "", "none", "free"):
        return None
    name = FORM_ALIASES.get(str(form), str(form).lower())
    if name not in FORMS and name != CI:
        raise LingmaoError(f"form: '{form}' is not one of {', '.join(FORMS)}, {CI} (or none)")
    return name


def normalize_rhyme(value: str | bool | None, form: str | None) -> str:
    """rhyme= -> pingshui | modern | none. None: pingshui with a form, else none; true/false: pingshui/none."""
    if value is None:
        return "pingshui" if form else "none"
    if isinstance(value, bool):
        value = "pingshui" if value else "none"
    name = str(value).lower()
    if name in ("true", "yes"):
        name = "pingshui"
    if name in ("false", "no", "off"):
        name = "none"
    if name not in RHYMES:
        raise LingmaoError(f"rhyme: '{value}' is not one of {', '.join(RHYMES)} (true = pingshui, false = none)")
    if name != "none" and form is None:
        raise LingmaoError(f"rhyme={name} needs a verse form: form=wujue, qijue, wulv, qilv or ci")
    if name == "modern" and form == CI:
        raise LingmaoError("rhyme=modern: ci tunes rhyme by the 词林正韵 (rhyme=pingshui) or not at all (none)")
    return name


def normalize_tones(value: str | bool | None, form: str | None) -> str:
    """tones= -> strict | lenient | off. None: lenient for a shi form, else off."""
    if value is None:
        return "lenient" if form in FORMS else "off"
    if isinstance(value, bool):
        value = "lenient" if value else "off"
    name = str(value).lower()
    if name not in TONES:
        raise LingmaoError(f"tones: '{value}' is not one of {', '.join(TONES)}")
    if name != "off" and form not in FORMS:
        what = "ci tunes fix only the tones of their rhymes" if form == CI else "it needs a shi form"
        raise LingmaoError(f"tones={name}: {what} (form=wujue, qijue, wulv or qilv)")
    return name


def normalize_pattern(value: str | None, form: str | None, tones: str) -> str:
    """pattern= -> auto | 平起 | 仄起 (平起 and 仄起 need tones=strict or lenient)."""
    if value in (None, "", "auto"):
        return "auto"
    name = _PATTERN_ALIASES.get(str(value).lower(), str(value))
    if name not in PATTERNS:
        raise LingmaoError(f"pattern: '{value}' is not one of {', '.join(PATTERNS)}")
    if form not in FORMS or tones == "off":
        raise LingmaoError(f"pattern={name} needs a shi form and tones=strict or lenient")
    return name


@dataclass(frozen=True)
class Slot:
    """One position: a Han character (line, column) or one exact token (`token` set). For ci, line = clause."""

    line: int
    column: int = -1
    token: str | None = None  # "，", "。", "\n" or "<eos>"

    @property
    def is_char(self) -> bool:
        return self.token is None


def shi_layout(form: str) -> list[Slot]:
    """The slots of a shi form, ending with `<eos>`."""
    chars, lines = FORMS[form]
    slots: list[Slot] = []
    for line in range(lines):
        slots += [Slot(line, col) for col in range(chars)]
        if line % 2 == 0:
            slots.append(Slot(line, token=COMMA))
        else:
            slots.append(Slot(line, token=PERIOD))
            if line != lines - 1:
                slots.append(Slot(line, token=NEWLINE))
    slots.append(Slot(lines - 1, token="<eos>"))
    return slots


def ci_layout(tune: Tune) -> list[Slot]:
    """The slots of a ci: each clause and its mark, a line break after a stop, a blank line at the stanza break."""
    slots: list[Slot] = []
    last = len(tune.clauses) - 1
    for i, (length, mark) in enumerate(tune.clauses):
        slots += [Slot(i, col) for col in range(length)]
        slots.append(Slot(i, token=mark))
        if mark == PERIOD and i != last:
            slots.append(Slot(i, token=NEWLINE))
            if tune.stanza == i + 1:
                slots.append(Slot(i, token=NEWLINE))
    slots.append(Slot(last, token="<eos>"))
    return slots


@dataclass(frozen=True)
class Variant:
    """One way to fill the form: per character position what it needs, the 孤平 pairs, the rhyme sets.

    Positions are indices among the character slots. `lone` pairs (a, b): after a 仄-only character at a, b
    needs 平. A rhyme set is ((position, tone index into RHYME_TONES), ...): its characters share one class.
    """

    name: str
    need: tuple[int, ...]
    lone: tuple[tuple[int, int], ...]
    rhymes: tuple[tuple[tuple[int, int], ...], ...]


_NEED_OF_TONE = {PING: LEVEL, ZE: OBLIQUE, None: KNOWN}
_TONE_INDEX = {"": 0, None: 0, PING: 1, ZE: 2}


def shi_variants(
    form: str, tones: str, rhyme_mode: str, pattern: str = "auto", first_line_rhymes: bool | None = None
) -> list[Variant]:
    """The variants of a shi form: the standard patterns (filtered by `pattern`, `first_line_rhymes`) or,
    with tones=off, the layout with its rhyme positions only."""
    chars, lines = FORMS[form]
    tone = _TONE_INDEX[PING] if rhyme_mode == "pingshui" else 0  # Pingshui rhymes of regulated verse are 平

    def rhyme_sets(rhyme_lines: tuple[int, ...]) -> tuple[tuple[tuple[int, int], ...], ...]:
        if rhyme_mode == "none":
            return ()
        return (tuple((line * chars + chars - 1, tone) for line in rhyme_lines),)

    if tones == "off":
        first = bool(first_line_rhymes)
        rhyme_lines = ((0,) if first else ()) + tuple(range(1, lines, 2))
        return [Variant("首句入韵" if first else "", (FREE,) * (chars * lines), (), rhyme_sets(rhyme_lines))]
    out = []
    for p in meter.patterns(chars, lines):
        if pattern != "auto" and p.start != pattern:
            continue
        if first_line_rhymes is not None and p.first_rhymes != first_line_rhymes:
            continue
        need: list[int] = []
        lone: list[tuple[int, int]] = []
        for i, line_type in enumerate(p.types):
            rule = meter.line_rule(line_type, chars, tones)
            need += [_NEED_OF_TONE[r] for r in rule.required]
            if rule.lone_level is not None:
                a, b = rule.lone_level
                lone.append((i * chars + a, i * chars + b))
        rhyme_lines = p.rhyme_lines if rhyme_mode == "pingshui" else tuple(range(1, lines, 2))  # modern: even lines
        out.append(Variant(p.name, tuple(need), tuple(lone), rhyme_sets(rhyme_lines)))
    return out


def ci_variants(tune: Tune, rhyme_mode: str) -> list[Variant]:
    """The one variant of a ci tune: every character free, the tune's rhyme sets (none with rhyme=none)."""
    starts, n = [], 0
    for length, _ in tune.clauses:
        starts.append(n)
        n += length
    ends = [s + length - 1 for s, (length, _) in zip(starts, tune.clauses, strict=True)]
    sets = () if rhyme_mode == "none" else tuple(
        tuple((ends[clause], _TONE_INDEX[t]) for clause, t in members) for members in tune.rhymes
    )
    return [Variant(tune.name, (FREE,) * n, (), sets)]


def fixed_char_fits(ch: str) -> torch.Tensor:
    """bool [4] like `char_tone_fits`, but a Han character of unknown tone fits any need: characters the user
    fixes (prompt, acrostic) get the benefit of the doubt, as in the checker; sampled ones must be known."""
    fits = char_tone_fits(ch)
    return torch.ones(4, dtype=torch.bool) if bool(fits[FREE]) and not bool(fits[KNOWN]) else fits


def _show(ch: str | None) -> str:
    return "\\n" if ch == "\n" else str(ch)


def _tone_words(ch: str) -> str:
    t = char_tones(ch)
    return "平 or 仄" if len(t) == 2 else next(iter(t)) if t else "of unknown tone"


class FormConstraint:
    """Masks for constrained decoding of one form: layout, acrostic, tones, rhyme and, with `distinct_rhymes`, no
    重韵 (see the module docstring).

    `start` is the number of slots the prompt already fills; `mask(step, generated)` returns the tokens
    allowed at slot `start + step` as a bool tensor [batch, V], given the tokens generated so far ([batch, step]).
    """

    def __init__(
        self,
        tok: Tokenizer,
        form: str,
        prompt: str = "",
        acrostic: str = "",
        rhyme: str = "none",
        tones: str = "off",
        pattern: str = "auto",
        first_line_rhymes: bool | None = None,
        tune: Tune | str | None = None,
        distinct_rhymes: bool = True,
    ) -> None:
        self.form = form
        if form == CI:
            if tune is None:
                raise LingmaoError("form=ci needs tune=NAME (list them with list_tunes=true)")
            self.tune = tune if isinstance(tune, Tune) else tunes.tune_named(tune)
            if acrostic:
                raise LingmaoError("acrostic: for the shi forms (wujue, qijue, wulv, qilv) only")
            self.slots = ci_layout(self.tune)
            self.variants = ci_variants(self.tune, rhyme)
            self.system = "cilin"
        else:
            if tune is not None:
                raise LingmaoError(f"tune={tune}: only with form=ci")
            self.tune = None
            self.chars, self.lines = FORMS[form]
            self.slots = shi_layout(form)
            self.variants = shi_variants(form, tones, rhyme, pattern, first_line_rhymes)
            self.system = "modern" if rhyme == "modern" else "pingshui"
        self.rhyme, self.tones = rhyme, tones
        # Character positions that must all differ (see the module docstring): line 1's end and the even lines'.
        self.distinct_at: list[int] = []
        if distinct_rhymes and form != CI and rhyme != "none":
            self.distinct_at = [self.chars - 1] + [i * self.chars + self.chars - 1 for i in range(1, self.lines, 2)]
        self.what = f"form={form}" + (f" tune={self.tune.name}" if self.tune else "")
        self.tables = vocab_tables(tok)
        self.size = self.tables.size
        self.token_ids = self._token_ids(tok)
        if not bool(self.tables.han.any()):
            raise LingmaoError(f"{self.what}: the model's vocabulary has no Han characters")
        self.char_index = {}  # slot index -> character position
        for k, slot in enumerate(self.slots):
            if slot.is_char:
                self.char_index[k] = len(self.char_index)
        self.char_slots = [k for k, slot in enumerate(self.slots) if slot.is_char]
        self.acrostic = self._acrostic(tok, acrostic)
        self.start = self._fit_prompt(tok, prompt)
        self.fixed: dict[int, str] = {self.char_index[k]: ch for k, ch in enumerate(prompt) if k in self.char_index}
        for line, (ch, _) in self.acrostic.items():
            self.fixed.setdefault(self.char_index[self._slot_of(line, 0)], ch)
        self.fixed_ids = {k: tok.token_to_id(ch) for k, ch in self.fixed.items()}
        self.masks = rhyme_masks(tok, self.system) if any(v.rhymes for v in self.variants) else None
        self.tok = tok
        self.variant_of = variant_ids(tok)  # token -> one token of the same character (simplified form)
        self._select_variants()
        self._state: _State | None = None

    # ------------------------------------------------------------------------------------------
    # Set-up checks
    # ------------------------------------------------------------------------------------------
    def _token_ids(self, tok: Tokenizer) -> dict[str, int]:
        ids = {}
        for name in dict.fromkeys(s.token for s in self.slots if s.token and s.token != "<eos>"):  # layout order
            i = tok.token_to_id(name)
            if i is None:
                raise LingmaoError(
                    f"{self.what}: the model's vocabulary has no '{_show(name)}', so it cannot write verse in "
                    "this layout"
                )
            ids[name] = i
        ids["<eos>"] = special_ids(tok)["eos"]
        return ids

    def _slot_of(self, line: int, column: int) -> int:
        return next(k for k, s in enumerate(self.slots) if s.is_char and s.line == line and s.column == column)

    def _acrostic(self, tok: Tokenizer, acrostic: str) -> dict[int, tuple[str, int]]:
        if not acrostic:
            return {}
        if len(acrostic) > self.lines:
            raise LingmaoError(f"acrostic: {len(acrostic)} characters but form={self.form} has only {self.lines} lines")
        out = {}
        for line, ch in enumerate(acrostic):
            i = tok.token_to_id(ch)
            if i is None:
                raise LingmaoError(f"acrostic: the character '{ch}' is not in the model's vocabulary")
            if not is_han(ch):
                raise LingmaoError(f"acrostic: '{ch}' is not a Han character")
            out[line] = (ch, i)
        return out

    def where(self, position: int) -> str:
        """'line 2, char 5' (a shi) or 'clause 3, char 4' (a ci) for a character position."""
        slot = self.slots[self.char_slots[position]]
        return f"{'clause' if self.tune else 'line'} {slot.line + 1}, char {slot.column + 1}"

    @property
    def steps(self) -> int:
        """Tokens left to generate after the prompt, `<eos>` included."""
        return len(self.slots) - self.start

    def _fit_prompt(self, tok: Tokenizer, prompt: str) -> int:
        """Check that the prompt is the beginning of a poem of this layout; return the slots it fills."""
        if len(prompt) >= len(self.slots):
            raise LingmaoError(f"prompt: {len(prompt)} characters, longer than a whole poem of {self.what}")
        for k, ch in enumerate(prompt):
            slot = self.slots[k]
            if slot.is_char:
                if not is_han(ch):
                    raise LingmaoError(
                        f"prompt: '{_show(ch)}' at position {k + 1} does not fit {self.what} "
                        f"(a Han character is expected there)"
                    )
                forced = self.acrostic.get(slot.line) if slot.column == 0 else None
                if forced is not None and ch != forced[0]:
                    raise LingmaoError(
                        f"prompt: line {slot.line + 1} starts with '{ch}' but the acrostic wants '{forced[0]}'"
                    )
            elif ch != slot.token:
                raise LingmaoError(
                    f"prompt: '{_show(ch)}' at position {k + 1} does not fit {self.what} "
                    f"('{_show(slot.token)}' expected there)"
                )
        return len(prompt)

    def _fits(self, ch: str, need: int) -> bool:
        return bool(fixed_char_fits(ch)[need])

    def _problem(self, v: Variant) -> tuple[str | None, list[torch.Tensor]]:
        """Why variant `v` cannot be followed with this vocabulary and these fixed characters (None: it can),
        and for each rhyme set the classes that can serve it (bool [C])."""
        tone_masks = self.tables.tone_masks
        for k, need in enumerate(v.need):
            if k in self.fixed:
                ch = self.fixed[k]
                if not self._fits(ch, need):
                    return f"{self.where(k)}: '{ch}' is {_tone_words(ch)} where {NEED_NAMES[need]} is required", []
            elif not bool(tone_masks[need].any()):
                return f"{self.where(k)}: no character of the model's vocabulary is {NEED_NAMES[need]}", []
        for a, b in v.lone:
            if a in self.fixed and b in self.fixed:
                if not self._fits(self.fixed[a], LEVEL) and not self._fits(self.fixed[b], LEVEL):
                    return f"{self.where(a)}: '{self.fixed[a]}' and '{self.fixed[b]}' are 仄, which makes 孤平", []
            elif b not in self.fixed and not bool(tone_masks[LEVEL].any()):
                return f"{self.where(b)}: no character of the model's vocabulary is 平", []
        classes = []
        needed = max(len(self.distinct_at), 1)  # admissible characters a class needs at each rhyme position
        for members in v.rhymes:
            ok = torch.ones(self.masks.size(1), dtype=torch.bool)
            some = ok.clone()  # classes with at least one admissible character at each position
            for k, t in members:
                if k in self.fixed:
                    ok &= char_rhyme_classes(self.fixed[k], self.system)[t] & self._fits(self.fixed[k], v.need[k])
                    some &= ok
                else:
                    count = class_sizes(self.tok, self.system, t, v.need[k], distinct=bool(self.distinct_at))
                    ok &= count >= needed
                    some &= count > 0
            if not bool(ok.any()):
                fixed = [f"'{self.fixed[k]}' ({self.where(k)})" for k, _ in members if k in self.fixed]
                tone = RHYME_TONES[members[0][1]] or ""
                system = {"pingshui": f"{tone}声 Pingshui group", "cilin": "词林正韵 section",
                          "modern": "modern rhyme class"}[self.system]
                if fixed:
                    return f"rhyme: {' and '.join(fixed)} share no {system} that the other rhyme positions can use", []
                if bool(some.any()):
                    return (f"rhyme: no {system} has {needed} different characters in the model's vocabulary for "
                            "each of its rhyme positions (no 重韵; distinct_rhymes=false allows repeats)"), []
                return f"rhyme: no {system} has characters in the model's vocabulary for all its rhyme positions", []
            classes.append(ok)
        return None, classes

    def _select_variants(self) -> None:
        kept, problems = [], []
        for v in self.variants:
            problem, classes = self._problem(v)
            if problem is None:
                kept.append((v, classes))
            else:
                problems.append(f"{v.name}: {problem}" if v.name and len(self.variants) > 1 else problem)
        if not kept:
            what = f"{self.what} tones={self.tones} rhyme={self.rhyme}"
            if self.fixed:
                what += " with " + " and ".join(x for x, on in (("this prompt", self.start), ("this acrostic",
                                                                                             self.acrostic)) if on)
            raise LingmaoError(f"no way to write {what}: " + "; ".join(problems))
        self.variants = [v for v, _ in kept]
        self.viable_classes = [classes for _, classes in kept]
        for v in self.variants:
            for _, b in v.lone:
                assert v.need[b] in (KNOWN, LEVEL), "a 孤平 pair's second position must be free or 平"

    # ------------------------------------------------------------------------------------------
    # Decoding
    # ------------------------------------------------------------------------------------------
    def mask(self, step: int, generated: torch.Tensor) -> torch.Tensor:
        """Allowed tokens at this step: bool [batch, V] on `generated`'s device."""
        batch, device = generated.size(0), generated.device
        state = self._state
        if state is None or state.batch != batch or state.device != device or state.consumed > step:
            state = self._state = _State(self, batch, device)
        while state.consumed < step:
            state.fold_token(self.start + state.consumed, generated[:, state.consumed])
        slot_index = self.start + step
        slot = self.slots[slot_index]
        if not slot.is_char:
            return state.one_hot(self.token_ids[slot.token])
        if slot.column == 0 and slot.line in self.acrostic:
            return state.one_hot(self.acrostic[slot.line][1])
        allowed = state.allowed(self.char_index[slot_index])
        if not bool(allowed.any(-1).all()):  # impossible by construction (see the module docstring)
            raise RuntimeError(f"{self.what}: no admissible character at {self.where(self.char_index[slot_index])}")
        return allowed


def any_along(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`x.any(dim)` of a bool tensor, as the largest of its bytes: on a CPU, `any` over a dimension that is not the
    last is many times slower (torch 2.13, one thread: 120 µs against 8 for [1, 4, 6256]; 2.9 ms against 30 µs
    for 16 rows)."""
    return x.view(torch.uint8).amax(dim).view(torch.bool)


class _State:
    """Per-sample decoding state: which variants and rhyme classes still agree with the poem so far, all variants
    held in one tensor each so that a step costs the same few operations whatever their number."""

    def __init__(self, c: FormConstraint, batch: int, device: torch.device) -> None:
        self.c, self.batch, self.device, self.consumed = c, batch, device, 0
        self.tone_masks = c.tables.tone_masks.to(device)
        self.variant_of = c.variant_of.to(device)
        self.rhyme_masks = c.masks.to(device) if c.masks is not None else None
        n, nv = len(c.char_slots), len(c.variants)
        self.level = torch.zeros(batch, n, dtype=torch.bool, device=device)
        self.tokens = torch.full((batch, n), -1, dtype=torch.long, device=device)  # the token at each position
        self.alive = torch.ones(batch, nv, dtype=torch.bool, device=device)
        self.need = torch.tensor([v.need for v in c.variants], dtype=torch.long, device=device)  # [variants, n]
        # 孤平: position b of a variant needs 平 after a 仄-only character at `lone[v, b]` (-1: no such rule)
        lone = torch.full((nv, n), -1, dtype=torch.long)
        for vi, v in enumerate(c.variants):
            for a, b in v.lone:
                lone[vi, b] = a
        self.lone = lone.to(device)
        # Rhyme classes still possible, per variant and rhyme set (sets past a variant's own stay unused).
        sets = max((len(classes) for classes in c.viable_classes), default=0)
        classes = c.masks.size(1) if c.masks is not None else 0
        live = torch.zeros(nv, sets, classes, dtype=torch.bool)
        for vi, viable in enumerate(c.viable_classes):
            for si, ok in enumerate(viable):
                live[vi, si] = ok
        self.live = live.to(device).unsqueeze(0).repeat(batch, 1, 1, 1)  # bool [batch, variants, sets, C]
        self.lone_at = {b for v in c.variants for _, b in v.lone}  # positions where some variant has the rule
        # Per character position, the variants that rhyme there, grouped by rhyme tone and by what the position
        # needs (None where the 孤平 rule makes that depend on the poem): (variants, their sets, tone, need).
        self.rhyme_at: dict[int, list[tuple[torch.Tensor, torch.Tensor, int, int | None]]] = {}
        self.plain_at: dict[int, torch.Tensor] = {}  # the variants that do not rhyme there (where some do)
        by_position: dict[int, dict[tuple[int, int | None], tuple[list[int], list[int]]]] = {}
        for vi, v in enumerate(c.variants):
            for si, members in enumerate(v.rhymes):
                for k, t in members:
                    key = (t, None if k in self.lone_at else v.need[k])
                    group = by_position.setdefault(k, {}).setdefault(key, ([], []))
                    group[0].append(vi)
                    group[1].append(si)
        for k, groups in by_position.items():
            self.rhyme_at[k] = [(torch.tensor(vs, device=device), torch.tensor(ss, device=device), t, need)
                                for (t, need), (vs, ss) in groups.items()]
            rhyming = {vi for vs, _ in groups.values() for vi in vs}
            if len(rhyming) < nv:
                self.plain_at[k] = torch.tensor([vi for vi in range(nv) if vi not in rhyming], device=device)
        for k, slot_index in enumerate(c.char_slots):
            if slot_index >= c.start:
                break
            self._fold_fixed(k)  # a character of the prompt

    def one_hot(self, token: int) -> torch.Tensor:
        allowed = torch.zeros(self.batch, self.c.size, dtype=torch.bool, device=self.device)
        allowed[:, token] = True
        return allowed

    def needs(self, k: int) -> torch.Tensor:
        """long [batch, variants]: what position k needs under each variant, given the poem so far (孤平 rule)."""
        need = self.need[:, k].expand(self.batch, -1)
        if k in self.lone_at:
            a = self.lone[:, k]
            after_oblique = (a >= 0) & ~self.level[:, a.clamp(min=0)]  # [batch, variants]
            need = torch.where(after_oblique, LEVEL, need)
        return need

    def allowed(self, k: int) -> torch.Tensor:
        """bool [batch, V]: the tokens some living variant (and rhyme class) admits at character position k."""
        groups = self.rhyme_at.get(k)
        if not groups:
            allowed = any_along(self.tone_masks[self.needs(k)] & self.alive.unsqueeze(-1), 1)
        else:
            allowed = torch.zeros(self.batch, self.c.size, dtype=torch.bool, device=self.device)
            plain = self.plain_at.get(k)
            if plain is not None:
                allowed |= any_along(self.tone_masks[self.needs(k)[:, plain]] & self.alive[:, plain, None], 1)
            for variants, sets, t, need in groups:
                live = self.live[:, variants, sets, :]  # [batch, r, C]
                if need is not None:  # one tone mask for all: the classes any living variant allows
                    classes = any_along(live & self.alive[:, variants, None], 1)  # [batch, C]
                    allowed |= self.tone_masks[need] & self._admitted(classes, t)
                else:  # what each variant's classes admit ([batch, r, V]), each under its own tone mask
                    rhymes = self._admitted(live.flatten(0, 1), t).view(self.batch, len(variants), -1)
                    tones = self.tone_masks[self.needs(k)[:, variants]]
                    allowed |= any_along(tones & rhymes & self.alive[:, variants, None], 1)
        if k in self.c.distinct_at:  # no 重韵: not a character that ended an earlier line that may rhyme
            ids = self.tokens[:, [p for p in self.c.distinct_at if p < k]]
            used = torch.zeros(self.batch, self.c.size + 1, dtype=torch.bool, device=self.device)
            used.scatter_(1, torch.where(ids >= 0, self.variant_of[ids.clamp(min=0)], self.c.size), True)
            allowed &= ~used[:, self.variant_of]  # every form of a used character
        return allowed

    def variant_allowed(self, vi: int, k: int) -> torch.Tensor:
        """bool [batch, V]: what variant `vi` alone admits at character position k (nothing where it is dead)."""
        m = self.tone_masks[self.needs(k)[:, vi]]
        for variants, sets, t, _ in self.rhyme_at.get(k, ()):
            hit = (variants == vi).nonzero()
            if len(hit):
                m = m & self._admitted(self.live[:, vi, int(sets[hit[0, 0]]), :], t)
        return m & self.alive[:, vi : vi + 1]

    def _admitted(self, classes: torch.Tensor, t: int) -> torch.Tensor:
        """bool [rows, V]: the tokens that rhyme (read with tone t) in one of each row's `classes` (bool [rows, C]):
        the union of those classes' rows of the table, row by row (one product reading the whole table for all
        rows costs more unless the rows are many)."""
        table = self.rhyme_masks[t]
        if classes.size(0) > 32:
            return (classes.float() @ table.float()) > 0
        none = torch.zeros(table.size(1), dtype=torch.bool, device=table.device)
        return torch.stack([any_along(table[row], 0) if bool(row.any()) else none for row in classes])

    def fold_token(self, slot_index: int, tokens: torch.Tensor) -> None:
        """Take in the tokens sampled at `slot_index`."""
        k = self.c.char_index.get(slot_index)
        if k in self.c.fixed:
            self._fold_fixed(k)  # an acrostic character
        elif k is not None:
            classes = self.rhyme_masks[:, :, tokens] if self.rhyme_masks is not None else None
            self._fold(k, self.tone_masks[:, tokens], classes)
            self.tokens[:, k] = tokens
        self.consumed += 1

    def _fold_fixed(self, k: int) -> None:
        ch = self.c.fixed[k]
        if self.c.fixed_ids.get(k) is not None:
            self.tokens[:, k] = self.c.fixed_ids[k]
        fits = fixed_char_fits(ch).to(self.device).unsqueeze(1).expand(-1, self.batch)
        classes = char_rhyme_classes(ch, self.c.system).to(self.device).unsqueeze(-1).expand(-1, -1, self.batch)
        self._fold(k, fits, classes)

    def _fold(self, k: int, fits: torch.Tensor, classes: torch.Tensor | None) -> None:
        """fits: bool [4, batch] (FREE, KNOWN, LEVEL, OBLIQUE); classes: bool [3, C, batch] of the characters."""
        self.alive &= fits.T.gather(1, self.needs(k))
        for variants, sets, t, _ in self.rhyme_at.get(k, ()):
            live = self.live[:, variants, sets, :] & classes[t].T.unsqueeze(1)  # [batch, r, C]
            self.live[:, variants, sets, :] = live
            self.alive[:, variants] &= live.any(-1)
        self.level[:, k] = fits[LEVEL]
