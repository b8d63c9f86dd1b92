"""Derive the ci tune templates (词牌) from the Song ci of the corpus: lingmao/verse/data/tunes.json.

    python scripts/build_tunes.py --corpus /path/to/corpus/poetry      # reads train.jsonl and test.jsonl there

Rules, applied to the records with `source == "songci"`:

1. Tune. The title is the tune name; a title "A・B" is tune B written under the name A (酹江月・念奴娇 is a
   念奴娇), so the part after the last "・" is the tune and the others are its aliases. 失调名 (tune lost) and
   titles with □ are skipped.
2. Shape. Each poem is cut into clauses at punctuation (`lingmao.verse.shape`); its shape is the sequence of
   clause lengths with a pause (，) or a stop (。) after each. The tune's template is its most frequent shape;
   tunes with fewer than --min-poems poems of that exact shape are left out.
3. Rhyme positions. For every two clause ends i, j of the template, the share of the template's poems whose
   characters at i and j rhyme: they share a section of the 词林正韵 (`lingmao.verse.cilin`, any tone). Clause
   ends linked by a share >= --rhyme-share (default 0.5; rhyming pairs reach about 0.9, others stay near 0.1)
   form the rhyme sets (connected components of two or more ends). A tune that changes rhyme (菩萨蛮) has
   several sets.
4. Tone of each rhyme position: the majority tone (平 or 仄) of its characters over the poems where the
   character has one tone only; a majority under --tone-share (default 0.75) leaves the position free ("").
5. Stanza break. The corpus writes no stanza marks, so the break is inferred: the second stanza of a
   two-stanza tune mostly repeats the first one's ending. Among the splits after a stop where each half has at
   least two clauses and 40% of the characters, the ones whose halves end with the same two or more clauses
   (lengths and marks) are candidates; failing any, every split after a stop is when the tune has 40 or more
   characters (one-stanza tunes are short). The most even split in characters wins; no candidate, one stanza.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lingmao.verse import cilin, pingshui  # noqa: E402
from lingmao.verse.shape import STOP, clauses, shape  # noqa: E402

OUT = REPO / "lingmao" / "verse" / "data" / "tunes.json"
SKIP = ("失调名",)


def read_ci(corpus: Path) -> dict[str, list[tuple[str, str]]]:
    """Tune -> [(title as written, text)] of every Song ci record in corpus/{train,test}.jsonl."""
    by_tune: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name in ("train.jsonl", "test.jsonl"):
        with open(corpus / name, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if record.get("source") != "songci":
                    continue
                title = (record.get("title") or "").strip()
                if not title or "□" in title or title in SKIP:
                    continue
                by_tune[title.split("・")[-1]].append((title, record["text"]))
    return by_tune


def stanza_break(parts: list[tuple[int, str]]) -> int | None:
    """Index of the first clause of the second stanza, or None for a one-stanza tune (rule 5)."""
    lengths = [n for n, _ in parts]
    total = sum(lengths)
    splits = [k for k in range(2, len(parts) - 1) if parts[k - 1][1] == STOP]

    def even(k: int) -> bool:
        return min(sum(lengths[:k]), total - sum(lengths[:k])) >= 0.4 * total

    def common_ending(k: int) -> int:
        first, second = parts[:k], parts[k:]
        n = 0
        while n < min(len(first), len(second)) and first[-1 - n] == second[-1 - n]:
            n += 1
        return n

    pool = [k for k in splits if even(k) and common_ending(k) >= 2]
    if not pool and total >= 40:
        pool = splits
    if not pool:
        return None
    return min(pool, key=lambda k: (abs(2 * sum(lengths[:k]) - total), k))


def rhyme_sets(ends: list[list[str]], share: float, tone_share: float) -> list[list[tuple[int, str]]]:
    """Rules 3 and 4: [[(clause index, tone), ...], ...] from the clause-end characters of each poem."""
    k = len(ends[0])
    sections = {ch: {s for s, _ in cilin.readings(ch)} for row in ends for ch in row}
    linked: dict[int, set[int]] = defaultdict(set)
    for i, j in itertools.combinations(range(k), 2):
        rate = sum(bool(sections[row[i]] & sections[row[j]]) for row in ends) / len(ends)
        if rate >= share:
            linked[i].add(j)
            linked[j].add(i)
    seen: set[int] = set()
    sets = []
    for start in sorted(linked):
        if start in seen:
            continue
        component, todo = set(), [start]
        while todo:
            i = todo.pop()
            if i not in component:
                component.add(i)
                todo.extend(linked[i] - component)
        seen |= component
        members = []
        for i in sorted(component):
            votes = Counter(next(iter(t)) for row in ends if len(t := pingshui.tones(row[i])) == 1)
            tone, n = votes.most_common(1)[0] if votes else ("", 0)
            members.append((i, tone if votes and n >= tone_share * sum(votes.values()) else ""))
        sets.append(members)
    return sets


def build(corpus: Path, min_poems: int, share: float, tone_share: float) -> dict:
    by_tune = read_ci(corpus)
    tunes = []
    for tune, records in sorted(by_tune.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        parsed = [clauses(text) for _, text in records]
        shapes = Counter(shape(c) for c in parsed)
        best, agreeing = shapes.most_common(1)[0]
        if agreeing < min_poems:
            continue
        poems = [c for c in parsed if shape(c) == best]
        parts = [(len(c), c.mark) for c in poems[0]]
        cut = stanza_break(parts)
        ends = [[c.text[-1] for c in poem] for poem in poems]
        text = "".join(f"{n}{m}" + ("|" if i + 1 == cut else "") for i, (n, m) in enumerate(parts))
        aliases = sorted({part for title, _ in records for part in title.split("・")[:-1]} - {tune})
        tunes.append({
            "name": tune, "aliases": aliases, "poems": len(records), "agreeing": agreeing, "shape": text,
            "rhymes": rhyme_sets(ends, share, tone_share),
        })
    names = {t["name"] for t in tunes}
    for t in tunes:
        t["aliases"] = [a for a in t["aliases"] if a not in names]
    return {
        "about": "Ci tune templates derived from the corpus's Song ci by scripts/build_tunes.py (rules: its docstring)",
        "settings": {"min_poems": min_poems, "rhyme_share": share, "tone_share": tone_share},
        "tunes": tunes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="folder with train.jsonl and test.jsonl")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--min-poems", type=int, default=20, help="poems of the template's exact shape needed")
    parser.add_argument("--rhyme-share", type=float, default=0.5)
    parser.add_argument("--tone-share", type=float, default=0.75)
    args = parser.parse_args(argv)
    for name in ("train.jsonl", "test.jsonl"):
        if not (args.corpus / name).is_file():
            print(f"error: {args.corpus / name}: file not found", file=sys.stderr)
            return 2
    table = build(args.corpus, args.min_poems, args.rhyme_share, args.tone_share)
    head = {k: v for k, v in table.items() if k != "tunes"}
    rows = ",\n".join(json.dumps(t, ensure_ascii=False) for t in table["tunes"])
    text = json.dumps(head, ensure_ascii=False, indent=1)[:-2] + ',\n "tunes": [\n' + rows + "\n ]\n}\n"
    json.loads(text)  # one tune a line, for readable diffs; still JSON
    args.out.write_text(text, encoding="utf-8")
    print(f"{len(table['tunes'])} tunes -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
