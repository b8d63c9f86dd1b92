"""Token caches: one folder per input file, written as the file is read, opened memory-mapped.

A file is read once (in chunks: memory stays bounded whatever its size) into

- `symbols.bin`: one small integer per token (uint16, or uint32 past 65,536 distinct symbols), an index
  into the file's own `alphabet.npy`;
- `alphabet.npy`: what each index stands for: a character or special-token marker (`text_symbols`), or,
  for tokenizers the vectorised encoder does not reproduce, a token id;
- `docs.bin`: per document its end offset, its characters and a stable hash of its text (the validation
  split is chosen by that hash, so it needs no second reading);
- `counts.npy`: how often each alphabet entry occurs (a tokenizer is trained from these, not from the text);
- `meta.json`: sizes, written last: a folder with it is complete.

Characters do not depend on the vocabulary, so a cache of characters serves every tokenizer: the ids of a
file are `table[symbols]`, `table` = the tokenizer's id of each alphabet entry (a few thousand lookups).
A folder is keyed by the file's content (SHA-256) and every setting that changes what is read from it (the
text settings, `data.on_bad_line`, and the OpenCC version when text is converted: see `entry_key`); adding or
changing one input file reads only that file. Folders are built under a temporary name and renamed into place,
so a half-written cache is never read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from lingmao.data.reading import ReadReport, TextSource
from lingmao.data.tokenizer import NUM_SYMBOLS, FastEncoder, text_symbols, tokenizer_fingerprint
from lingmao.errors import LingmaoError
from lingmao.io import file_lock, file_sha256

log = logging.getLogger(__name__)

FORMAT = 2  # 2: the noncharacters U+FDD4..U+FDD7 became header markers (lingmao.data.condition)
DOC_DTYPE = np.dtype([("end", "<i8"), ("chars", "<i8"), ("hash", "<u4")])
_WIDE = np.dtype("<u4")


def document_hashes(texts: Sequence[str]) -> np.ndarray:
    """A stable hash of each text, the CRC-32 of its UTF-8: the same text gets the same hash in any run."""
    return np.fromiter(map(zlib.crc32, map(str.encode, texts)), dtype=np.uint32, count=len(texts))


# ----------------------------------------------------------------------------------------------
# What a cache holds, once opened
# ----------------------------------------------------------------------------------------------
@dataclass
class TokenFile:
    """A tokenized file: token `i` is `table[symbols[i]]`; document `d` spans `doc_offsets[d]:doc_offsets[d+1]`."""

    symbols: np.ndarray
    table: np.ndarray
    doc_offsets: np.ndarray
    doc_chars: np.ndarray
    doc_hashes: np.ndarray
    path: Path | None = None

    @classmethod
    def from_ids(cls, ids: np.ndarray, doc_offsets: np.ndarray, doc_chars: np.ndarray | None = None) -> TokenFile:
        """Token ids held as they are (the table is the identity), e.g. for tools and tests."""
        ids = np.asarray(ids)
        doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
        lengths = np.diff(doc_offsets)
        chars = np.asarray(doc_chars if doc_chars is not None else np.maximum(lengths - 2, 0), dtype=np.int64)
        table = np.arange(int(ids.max()) + 1 if len(ids) else 1, dtype=np.int64)
        return cls(ids, table, doc_offsets, chars, np.zeros(len(lengths), dtype=np.uint32))

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.symbols)

    @property
    def num_chars(self) -> int:
        """Characters of the documents' text (for bits per character)."""
        return int(np.asarray(self.doc_chars).sum())

    def ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Token ids of `start:stop` (the whole file by default), as a new array."""
        return self.table[self.symbols[start:stop]]

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (e.g. for spawned loader workers) with the path of its mapped tokens, not the tokens."""
        state = dict(self.__dict__)
        symbols = self.symbols
        if isinstance(symbols, np.memmap) and symbols.filename is not None:
            state["symbols"] = _Mapped(symbols.filename, symbols.dtype.str, symbols.offset, symbols.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("symbols"), _Mapped):
            state["symbols"] = state["symbols"].open()
        self.__dict__.update(state)


