"""Verse forms, acrostics and rhyme, as constraints on what may be sampled at each position.

A form fixes the whole layout of a poem: for a 五言绝句 (wujue) it is
`XXXXX，XXXXX。\\nXXXXX，XXXXX。<eos>`. Every position of that layout is a *slot* that accepts either a
Han character or one exact token (`，` `。` `\\n` `<eos>`). During decoding the logits of every token a
slot does not accept are set to -inf, so the output of a form is well-formed whatever the model.

Rhyme uses the modern Mandarin reading of each character (pypinyin, tone ignored), with finals grouped
into classes close to the 14 rhymes of 中华新韵 (see `RHYME_CLASSES`). It is a simplification: it is not
the Middle Chinese rhyme system of 平水韵, and polyphonic characters are judged by their most common
reading only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import torch
from tokenizers import Tokenizer

from lingmao.data.tokenizer import special_ids, tokenizer_fingerprint
from lingmao.errors import LingmaoError

log = logging.getLogger(__name__)

# name -> (characters per line, lines)
FORMS: dict[str, tuple[int, int]] = {"wujue": (5, 4), "qijue": (7, 4), "wulv": (5, 8), "qilv": (7, 8)}
FORM_ALIASES = {
    "五绝": "wujue", "五絕": "wujue", "七绝": "qijue", "七絕": "qijue", "五律": "wulv", "七律": "qilv",
}
COMMA, PERIOD, NEWLINE = "，", "。", "\n"

# Han characters: CJK Unified Ideographs, extension A, and extensions B-H (rare characters of old texts).
HAN_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2EBEF), (0x30000, 0x323AF),
)

# Modern pinyin finals (pypinyin Style.FINALS, strict: ü written v) -> rhyme class.
# Close to 中华新韵 (14 rhymes): a/ia/ua; o/uo/e; ie/üe; ai/uai; ei/ui; ao/iao; ou/iu; an/ian/uan/üan;
# en/in/un/ün; ang/iang/uang; eng/ing/ong/iong; i/-i/er/ü; u.
RHYME_CLASSES: dict[str, tuple[str, ...]] = {
    "a": ("a", "ia", "ua"),
    "e": ("o", "uo", "e", "ê"),
    "ie": ("ie", "ve"),
    "ai": ("ai", "uai"),
    "ei": ("ei", "uei", "ui"),
    "ao": ("ao", "iao"),
    "ou": ("ou", "iou", "iu"),
    "an": ("an", "ian", "uan", "van"),
    "en": ("en", "in", "uen", "un", "vn"),
    "ang": ("ang", "iang", "uang"),
    "eng": ("eng", "ing", "ueng", "ong", "iong"),
    "i": ("i", "er", "v"),
    "u": ("u",),
}
RHYME_GROUP_NAMES: tuple[str, ...] = tuple(RHYME_CLASSES)
_FINAL_TO_GROUP = {final: name for name, finals in RHYME_CLASSES.items() for final in finals}


def is_han(ch: str) -> bool:
    """True for a single Han character (CJK Unified Ideographs and their extensions)."""
    if len(ch) != 1:
        return False
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in HAN_RANGES)


def pinyin_final(ch: str) -> str | None:
    """The tone-less final of `ch`'s most common modern reading (pypinyin, ü as v), or None."""
    from pypinyin import Style, pinyin

    if not is_han(ch):
        return None
    readings = pinyin(ch, style=Style.FINALS, strict=True, errors="ignore")
    return (readings[0][0] or None) if readings and readings[0] else None


def rhyme_group(ch: str) -> str | None:
    """The rhyme class (a key of `RHYME_CLASSES`) of a Han character, or None when it has no reading."""
    final = pinyin_final(ch)
    return _FINAL_TO_GROUP.get(final) if final else None


def normalize_form(form: str | None) -> str | None:
    """'wujue', '五绝', ... -> 'wujue'; None / '' / 'none' -> None; anything else is an error."""
    if form in (None, "", "none", "free"):
        return None
    name = FORM_ALIASES.get(str(form), str(form).lower())
    if name not in FORMS:
        raise LingmaoError(f"form: '{form}' is not one of {', '.join(FORMS)} (or none)")
    return name


@dataclass(frozen=True)
class VocabTables:
    """Per-tokenizer tables, built once: which ids are Han characters, and the rhyme class of each."""

    han: torch.Tensor  # bool [V]
    rhyme: torch.Tensor  # long [V]: index into RHYME_GROUP_NAMES, -1 = none
    group_masks: torch.Tensor  # bool [groups, V]


_TABLES: dict[str, VocabTables] = {}


