"""The verdict on a poem: its form (given or detected), format, rhyme and tones, each fault named; rates over many.

Shi (五绝 七绝 五律 七律): the lines must have the form's count and length. Rhyme (`rhyme=pingshui`): the rhyming
lines (the even lines, and line 1 when the pattern says so) end in one level-tone Pingshui group; with
`rhyme=modern`, the even lines end in one modern rhyme class. Tones: the poem is scored against each of the four
standard patterns (`lingmao.verse.meter`) in both modes and the best-fitting one is kept (fewest lenient faults
and rhyme misses, then fewest strict faults). Lenient faults at the even positions and line ends mean the
poem breaks 对/粘 or the 二四六 alternation ("对粘" below); the other lenient faults are 孤平, 三平尾, 三仄尾.
The strict faults that lenient checking allows are the poet's liberties at the free positions.

Repeated characters (shi, well-formed): a *use* of a character is a run of it at adjacent positions of one line,
so 叠字 (萧萧, 滚滚) is one use, deliberate reduplication. **重字**: a character with two uses or more anywhere in the
poem (静夜思's 明月 and 头 are 重字: it is a 古绝, and old-style verse allows them; regulated verse avoids them, and
the checker cannot tell deliberate parallelism from carelessness, so it flags every one). **重韵** (with a rhyme
mode): one character ending two or more of the rhyming lines of the best-fitting pattern. Characters are compared
in simplified form (華 and 华 are one character). Both are flagged, not counted against `regulated`; ci are not
judged for them (some tunes repeat by design: 长相思's 汴水流，泗水流).

Ci: the clauses must have the tune's lengths (`lingmao.verse.tunes`; punctuation varies between editions and is
not judged); each rhyme set of the tune must end in one section of the 词林正韵 with the tones the tune gives.
Ci have no tone pattern here.

Form detection (no form given): a title naming a tune whose template the poem matches -> that tune; else 4 or 8
lines of 5 or 7 characters -> that shi form; else the most frequent tune with exactly these clause lengths, when
they are not all alike; else no form.
With form=ci and no tune, the tune is the one the title names, else the one with the poem's shape.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from lingmao.verse import meter, pingshui, rhyme, tunes
from lingmao.verse.forms import CI, FORM_NAMES, FORMS
from lingmao.verse.han import is_han
from lingmao.verse.meter import Violation
from lingmao.verse.pingshui import PING
from lingmao.verse.shape import Clause, clauses, shape

_BY_SHAPE = {(chars, lines): form for form, (chars, lines) in FORMS.items()}  # (chars, lines) -> form


@dataclass
class RhymeMark:
    """A rhyming position: 1-based line (shi) or clause (ci), its character and the classes it can rhyme in."""

    line: int
    char: str
    classes: list[str]
    ok: bool
    shared: str | None = None  # the class its rhyme set settled on (None when this character is not in it)


@dataclass
class Repeat:
    """A character used in more than one place: its 1-based (line, char) positions, every character of each use."""

    char: str
    places: list[tuple[int, int]]
    rhyme: bool = False  # 重韵: the places are line ends that rhyme

    def __str__(self) -> str:
        if self.rhyme:
            lines = [str(line) for line, _ in self.places]
            return f"'{self.char}' ends lines " + ", ".join(lines[:-1]) + f" and {lines[-1]}"
        where = [f"line {line}, char {col}" for line, col in self.places]
        return f"'{self.char}' at " + ", ".join(where[:-1]) + f" and {where[-1]}"


@dataclass
class Verdict:
    text: str
    form: str | None  # wujue qijue wulv qilv ci, or None (no form)
    tune: str | None = None
    detected: bool = False
    shape: str = ""
    lines: list[str] = field(default_factory=list)
    format_problems: list[str] = field(default_factory=list)
    rhyme_mode: str = "pingshui"
    rhyme_class: list[str] = field(default_factory=list)  # the shared class of each rhyme set
    rhymes: list[RhymeMark] = field(default_factory=list)
    rhyme_problems: list[str] = field(default_factory=list)
    pattern: str | None = None
    violations: list[Violation] = field(default_factory=list)  # lenient faults
    liberties: list[Violation] = field(default_factory=list)  # strict faults lenient checking allows
    unknown: list[str] = field(default_factory=list)  # characters missing from the Pingshui table
    acrostic_problems: list[str] = field(default_factory=list)
    repeated_rhymes: list[Repeat] = field(default_factory=list)  # 重韵 (shi)
    repeated_chars: list[Repeat] = field(default_factory=list)  # 重字 (shi): outside 叠字

    @property
    def is_shi(self) -> bool:
        return self.form in FORMS

    @property
    def format_ok(self) -> bool | None:
        return None if self.form is None else not self.format_problems and not self.acrostic_problems

    @property
    def rhyme_ok(self) -> bool | None:
        if not self.format_ok or self.rhyme_mode == "none":
            return None
        return not self.rhyme_problems

    @property
    def tones_lenient(self) -> bool | None:
        return not self.violations if self.format_ok and self.is_shi else None

    @property
    def tones_strict(self) -> bool | None:
        return not self.violations and not self.liberties if self.format_ok and self.is_shi else None

    @property
    def rhythm_ok(self) -> bool | None:
        """对粘: no lenient fault at the fixed positions (even characters and line ends)."""
        return not any(v.kind == "tone" for v in self.violations) if self.format_ok and self.is_shi else None

    @property
    def distinct_rhymes(self) -> bool | None:
        """No 重韵: no character ends two rhyming lines (well-formed shi with a rhyme mode)."""
        if not self.format_ok or not self.is_shi or self.rhyme_mode == "none":
            return None
        return not self.repeated_rhymes

    @property
    def distinct_chars(self) -> bool | None:
        """No 重字: no character used in two places, 叠字 aside (well-formed shi)."""
        return not self.repeated_chars if self.format_ok and self.is_shi else None

    @property
    def regulated(self) -> bool | None:
        """Regulated verse (律): right format, rhyme and lenient tones."""
        if self.tones_lenient is None:
            return None
        return bool(self.tones_lenient and self.rhyme_ok is not False)

    def form_name(self) -> str:
        if self.form is None:
            return "no form"
        if self.form == CI:
            return f"词 {self.tune}"
        return f"{FORM_NAMES[self.form]} ({self.form})"

    def report(self) -> str:
        """Several lines: form, shape, verdicts, each fault."""
        head = self.form_name() + (" (detected)" if self.detected and self.form else "")
        if self.pattern:
            head += f", {self.pattern}"
        out = [f"{head}; shape {self.shape}"]
        if self.form is None:
            return out[0] + ": not checked"
        parts = [f"format {_yes(self.format_ok)}"]
        if self.rhyme_ok is not None:
            parts.append(f"rhyme {_yes(self.rhyme_ok)} ({' / '.join(self.rhyme_class) or '-'})")
        if self.tones_lenient is not None:
            parts.append(f"tones lenient {_yes(self.tones_lenient)}, strict {_yes(self.tones_strict)}")
        if self.distinct_chars is not None:
            parts.append(f"no 重韵 {_yes(self.distinct_rhymes)}, no 重字 {_yes(self.distinct_chars)}")
        out.append("  " + "; ".join(parts))
        out += [f"  format: {p}" for p in self.format_problems + self.acrostic_problems]
        if self.rhymes:
            out.append("  rhymes: " + " ".join(f"{m.line}:{m.char}({'/'.join(m.classes) or '?'})" for m in self.rhymes))
        out += [f"  rhyme: {p}" for p in self.rhyme_problems]
        out += [f"  重韵: {r}" for r in self.repeated_rhymes]
        out += [f"  重字: {r}" for r in self.repeated_chars]
        out += [f"  {v}" for v in self.violations]
        if self.liberties:
            out.append("  liberties (strict only): " + "; ".join(str(v) for v in self.liberties))
        if self.unknown:
            out.append(f"  not in the Pingshui table (fit any tone): {''.join(self.unknown)}")
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["violations"] = [str(v) for v in self.violations]
        data["liberties"] = [str(v) for v in self.liberties]
        for key in ("format_ok", "rhyme_ok", "tones_lenient", "tones_strict", "rhythm_ok", "regulated",
                    "distinct_rhymes", "distinct_chars"):
            data[key] = getattr(self, key)
        return data


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else "ok" if flag else "FAIL"


def _shi_form_of(parts: list[Clause]) -> str | None:
    lengths = {len(c) for c in parts}
    if len(lengths) != 1:
        return None
    return _BY_SHAPE.get((lengths.pop(), len(parts)))


def _lengths(parts: list[Clause]) -> tuple[int, ...]:
    return tuple(len(c) for c in parts)


def _tune_by_shape(parts: list[Clause]) -> tunes.Tune | None:
    """The most frequent tune with these clause lengths, if they are not all alike (six lines of seven
    characters are as likely an old-style shi as a 浣溪沙)."""
    target = _lengths(parts)
    if len(set(target)) < 2:
        return None
    return next((t for t in tunes.tunes() if tuple(n for n, _ in t.clauses) == target), None)


def detect(parts: list[Clause], title: str | None = None) -> tuple[str | None, tunes.Tune | None]:
    """(form, tune) by the rules of the module docstring."""
    named = tunes.find_tune(title) if title else None
    if named is not None and tuple(n for n, _ in named.clauses) == _lengths(parts):
        return CI, named
    shi = _shi_form_of(parts)
    if shi is not None:
        return shi, None
    by_shape = _tune_by_shape(parts)
    return (CI, by_shape) if by_shape is not None else (None, None)


def check(
    text: str,
    form: str | None = None,
    *,
    tune: str | tunes.Tune | None = None,
    title: str | None = None,
    rhyme_mode: str = "pingshui",
    acrostic: str = "",
) -> Verdict:
    """The verdict on one poem. `form` None: detected (see the module docstring); `tune` implies form=ci."""
    from lingmao.verse.forms import normalize_form

    parts = clauses(text)
    detected = False
    if tune is not None and form is None:
        form = CI
    form = normalize_form(form)
    tune_obj = (tune if isinstance(tune, tunes.Tune) else tunes.tune_named(tune)) if tune is not None else None
    if form is None:
        form, tune_obj = detect(parts, title)
        detected = True
    elif form == CI and tune_obj is None:
        tune_obj = tunes.find_tune(title) if title else None
        tune_obj = tune_obj or _tune_by_shape(parts)
        if tune_obj is None:
            form = None
    verdict = Verdict(text, form, tune_obj.name if tune_obj else None, detected, shape(parts),
                      [c.text for c in parts], rhyme_mode=rhyme_mode)
    verdict.unknown = sorted({ch for c in parts for ch in c.text if is_han(ch) and not pingshui.tones(ch)})
    if form is None:
        return verdict
    if form == CI:
        _check_ci(verdict, parts, tune_obj)
    else:
        _check_shi(verdict, parts, acrostic)
    return verdict


def _check_shi(verdict: Verdict, parts: list[Clause], acrostic: str) -> None:
    chars, n_lines = FORMS[verdict.form]
    lines = [c.text for c in parts]
    if len(lines) != n_lines:
        verdict.format_problems.append(f"{len(lines)} lines, {verdict.form} has {n_lines}")
    for i, line in enumerate(lines):
        if len(line) != chars or not all(is_han(ch) for ch in line):
            verdict.format_problems.append(f"line {i + 1} '{line}' is not {chars} Han characters")
    for i, ch in enumerate(acrostic):
        if i < len(lines) and not lines[i].startswith(ch):
            verdict.acrostic_problems.append(f"line {i + 1} does not start with '{ch}'")
    if verdict.format_problems:
        return
    best = None
    for p in meter.patterns(chars, n_lines):
        lenient = meter.tone_violations(lines, p, "lenient")
        strict = meter.tone_violations(lines, p, "strict")
        marks, shared, problems = _shi_rhyme(lines, p, verdict.rhyme_mode)
        key = (len(lenient) + len(problems), len(strict))
        if best is None or key < best[0]:
            best = (key, p, lenient, marks, shared, problems)
    _, p, lenient, marks, shared, problems = best
    verdict.pattern = p.name
    verdict.violations = lenient
    verdict.liberties = meter.liberties(lines, p)
    verdict.rhymes, verdict.rhyme_class, verdict.rhyme_problems = marks, shared, problems
    verdict.repeated_chars = repeated_chars(lines)
    verdict.repeated_rhymes = repeated_rhymes(lines, marks)


def repeated_chars(lines: list[str]) -> list[Repeat]:
    """重字: the characters of `lines` with two uses or more; a run of one character in a line (叠字) is one use."""
    uses: dict[str, int] = {}
    places: dict[str, list[tuple[int, int]]] = {}
    for i, line in enumerate(lines):
        for j, ch in enumerate(line):
            if not is_han(ch):
                continue
            key = pingshui.simplified(ch)
            if j == 0 or pingshui.simplified(line[j - 1]) != key:
                uses[key] = uses.get(key, 0) + 1
            places.setdefault(key, []).append((i + 1, j + 1))
    return [Repeat(lines[p[0][0] - 1][p[0][1] - 1], p) for key, p in places.items() if uses[key] > 1]


def repeated_rhymes(lines: list[str], marks: list[RhymeMark]) -> list[Repeat]:
    """重韵: the characters that end two or more of the rhyming lines (`marks`, 1-based lines of `lines`)."""
    ends: dict[str, list[RhymeMark]] = {}
    for m in marks:
        ends.setdefault(pingshui.simplified(m.char), []).append(m)
    return [Repeat(ms[0].char, [(m.line, len(lines[m.line - 1])) for m in ms], rhyme=True)
            for ms in ends.values() if len(ms) > 1]


def _shi_rhyme(lines: list[str], p: meter.Pattern, mode: str) -> tuple[list[RhymeMark], list[str], list[str]]:
    if mode == "none":
        return [], [], []
    rhyme_lines = p.rhyme_lines if mode == "pingshui" else tuple(range(1, len(lines), 2))
    tone = PING if mode == "pingshui" else None
    ends = [lines[i][-1] for i in rhyme_lines]
    result = rhyme.shared_class(ends, mode, [tone] * len(ends))
    marks = [
        RhymeMark(i + 1, ch, sorted(rhyme.classes(ch, mode, tone)), k not in result.misses,
                  result.shared if k not in result.misses else None)
        for k, (i, ch) in enumerate(zip(rhyme_lines, ends, strict=True))
    ]
    what = "level-tone Pingshui group" if mode == "pingshui" else "modern rhyme class"
    problems = [
        f"line {m.line} ends with '{m.char}', "
        + (f"not in {result.shared} ({'/'.join(m.classes) or f'no {what}'})" if result.shared else f"no {what}")
        for m in marks if not m.ok
    ]
    return marks, [result.shared] if result.shared else [], problems


def _check_ci(verdict: Verdict, parts: list[Clause], tune: tunes.Tune) -> None:
    want = tune.clauses
    if len(parts) != len(want):
        verdict.format_problems.append(f"{len(parts)} clauses, {tune.name} has {len(want)} ({tune.shape})")
    for i, (c, (length, _)) in enumerate(zip(parts, want, strict=False)):
        if len(c) != length or not all(is_han(ch) for ch in c.text):
            verdict.format_problems.append(f"clause {i + 1} '{c.text}' is not {length} Han characters")
    if verdict.format_problems or verdict.rhyme_mode == "none":
        return
    for members in tune.rhymes:
        chars = [parts[i].text[-1] for i, _ in members]
        tones = [t or None for _, t in members]
        result = rhyme.shared_class(chars, "cilin", tones)
        if result.shared:
            verdict.rhyme_class.append(result.shared)
        for k, ((i, t), ch) in enumerate(zip(members, chars, strict=True)):
            ok = k not in result.misses
            classes = sorted(rhyme.classes(ch, "cilin", t or None))
            verdict.rhymes.append(RhymeMark(i + 1, ch, classes, ok, result.shared if ok else None))
            if not ok:
                verdict.rhyme_problems.append(
                    f"clause {i + 1} ends with '{ch}', not a {t}声 rhyme in {result.shared or 'a shared section'}"
                )
    verdict.rhymes.sort(key=lambda m: m.line)


class Summary:
    """Counts over many verdicts, overall and per form; each rate is over the poems it applies to."""

    KEYS = ("format_ok", "rhyme_ok", "rhythm_ok", "tones_lenient", "tones_strict", "regulated", "distinct_rhymes",
            "distinct_chars")
    LABELS = {"format_ok": "format", "rhyme_ok": "rhyme", "rhythm_ok": "对粘", "tones_lenient": "tones lenient",
              "tones_strict": "tones strict", "regulated": "regulated", "distinct_rhymes": "no 重韵",
              "distinct_chars": "no 重字"}

    def __init__(self) -> None:
        self.poems = 0
        self.forms: Counter[str] = Counter()
        self.counts: dict[str, dict[str, list[int]]] = {}  # group ("all" or a form) -> key -> [passed, applicable]
        self.faults: Counter[str] = Counter()  # lenient fault kind -> poems with such a fault

    def add(self, verdict: Verdict) -> None:
        self.poems += 1
        group = "词" if verdict.form == CI else FORM_NAMES[verdict.form] if verdict.form else "no form"
        self.forms[group] += 1
        self.faults.update({_FAULT_NAMES[v.kind] for v in verdict.violations})
        for key in self.KEYS:
            value = getattr(verdict, key)
            if value is None:
                continue
            for name in ("all", group):
                passed, total = self.counts.setdefault(name, {}).setdefault(key, [0, 0])
                self.counts[name][key] = [passed + bool(value), total + 1]

    def rates(self, group: str = "all") -> dict[str, float]:
        """Label -> rate for `group` ("all" or a form name such as 七律)."""
        return {self.LABELS[k]: c[0] / c[1] for k, c in self.counts.get(group, {}).items() if c[1]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "poems": self.poems,
            "forms": dict(self.forms),
            "poems_with_lenient_fault": dict(self.faults),
            "rates": {group: self.rates(group) for group in self.counts},
            "counts": {
                group: {self.LABELS[k]: {"passed": c[0], "of": c[1]} for k, c in keys.items()}
                for group, keys in self.counts.items()
            },
        }

    def report(self) -> str:
        forms = ", ".join(f"{name} {n}" for name, n in self.forms.most_common())
        lines = [f"{self.poems} poems: {forms}"]
        groups = ["all"] + [g for g in ("五绝", "七绝", "五律", "七律", "词") if g in self.counts]
        if len(groups) == 2:
            groups = groups[:1]
        lines.append(_pad("", 16) + f"{'all':>24}" + "".join(" " * (9 - _width(g)) + g for g in groups[1:]))
        for key in self.KEYS:
            passed, total = self.counts.get("all", {}).get(key, [0, 0])
            if not total:
                continue
            row = _pad("  " + self.LABELS[key], 16) + f"{100 * passed / total:>8.2f}% ({passed:>6}/{total:>6})"
            for g in groups[1:]:
                p, t = self.counts[g].get(key, [0, 0])
                row += f"{100 * p / t:>8.1f}%" if t else f"{'-':>9}"
            lines.append(row)
        if self.faults:
            kinds = ", ".join(f"{kind} {n}" for kind, n in self.faults.most_common())
            lines.append(f"  poems with lenient faults, by kind: {kinds}")
        return "\n".join(lines)


_FAULT_NAMES = {"tone": "对粘 (fixed positions)", "孤平": "孤平", "三平尾": "三平尾", "三仄尾": "三仄尾"}


def _width(text: str) -> int:
    """Columns `text` takes in a terminal (wide East Asian characters take two)."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _width(text))