@dataclass(frozen=True)
class _Mapped:
    """Where a memory-mapped array lives, to map it again in another process."""

    filename: str
    dtype: str
    offset: int
    shape: tuple[int, ...]

    def open(self) -> np.memmap:
        return np.memmap(self.filename, dtype=np.dtype(self.dtype), mode="r", offset=self.offset, shape=self.shape)


@dataclass
class CacheEntry:
    """One file's cache folder, opened: symbols and documents memory-mapped, alphabet and counts in memory."""

    path: Path
    folder: Path | None
    symbols: np.ndarray
    docs: np.ndarray
    alphabet: np.ndarray
    counts: np.ndarray
    meta: dict[str, Any]

    @property
    def of_ids(self) -> bool:
        """The alphabet holds token ids of one tokenizer rather than characters."""
        return self.meta["values"] == "ids"

    def token_file(self, encoder: FastEncoder | None) -> TokenFile:
        """The file's tokens under `encoder`'s vocabulary (None: the entry already holds token ids)."""
        if self.of_ids:
            table = self.alphabet
        elif encoder is None:
            raise ValueError("a cache of characters needs an encoder for its token ids")
        else:
            table = encoder.table[self.alphabet]
        offsets = np.concatenate([[0], np.asarray(self.docs["end"], dtype=np.int64)])
        return TokenFile(self.symbols, table, offsets, self.docs["chars"], self.docs["hash"], self.path)

    def symbol_counts(self) -> np.ndarray:
        """Occurrences of every symbol (NUM_SYMBOLS entries), for training a tokenizer."""
        total = np.zeros(NUM_SYMBOLS, dtype=np.int64)
        total[self.alphabet] = self.counts
        return total


