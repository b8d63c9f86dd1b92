"""The training lines of a model, kept in its export, and the sampling constraint that refuses to copy one.

A *line* is a clause of a training document (`lingmao.verse.shape.clauses`: the characters between punctuation
marks or line breaks) of at least `MIN_CHARS` characters, all of them Han characters; shorter clauses (三字句 such
as 知否 or 争渡) are common phrases rather than lines one could copy. The documents are the training files as the
model read them (`data.template`, `data.convert`), validation documents included.

**The set.** Each distinct line becomes one 64-bit fingerprint: the top 46 bits of BLAKE2b-64 of the UTF-8 of the
line without its last character (its *prefix*), and below them, in 18 bits, the code point of its last character
(every Han code point is below 2^18). The fingerprints, sorted, are `lines.safetensors` in the export: 8 bytes a
line, about 610 KB for the bundled sample (76,000 lines) and 5.8 MB for the full corpus (730,000 lines).

**The question the sampler asks** at the last character of a line is "which characters would complete this
prefix into a training line?": the fingerprints between `hash << 18` and `(hash + 1) << 18`, one binary search
per sample. A false positive needs two prefixes with the same 46-bit hash: about one query in 10^8 for the full
corpus (N / 2^46), and then a character is refused that completes no training line. A Bloom filter of whole
lines would be smaller (1.2 bytes a line at 1% false positives) but can only answer "is this line in the set":
the sampler would test every character of the vocabulary at every line end, and refuse about 1% of them wrongly.

**The constraint** (`CopyFilter`): at the last character of each line of a verse form, every character that
completes a training line is excluded, for each sample separately. Should that leave a sample no character the
form allows (it takes a form that admits only a handful of characters there, all of them completing training
lines), the sample keeps the form's characters at that step and the step is counted in `fallbacks`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lingmao.errors import LingmaoError
from lingmao.verse.han import HAN_RANGES
from lingmao.verse.shape import IGNORED, PAUSES, STOPS

log = logging.getLogger(__name__)

MIN_CHARS = 4
CODE_BITS = 18  # every Han code point (lingmao.verse.han.HAN_RANGES) is below 2^18
FORMAT = "lingmao-lines-1"
LINES_FILE = "lines.safetensors"
TENSOR = "fingerprints"

StepMask = Callable[[int, torch.Tensor], torch.Tensor]


_HAN = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in HAN_RANGES)
_LINE = re.compile(f"[{_HAN}]{{{MIN_CHARS},}}")
_BREAKS = re.compile("[" + re.escape(PAUSES + STOPS) + "\n]")
_DROP = str.maketrans("", "", IGNORED)


def is_line(text: str) -> bool:
    """A clause that counts as a line: at least MIN_CHARS characters, all of them Han characters."""
    return _LINE.fullmatch(text) is not None


def text_lines(text: str) -> list[str]:
    """The lines of a text, in order: its clauses (as `lingmao.verse.shape.clauses` cuts them: at punctuation and
    line breaks, quotation marks and spaces left out) that count as lines."""
    return [c for c in (part.translate(_DROP) for part in _BREAKS.split(text)) if _LINE.fullmatch(c)]


def prefix_hash(prefix: str) -> int:
    """The 46-bit hash of a line's prefix (all but its last character)."""
    digest = hashlib.blake2b(prefix.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> CODE_BITS


def fingerprint(line: str) -> int:
    return (prefix_hash(line[:-1]) << CODE_BITS) | ord(line[-1])


class LineSet:
    """The fingerprints of a set of lines (see the module docstring), and where the lines came from."""

    def __init__(self, fingerprints: np.ndarray, files: Sequence[str] = ()) -> None:
        self.fingerprints = np.asarray(fingerprints, dtype=np.uint64)
        self.files = [str(f) for f in files]

    @classmethod
    def from_texts(cls, texts: Iterable[str], files: Sequence[str] = ()) -> LineSet:
        unique = {line for text in texts for line in text_lines(text)}
        values = np.fromiter((fingerprint(line) for line in unique), dtype=np.uint64, count=len(unique))
        return cls(np.unique(values), files)

    @classmethod
    def from_files(cls, files: Sequence[Path], source: Any) -> LineSet:
        """The lines of `files` read as training reads them (`source`: a `lingmao.data.TextSource`), without the
        conditioning headers."""
        plain = source.plain()
        texts = (text for path in files for text in plain.texts(Path(path)))
        return cls.from_texts(texts, [str(Path(f).resolve()) for f in files])

    def union(self, other: LineSet | None) -> LineSet:
        """The lines of both sets (a fine-tuned model must not copy its source's training lines either)."""
        if other is None:
            return self
        return LineSet(np.union1d(self.fingerprints, other.fingerprints), [*self.files, *other.files])

    def __len__(self) -> int:
        return len(self.fingerprints)

    def completions(self, prefix: str) -> list[str]:
        """The characters that make `prefix` + character a line of the set."""
        low = prefix_hash(prefix) << CODE_BITS
        high = low + (1 << CODE_BITS)  # 2^64 for the last hash: past every fingerprint
        a = int(np.searchsorted(self.fingerprints, np.uint64(low)))
        b = int(np.searchsorted(self.fingerprints, np.uint64(high))) if high < 1 << 64 else len(self.fingerprints)
        return [chr(int(v) & ((1 << CODE_BITS) - 1)) for v in self.fingerprints[a:b]]

    def __contains__(self, line: object) -> bool:
        if not isinstance(line, str) or not is_line(line):
            return False
        return line[-1] in self.completions(line[:-1])

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        meta = {"format": FORMAT, "min_chars": str(MIN_CHARS), "lines": str(len(self)),
                "files": json.dumps(self.files, ensure_ascii=False)}
        save_file({TENSOR: self.fingerprints}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> LineSet:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or int(meta.get("min_chars", -1)) != MIN_CHARS:
                    raise LingmaoError(f"{path}: not a line set of this version of lingmao ({meta.get('format')})")
                values = f.get_tensor(TENSOR)
        except (OSError, SafetensorError, ValueError, KeyError) as exc:
            raise LingmaoError(f"{path}: damaged line set ({str(exc).splitlines()[0]})") from None
        if values.dtype != np.uint64 or values.ndim != 1 or bool((values[1:] <= values[:-1]).any()):
            raise LingmaoError(f"{path}: damaged line set (not sorted 64-bit fingerprints)")
        return cls(values, json.loads(meta.get("files") or "[]"))


class CopyFilter:
    """Per sample, the characters allowed at each step of a form's layout: all, except at the last character of a
    line, where those completing a training line are refused (see the module docstring).

    `slots`: the form's layout (`lingmao.verse.forms.Slot`: `is_char`); `start`: how many slots the prompt fills;
    `prompt`: its text. Steps count from the first slot after the prompt, as in `FormConstraint.mask`.
    """

    def __init__(self, lines: LineSet, tok: Any, slots: Sequence[Any], start: int, prompt: str) -> None:
        self.lines, self.start, self.prompt = lines, start, prompt
        self.size = tok.get_vocab_size()
        self.pieces = [tok.id_to_token(i) or "" for i in range(self.size)]
        self.ids: dict[str, int] = tok.get_vocab()
        self.line_start: dict[int, int] = {}  # slot of a line's last character -> slot of its first
        first = None
        for k, slot in enumerate(slots):
            if not slot.is_char:
                first = None
                continue
            first = k if first is None else first
            if (k + 1 == len(slots) or not slots[k + 1].is_char) and k - first + 1 >= MIN_CHARS:
                self.line_start[k] = first
        self.refused = 0  # characters refused, summed over samples and lines
        self.fallbacks = 0  # (sample, line) pairs where the refusal was lifted: nothing else was allowed

    def allowed(self, step: int, generated: torch.Tensor) -> torch.Tensor | None:
        """bool [batch, V] (None: everything is allowed at this step)."""
        slot = self.start + step
        first = self.line_start.get(slot)
        if first is None:
            return None
        head = self.prompt[first : self.start] if first < self.start else ""
        columns = generated[:, max(first - self.start, 0) : step].tolist()
        allowed = torch.ones(generated.size(0), self.size, dtype=torch.bool)
        for row, tokens in enumerate(columns):
            prefix = head + "".join(self.pieces[t] for t in tokens)
            refused = [self.ids[ch] for ch in self.lines.completions(prefix) if ch in self.ids]
            if refused:
                allowed[row, refused] = False
                self.refused += len(refused)
        return allowed.to(generated.device)

    def restrict(self, base: StepMask) -> StepMask:
        """A step mask: `base`'s tokens less the refused ones (`base`'s alone for a sample that would have none)."""

        def step_mask(step: int, generated: torch.Tensor) -> torch.Tensor:
            allowed = base(step, generated)
            mine = self.allowed(step, generated)
            if mine is None:
                return allowed
            kept = allowed & mine
            empty = ~kept.any(-1)
            if bool(empty.any()):
                self.fallbacks += int(empty.sum())
                log.debug("step %d: every character the form allows completes a training line", step)
                kept[empty] = allowed[empty]
            return kept

        return step_mask


def copy_filter(
    lines: LineSet | None, constraint: Any, tok: Any, prompt: str, refuse: bool | None
) -> CopyFilter | None:
    """The copy filter for one generation: `refuse` None = on with a form when the model has a line set."""
    if refuse is None:
        refuse = constraint is not None and lines is not None
    if not refuse:
        return None
    if constraint is None:
        raise LingmaoError("refuse_copies=true: needs a verse form (form=wujue, qijue, wulv, qilv, or ci tune=NAME)")
    if lines is None:
        raise LingmaoError(
            "refuse_copies=true: this model has no set of training lines (an export written before lingmao kept "
            f"{LINES_FILE}); export it again from its run, or set refuse_copies=false"
        )
    return CopyFilter(lines, tok, constraint.slots, constraint.start, prompt)
