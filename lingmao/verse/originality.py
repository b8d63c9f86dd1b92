"""How much generated verse copies its training data: copied lines and the longest copied run.

- **Copied lines**: the share of a poem's lines (`lingmao.verse.lines`: clauses of at least four Han characters)
  that are lines of the training data, verbatim.
- **Longest copied run**: the longest piece of a poem's text, punctuation and line breaks included, that occurs
  in one training document (a whole copied couplet of 五言 is 12 characters: 5 + ， + 5 + 。).

The run is found by growing a length L from 1: the L-character windows of the poems that matched at L - 1 are
compared, by a 64-bit polynomial hash, with every L-character window of the training text, all at once with
numpy (a pass over the text per length: a fraction of a second for the full corpus's 5.7 million characters).
Windows of the text do not cross documents, nor those of a poem its end. A false match needs two different
windows with one hash: about one in 10^12 for the full corpus.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from lingmao.verse.lines import LineSet, text_lines

SEPARATOR = "\x00"  # between documents: in no poem
BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplication by it is a bijection modulo 2^64


def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)


class TrainingText:
    """The training documents as one array of code points, separated, for `longest_runs`."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.codes = _codes(SEPARATOR.join(t.replace(SEPARATOR, "") for t in texts))

    def longest_runs(self, poems: Sequence[str]) -> list[int]:
        """For each poem, the length of its longest piece that occurs in one training document."""
        best = np.zeros(len(poems), dtype=np.int64)
        if not poems or not len(self.codes):
            return best.tolist()
        lengths = np.array([len(p) for p in poems], dtype=np.int64)
        ends = np.repeat(np.cumsum(lengths), lengths)  # per position of the joined poems: where its poem ends
        owner = np.repeat(np.arange(len(poems)), lengths)
        query = _codes("".join(poems))
        text_hash = np.zeros(len(self.codes), dtype=np.uint64)
        query_hash = np.zeros(len(query), dtype=np.uint64)
        alive = np.arange(len(query))  # window starts whose piece of length L - 1 matched
        length = 0
        with np.errstate(over="ignore"):
            while alive.size and length < len(self.codes):
                length += 1
                text_hash = text_hash[: len(self.codes) - length + 1] * BASE + self.codes[length - 1 :]
                query_hash = query_hash[: len(query) - length + 1] * BASE + query[length - 1 :]
                alive = alive[alive + length <= ends[alive]]  # the window stays inside its poem
                if not alive.size:
                    break
                wanted = query_hash[alive]
                keys = np.unique(wanted)
                slot = np.minimum(np.searchsorted(keys, text_hash), len(keys) - 1)
                found = np.zeros(len(keys), dtype=bool)
                found[slot[keys[slot] == text_hash]] = True
                alive = alive[found[np.searchsorted(keys, wanted)]]
                best[owner[alive]] = length
        return best.tolist()


def copied_lines(poems: Sequence[str], lines: LineSet) -> tuple[int, int]:
    """(lines of `poems` that are in `lines`, lines of `poems`)."""
    all_lines = [line for poem in poems for line in text_lines(poem)]
    return sum(line in lines for line in all_lines), len(all_lines)