def _open_entry(path: Path, folder: Path) -> CacheEntry | None:
    """The entry in `folder`, or None when it is missing, incomplete or damaged."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        if meta.get("format") != FORMAT:
            return None
        symbols = np.memmap(folder / "symbols.bin", dtype=dtype, mode="r")
        docs = np.memmap(folder / "docs.bin", dtype=DOC_DTYPE, mode="r")
        alphabet = np.load(folder / "alphabet.npy")
        counts = np.load(folder / "counts.npy")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (len(symbols), len(docs)) != (meta["tokens"], meta["documents"]) or len(alphabet) != len(counts) or \
            len(docs) == 0 or int(docs["end"][-1]) != len(symbols) or int(counts.sum()) != len(symbols):
        return None
    return CacheEntry(path, folder, symbols, docs, alphabet, counts, meta)


# ----------------------------------------------------------------------------------------------
# Writing one file's cache as it is read
# ----------------------------------------------------------------------------------------------
class _EntryWriter:
    """Appends chunks of values (symbols or token ids) to a cache folder, growing the file's alphabet."""

    def __init__(self, folder: Path, value_space: int) -> None:
        self.folder = folder
        self.local = np.full(value_space, -1, dtype=np.int32)  # value -> alphabet index
        self.alphabet: list[np.ndarray] = []
        self.size = 0
        self.counts = np.zeros(0, dtype=np.int64)
        self.dtype = np.dtype("<u2")
        self.tokens = 0
        self.documents = 0
        self.chars = 0
        self.symbols_out = open(folder / "symbols.bin", "wb")
        self.docs_out = open(folder / "docs.bin", "wb")

    def add(self, values: np.ndarray, lengths: np.ndarray, texts: Sequence[str],
            hashes: np.ndarray | None = None) -> None:
        local = self.local[values]
        if local.min() < 0:  # symbols this file has not had yet
            unseen = values[local < 0]
            # Few: sort them; many (the first chunk): count them over the whole value range.
            new = np.unique(unseen) if len(unseen) < 1 << 16 else np.flatnonzero(
                np.bincount(unseen, minlength=len(self.local)))
            self.local[new] = np.arange(self.size, self.size + len(new))
            self.alphabet.append(new)
            self.size += len(new)
            local = self.local[values]
            if self.size > 1 << 16 and self.dtype != _WIDE:
                self._widen()
            self.counts = np.concatenate([self.counts, np.zeros(self.size - len(self.counts), dtype=np.int64)])
        self.counts += np.bincount(local, minlength=self.size)
        self.symbols_out.write(local.astype(self.dtype))
        docs = np.empty(len(lengths), dtype=DOC_DTYPE)
        docs["end"] = self.tokens + np.cumsum(lengths)
        docs["chars"] = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        docs["hash"] = document_hashes(texts) if hashes is None else hashes
        self.docs_out.write(docs)
        self.tokens += int(lengths.sum())
        self.documents += len(lengths)
        self.chars += int(docs["chars"].sum())

    def _widen(self) -> None:
        """More than 65,536 distinct symbols: rewrite what is written as uint32 and go on in uint32."""
        self.symbols_out.close()
        narrow = self.folder / "symbols.bin"
        wide = self.folder / "symbols.wide"
        with open(narrow, "rb") as src, open(wide, "wb") as dst:
            for block in iter(lambda: src.read(1 << 24), b""):
                dst.write(np.frombuffer(block, dtype=self.dtype).astype(_WIDE).tobytes())
        os.replace(wide, narrow)
        self.dtype = _WIDE
        self.symbols_out = open(narrow, "ab")

    def finish(self, meta: dict[str, Any]) -> None:
        for f in (self.symbols_out, self.docs_out):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        alphabet = np.concatenate(self.alphabet) if self.alphabet else np.zeros(0, dtype=np.int64)
        np.save(self.folder / "alphabet.npy", alphabet.astype(np.int64))
        np.save(self.folder / "counts.npy", self.counts)
        meta.update(format=FORMAT, dtype=self.dtype.str, tokens=self.tokens, documents=self.documents,
                    chars=self.chars, alphabet=self.size)
        (self.folder / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")

    def abort(self) -> None:
        self.symbols_out.close()
        self.docs_out.close()


def _build(path: Path, source: TextSource, folder: Path, tokenizer: Tokenizer | None,
           on_disk: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Read `path` into a new cache folder `folder` (characters, or the ids of `tokenizer`); its meta."""
    started = time.perf_counter()
    report = ReadReport()
    writer = _EntryWriter(folder, NUM_SYMBOLS if tokenizer is None else tokenizer.get_vocab_size())
    try:
        for texts in source.chunks(path, report, on_disk):
            if not texts:
                continue
            if tokenizer is None:
                values, lengths = text_symbols(texts, source.headed)
            elif source.headed:
                raise LingmaoError("data.condition needs a character tokenizer; data.tokenizer_path is of another kind")
            else:
                encodings = tokenizer.encode_batch(texts)
                lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
                values = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64, count=int(lengths.sum()))
            # The hash that picks validation documents is the text's, without its header: the same poem under
            # two titles is on one side of the split.
            writer.add(values, lengths, texts, document_hashes(source.bodies(texts)) if source.headed else None)
    except BaseException:
        writer.abort()
        raise
    if report.skipped:
        log.warning("%s: skipped %d bad line(s), first: %s", path, report.skipped, "; ".join(report.first_skipped))
    if report.documents == 0:
        writer.abort()
        raise LingmaoError(f"{path}: no documents (the file is empty or every line was skipped)")
    seconds = time.perf_counter() - started
    meta = {"source": str(path), "values": "symbols" if tokenizer is None else "ids", "skipped": report.skipped,
            "bytes": report.bytes_read, "seconds": round(seconds, 3)}
    writer.finish(meta)
    return meta


def _install(folder: Path, tmp: Path) -> None:
    """Rename the finished `tmp` folder to `folder`, replacing a damaged one (renames are atomic)."""
    for f in tmp.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(folder, old)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process installed the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Many files: find, build what is missing (in parallel), open
# ----------------------------------------------------------------------------------------------
def conversion_version(convert: str | None) -> str:
    """What converts the text, with its version ('' when nothing does): another OpenCC release may convert
    some characters otherwise, so it is part of every cache key that converted text goes into."""
    if convert in (None, "", "none"):
        return ""
    try:
        return f"opencc {importlib.metadata.version('opencc')}"
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a dependency; an unusual install
        import opencc

        return f"opencc {getattr(opencc, '__version__', 'unknown')}"


def entry_key(path: Path, source: TextSource, tokenizer: Tokenizer | None) -> str:
    """Everything the cache of `path` depends on: its bytes, how documents are made of it (key or template,
    .txt mode), what is done with bad lines (skipped, or an error that must be raised again), the conversion and
    its version, the tokenizer (for caches of token ids) and the cache format."""
    values = "symbols" if tokenizer is None else f"ids:{tokenizer_fingerprint(tokenizer)}"
    parts = (file_sha256(path), source.key(path), source.on_bad_line, conversion_version(source.convert), values,
             FORMAT)
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:20]


def _entry_folder(path: Path, source: TextSource, cache_dir: Path, tokenizer: Tokenizer | None) -> Path:
    return cache_dir / f"{path.name}.{entry_key(path, source, tokenizer)}"


def _build_into(path: Path, source: TextSource, folder: Path, tokenizer: Tokenizer | None,
                on_disk: Callable[[int], None] | None) -> dict[str, Any]:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        meta = _build(path, source, tmp, tokenizer, on_disk)
        _install(folder, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


_progress_counter: Any = None  # bytes read by all workers (a shared value), set in each worker


def _init_worker(counter: Any) -> None:
    global _progress_counter
    _progress_counter = counter


def _build_in_worker(path: Path, source: TextSource, folder: Path, tokenizer: Tokenizer | None) -> dict[str, Any]:
    done = [0]

    def on_disk(position: int) -> None:
        with _progress_counter.get_lock():
            _progress_counter.value += position - done[0]
        done[0] = position

    return _build_into(path, source, folder, tokenizer, on_disk)


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts at once; the workers only read files and run numpy. Elsewhere, spawn.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _log_built(path: Path, meta: dict[str, Any], level: int = logging.INFO) -> None:
    size = path.stat().st_size
    log.log(level, "tokenized %s: %d documents, %d tokens in %.1f s (%.1f MB/s)", path, meta["documents"],
            meta["tokens"], meta["seconds"], size / 1e6 / max(meta["seconds"], 1e-9))


def open_caches(paths: Sequence[Path], source: TextSource, cache_dir: str | Path | None,
                tokenizer: Tokenizer | None = None, workers: int = 0) -> list[CacheEntry]:
    """The cache entry of every file, reading (in parallel with `workers` processes) the files that have none.

    `tokenizer=None` caches characters (any character tokenizer can use them); a tokenizer makes caches of its
    token ids (for tokenizers the vectorised encoder does not reproduce). Without `cache_dir` the entries are
    built in a temporary folder and held in memory.
    """
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="lingmao-tokens-") as tmp:
            return [_in_memory(e) for e in open_caches(paths, source, tmp, tokenizer, 0)]
    cache_dir = Path(cache_dir)
    folders = [_entry_folder(p, source, cache_dir, tokenizer) for p in paths]
    found = [_open_entry(p, f) for p, f in zip(paths, folders, strict=True)]
    missing = [(p, f) for p, f, e in zip(paths, folders, found, strict=True) if e is None]
    hits = [e for e in found if e is not None]
    if len(paths) == 1 and hits:
        log.info("token cache hit for %s: %s (%d tokens)", paths[0], folders[0], len(hits[0].symbols))
    elif hits:
        log.info("token cache hit for %d of %d files", len(hits), len(paths))
    if missing:
        with file_lock(cache_dir.with_name(cache_dir.name + ".lock")):  # one process builds, the others wait
            missing = [(p, f) for p, f in missing if _open_entry(p, f) is None]
            for p, f in missing:
                if f.exists():
                    log.warning("token cache for %s is unreadable; tokenizing again", p)
            if missing:
                _build_missing(missing, source, tokenizer, workers)
    entries = []
    for p, f, e in zip(paths, folders, found, strict=True):
        entry = e or _open_entry(p, f)
        if entry is None:  # pragma: no cover - written a moment ago
            raise LingmaoError(f"{f}: the token cache just written cannot be read; is {cache_dir} writable?")
        entries.append(entry)
    return entries


def _build_missing(missing: list[tuple[Path, Path]], source: TextSource, tokenizer: Tokenizer | None,
                   workers: int) -> None:
    total = sum(p.stat().st_size for p, _ in missing)
    name = missing[0][0].name if len(missing) == 1 else f"{len(missing)} files"
    # A bar in MB/s on a terminal (tqdm turns itself off when stderr is not one); .gz counts compressed bytes.
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {name}", disable=None, leave=False,
               mininterval=0.5)
    level = logging.INFO if len(missing) == 1 else logging.DEBUG  # many files: one line for all of them
    started = time.perf_counter()
    try:
        if workers > 0 and len(missing) > 1:
            _build_parallel(missing, source, tokenizer, workers, bar, level)
        else:
            before = 0
            for path, folder in missing:
                meta = _build_into(path, source, folder, tokenizer, lambda pos, b=before: bar.update(b + pos - bar.n))
                before += path.stat().st_size
                bar.update(before - bar.n)
                _log_built(path, meta, level)
    finally:
        bar.close()
    if len(missing) > 1:
        seconds = time.perf_counter() - started
        processes = min(workers, len(missing)) if workers else 1
        log.info("tokenized %s: %.1f MB in %.1f s (%.1f MB/s, %d process%s)", name, total / 1e6, seconds,
                 total / 1e6 / max(seconds, 1e-9), processes, "es" if processes > 1 else "")


def _build_parallel(missing: list[tuple[Path, Path]], source: TextSource, tokenizer: Tokenizer | None,
                    workers: int, bar: tqdm, level: int) -> None:
    ctx = _pool_context()
    counter = ctx.Value("q", 0)
    with ProcessPoolExecutor(min(workers, len(missing)), mp_context=ctx, initializer=_init_worker,
                             initargs=(counter,)) as pool:
        # Largest first, so one big file does not start last.
        order = sorted(missing, key=lambda pf: -pf[0].stat().st_size)
        pending: dict[Future, Path] = {pool.submit(_build_in_worker, p, source, f, tokenizer): p for p, f in order}
        while pending:
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            bar.update(counter.value - bar.n)
            for future in done:
                path = pending.pop(future)
                try:
                    _log_built(path, future.result(), level)
                except BaseException:
                    for other in pending:
                        other.cancel()
                    raise


def _in_memory(entry: CacheEntry) -> CacheEntry:
    return CacheEntry(entry.path, None, np.array(entry.symbols), np.array(entry.docs), entry.alphabet, entry.counts,
                      entry.meta)


def tokenize_files(paths: Sequence[Path], tokenizer: Tokenizer, source: TextSource, cache_dir: str | Path | None,
                   workers: int = 0) -> list[TokenFile]:
    """The tokens of every file under `tokenizer` (vectorised when it is a character tokenizer of lingmao's)."""
    encoder = FastEncoder.for_tokenizer(tokenizer)
    entries = open_caches(paths, source, cache_dir, None if encoder else tokenizer, workers)
    return [e.token_file(encoder) for e in entries]


def load_or_tokenize(path: str | Path, tokenizer: Tokenizer, source: TextSource,
                     cache_dir: str | Path | None) -> TokenFile:
    """Tokenize one file, or open its cache (memory-mapped) when file and text settings match."""
    path = Path(path)
    if not path.is_file():
        next(iter(source.texts(path)), None)  # raises the precise error (missing, directory, ...)
    return tokenize_files([path], tokenizer, source, cache_dir)[0]