def vocab_tables(tok: Tokenizer) -> VocabTables:
    """Han mask and rhyme table of `tok`'s vocabulary (cached by the tokenizer's fingerprint)."""
    key = tokenizer_fingerprint(tok)
    if key not in _TABLES:
        _TABLES[key] = _build_tables(tok)
    return _TABLES[key]


def _build_tables(tok: Tokenizer) -> VocabTables:
    size = tok.get_vocab_size()
    han = torch.zeros(size, dtype=torch.bool)
    rhyme = torch.full((size,), -1, dtype=torch.long)
    index = {name: i for i, name in enumerate(RHYME_GROUP_NAMES)}
    for token, i in tok.get_vocab().items():
        if is_han(token):
            han[i] = True
            group = _cached_group(token)
            if group is not None:
                rhyme[i] = index[group]
    group_masks = torch.stack([rhyme == g for g in range(len(RHYME_GROUP_NAMES))])
    return VocabTables(han, rhyme, group_masks)


@lru_cache(maxsize=65536)
def _cached_group(ch: str) -> str | None:
    return rhyme_group(ch)


# ----------------------------------------------------------------------------------------------
# Layout and constraints
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """One position of a form: a Han character (line, column) or one exact token (`token` set)."""

    line: int
    column: int = -1
    token: str | None = None  # "，", "。", "\n" or "<eos>"

    @property
    def is_char(self) -> bool:
        return self.token is None


def layout(form: str) -> list[Slot]:
    """The slots of a form, ending with `<eos>`."""
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


class FormConstraint:
    """Masks for constrained decoding of one form, with optional acrostic and rhyme.

    `start` is the number of slots the prompt already fills; `mask(step, generated)` returns the
    tokens allowed at slot `start + step` as a bool tensor [batch, V], given the tokens generated so
    far ([batch, step]).
    """

    def __init__(
        self, tok: Tokenizer, form: str, prompt: str = "", acrostic: str = "", rhyme: bool = False
    ) -> None:
        self.form = form
        self.chars, self.lines = FORMS[form]
        self.slots = layout(form)
        self.tables = vocab_tables(tok)
        self.size = tok.get_vocab_size()
        self.rhyme = rhyme
        ids = {}
        for name in (COMMA, PERIOD, NEWLINE):
            i = tok.token_to_id(name)
            if i is None:
                shown = "\\n" if name == NEWLINE else name
                raise LingmaoError(
                    f"form={form}: the model's vocabulary has no '{shown}', so it cannot write verse in this layout"
                )
            ids[name] = i
        ids["<eos>"] = special_ids(tok)["eos"]
        self.token_ids = ids
        if not bool(self.tables.han.any()):
            raise LingmaoError(f"form={form}: the model's vocabulary has no Han characters")
        if len(acrostic) > self.lines:
            raise LingmaoError(
                f"acrostic: {len(acrostic)} characters but form={form} has only {self.lines} lines"
            )
        self.acrostic: dict[int, int] = {}
        for line, ch in enumerate(acrostic):
            i = tok.token_to_id(ch)
            if i is None:
                raise LingmaoError(f"acrostic: the character '{ch}' is not in the model's vocabulary")
            if not is_han(ch):
                raise LingmaoError(f"acrostic: '{ch}' is not a Han character")
            self.acrostic[line] = i
        if rhyme and self.rhyme_choices() == 0:
            raise LingmaoError("rhyme: no character of the model's vocabulary has a pinyin reading")
        self.start = self._fit_prompt(tok, prompt)
        self.prompt_rhyme_group: int | None = None
        if rhyme:
            self._check_prompt_rhyme(tok, prompt)

    def rhyme_choices(self) -> int:
        return int((self.tables.han & (self.tables.rhyme >= 0)).sum())

    @property
    def steps(self) -> int:
        """Tokens left to generate after the prompt, `<eos>` included."""
        return len(self.slots) - self.start

    def _fit_prompt(self, tok: Tokenizer, prompt: str) -> int:
        """Check that the prompt is the beginning of a poem of this form; return the slots it fills."""
        if len(prompt) >= len(self.slots):
            raise LingmaoError(
                f"prompt: {len(prompt)} characters, longer than a whole poem of form={self.form}"
            )
        for k, ch in enumerate(prompt):
            slot = self.slots[k]
            if slot.is_char:
                if not is_han(ch):
                    raise LingmaoError(
                        f"prompt: '{_show(ch)}' at position {k + 1} does not fit form={self.form} "
                        f"(line {slot.line + 1} needs {self.chars} Han characters)"
                    )
                forced = self.acrostic.get(slot.line) if slot.column == 0 else None
                if forced is not None and tok.token_to_id(ch) != forced:
                    raise LingmaoError(
                        f"prompt: line {slot.line + 1} starts with '{ch}' but the acrostic wants "
                        f"'{tok.id_to_token(forced)}'"
                    )
            elif ch != slot.token:
                raise LingmaoError(
                    f"prompt: '{_show(ch)}' at position {k + 1} does not fit form={self.form} "
                    f"('{_show(slot.token)}' expected there)"
                )
        return len(prompt)

    def _is_rhyme_slot(self, slot: Slot) -> bool:
        return self.rhyme and slot.is_char and slot.line % 2 == 1 and slot.column == self.chars - 1

    def _check_prompt_rhyme(self, tok: Tokenizer, prompt: str) -> None:
        for k, ch in enumerate(prompt):
            slot = self.slots[k]
            if not self._is_rhyme_slot(slot):
                continue
            i = tok.token_to_id(ch)
            group = int(self.tables.rhyme[i]) if i is not None else -1
            if group < 0:
                raise LingmaoError(f"rhyme: '{ch}' ending line {slot.line + 1} of the prompt has no known rhyme")
            if self.prompt_rhyme_group is None:
                self.prompt_rhyme_group = group
            elif group != self.prompt_rhyme_group:
                raise LingmaoError(
                    f"rhyme: '{ch}' ending line {slot.line + 1} of the prompt does not rhyme with line 2 "
                    f"(rhyme class '{RHYME_GROUP_NAMES[self.prompt_rhyme_group]}')"
                )

    def _first_rhyme_step(self) -> int | None:
        """Step (relative to `start`) at which the end of line 2 is generated, if it is generated."""
        for k, slot in enumerate(self.slots):
            if self._is_rhyme_slot(slot):
                return k - self.start if k >= self.start else None
        return None

    def mask(self, step: int, generated: torch.Tensor) -> torch.Tensor:
        """Allowed tokens at this step: bool [batch, V] on `generated`'s device."""
        batch, device = generated.size(0), generated.device
        slot = self.slots[self.start + step]
        if not slot.is_char:
            allowed = torch.zeros(self.size, dtype=torch.bool)
            allowed[self.token_ids[slot.token]] = True
            return allowed.to(device).expand(batch, -1)
        if slot.column == 0 and slot.line in self.acrostic:
            allowed = torch.zeros(self.size, dtype=torch.bool)
            allowed[self.acrostic[slot.line]] = True
            return allowed.to(device).expand(batch, -1)
        if not self._is_rhyme_slot(slot):
            return self.tables.han.to(device).expand(batch, -1)
        if self.prompt_rhyme_group is not None:
            return self.tables.group_masks[self.prompt_rhyme_group].to(device).expand(batch, -1)
        first = self._first_rhyme_step()
        if first is None or first == step:
            # Line 2 sets the rhyme: any Han character with a known reading.
            return (self.tables.han & (self.tables.rhyme >= 0)).to(device).expand(batch, -1)
        groups = self.tables.rhyme.to(device)[generated[:, first]]  # [batch], never -1 by construction
        return self.tables.group_masks.to(device)[groups]


def _show(ch: str | None) -> str:
    return "\\n" if ch == "\n" else str(ch)


def check_poem(text: str, form: str, acrostic: str = "", rhyme: bool = False) -> list[str]:
    """Problems of `text` as a poem of `form` (empty list = well-formed); used by tests and callers."""
    chars, lines = FORMS[normalize_form(form)]
    problems: list[str] = []
    couplets = text.split(NEWLINE)
    if len(couplets) != lines // 2:
        return [f"{len(couplets)} couplets, expected {lines // 2}"]
    verse_lines: list[str] = []
    for c, couplet in enumerate(couplets):
        if not couplet.endswith(PERIOD) or couplet.count(COMMA) != 1 or couplet.count(PERIOD) != 1:
            problems.append(f"couplet {c + 1} '{couplet}' is not 'line，line。'")
            continue
        verse_lines += couplet[:-1].split(COMMA)
    if problems:
        return problems
    for n, line in enumerate(verse_lines):
        if len(line) != chars or not all(is_han(ch) for ch in line):
            problems.append(f"line {n + 1} '{line}' is not {chars} Han characters")
    for n, ch in enumerate(acrostic):
        if n < len(verse_lines) and not verse_lines[n].startswith(ch):
            problems.append(f"line {n + 1} does not start with '{ch}'")
    if rhyme and not problems:
        ends = [verse_lines[n][-1] for n in range(1, lines, 2)]
        groups = {rhyme_group(ch) for ch in ends}
        if len(groups) != 1 or None in groups:
            problems.append(f"even lines end with {''.join(ends)}, rhyme classes {sorted(map(str, groups))}")
    return problems
