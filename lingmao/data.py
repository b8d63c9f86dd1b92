"""JSONL corpora -> flat token arrays (cached on disk) -> fixed-length training windows.

One file becomes one flat array of token ids (`<bos> doc <eos> <bos> doc <eos> ...`) plus the
offsets where documents start. Both are cached as .npy files keyed by the file's content and the
tokenizer, and opened with memory mapping, so a second run skips tokenization and memory stays at
about one small integer per token. A training window is index arithmetic over that array: no
per-sample Python lists, whatever the stride.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import string
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from omegaconf import MISSING
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from lingmao.checks import check_fields, choice, number
from lingmao.errors import LingmaoError
from lingmao.io import atomic_write, atomic_write_bytes
from lingmao.tokenizer import load_tokenizer, save_tokenizer, special_ids, tokenizer_fingerprint, train_tokenizer

log = logging.getLogger(__name__)

CONVERSIONS = ("none", "t2s", "s2t")
MAX_SHOWN_BAD_LINES = 5


@dataclass
class DataConfig:
    """Where the text comes from, how it becomes tokens, and the windows a model trains on."""

    KEY: ClassVar[str] = "data"
    name: str = "jsonl"
    train_file: Any = MISSING
    test_file: str | None = None
    tokenizer_path: str | None = None  # null = <paths.cache_dir>/tokenizers/<hash of train file and settings>.json
    context_length: int = number(128, ge=1)
    batch_size: int = number(32, ge=1)
    stride: int | None = number(None, ge=1)  # step between training windows (null = context_length)
    eval_stride: int | None = number(None, ge=1)  # the same for evaluation windows
    packing: bool = True  # join documents with <eos>/<bos>; false = windows inside single documents only
    text_key: str = "text"
    template: str | None = None  # e.g. "{title}\n{text}" to train with titles
    convert: str = choice("none", *CONVERSIONS)  # OpenCC, before tokenizing and when generating
    on_bad_line: str = choice("error", "error", "skip")
    min_frequency: int = number(1, ge=1)  # characters seen fewer times become <unk>
    num_workers: int = number(0, ge=0)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.template:
            check_template(self.template)
        for key in ("train_file", "test_file"):
            check_input_file(getattr(self, key), f"data.{key}")
        tok = self.tokenizer_path
        if tok and Path(tok).is_dir():
            raise LingmaoError(
                f"data.tokenizer_path: {tok}: is a directory, expected a tokenizer.json file (or a new path)"
            )


def check_template(template: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise LingmaoError(
            f"data.template={template!r}: not a valid template ({exc}); write fields as {{title}}"
        ) from None
    if any(f == "" or f.split(".")[0].split("[")[0].isdigit() for f in fields):
        raise LingmaoError(
            f"data.template={template!r}: use named fields such as {{title}} and {{text}}, not {{}} or {{0}}"
        )


def check_input_file(name: str | None, key: str) -> None:
    """A file the config names must exist as a readable, non-empty file (nothing is read from it here)."""
    if not name:
        return
    path = Path(name)
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise LingmaoError(f"{key}: {path}: file not found{where}")
    if path.is_dir():
        raise LingmaoError(f"{key}: {path}: is a directory, expected a .jsonl or .jsonl.gz file")
    if not os.access(path, os.R_OK):
        raise LingmaoError(f"{key}: {path}: permission denied")
    if path.stat().st_size == 0:
        raise LingmaoError(f"{key}: {path}: the file is empty")


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def make_converter(convert: str):
    """Return a str->str function for `data.convert` (none, t2s, s2t) using OpenCC."""
    if convert in (None, "none"):
        return None
    if convert not in CONVERSIONS:
        raise LingmaoError(f"data.convert: '{convert}' is not one of {', '.join(CONVERSIONS)}")
    try:
        import opencc
    except ImportError:  # pragma: no cover - opencc is a dependency
        raise LingmaoError("data.convert needs the 'opencc' package: pip install opencc") from None
    return opencc.OpenCC(f"{convert}").convert


def _open_lines(path: Path) -> Iterator[bytes]:
    if not path.exists():
        raise LingmaoError(f"{path}: file not found")
    if path.is_dir():
        raise LingmaoError(f"{path}: is a directory, expected a .jsonl or .jsonl.gz file")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                yield from f
        else:
            with open(path, "rb") as f:
                yield from f
    except PermissionError:
        raise LingmaoError(f"{path}: permission denied") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise LingmaoError(f"{path}: damaged gzip file ({exc}); re-create or re-download it") from None
    except OSError as exc:
        raise LingmaoError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


@dataclass
class ReadReport:
    """What reading a file found: documents read and lines skipped (with `on_bad_line: skip`)."""

    documents: int = 0
    skipped: int = 0
    bytes_read: int = 0
    first_skipped: list[str] | None = None


def iter_documents(
    path: str | Path,
    text_key: str = "text",
    template: str | None = None,
    on_bad_line: str = "error",
    report: ReadReport | None = None,
) -> Iterator[str]:
    """Yield the text of each JSON line of `path` (.jsonl or .jsonl.gz).

    `template` (e.g. "{title}\\n{text}") builds the text from several fields; by default it is the
    value of `text_key`. A bad line raises `LingmaoError("file:line: what")`, or with
    `on_bad_line="skip"` is counted in `report` and skipped. Blank lines are ignored; a BOM and
    Windows line endings are accepted.
    """
    path = Path(path)
    report = report if report is not None else ReadReport()
    report.first_skipped = report.first_skipped or []
    if on_bad_line not in ("error", "skip"):
        raise LingmaoError(f"data.on_bad_line: '{on_bad_line}' is not one of error, skip")

    def bad(lineno: int, what: str) -> None:
        where = f"{path}:{lineno}: " + what.replace("\r", "\\r").replace("\n", "\\n")  # one line, always
        if on_bad_line == "error":
            raise LingmaoError(f"{where} (set data.on_bad_line=skip to skip such lines)")
        report.skipped += 1
        if len(report.first_skipped) < MAX_SHOWN_BAD_LINES:
            report.first_skipped.append(where)

    for lineno, raw in enumerate(_open_lines(path), start=1):
        report.bytes_read += len(raw)
        if raw.startswith(b"\xef\xbb\xbf"):  # a BOM: at the start of the file, or of files joined with cat
            raw = raw[3:]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad(lineno, f"not UTF-8 (byte {exc.start}); convert the file, e.g. iconv -f GB18030 -t UTF-8")
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            bad(lineno, f"invalid JSON ({exc.msg}, column {exc.colno})")
            continue
        except (ValueError, RecursionError) as exc:  # a number too long, nesting too deep
            bad(lineno, f"invalid JSON ({str(exc).split(';')[0]})")
            continue
        if not isinstance(record, dict):
            bad(lineno, f"expected a JSON object with a '{text_key}' field, got {type(record).__name__}")
            continue
        if template:
            try:
                text = template.format(**record)
            except KeyError as exc:
                bad(lineno, f"key {exc} of data.template '{template}' is missing")
                continue
            except (IndexError, ValueError, AttributeError, TypeError) as exc:
                bad(lineno, f"data.template '{template}' does not apply to this line ({exc})")
                continue
        else:
            if text_key not in record:
                bad(lineno, f"key '{text_key}' is missing (data.text_key; keys here: {', '.join(list(record)[:8])})")
                continue
            text = record[text_key]
            if not isinstance(text, str):
                bad(lineno, f"key '{text_key}' is a {type(text).__name__}, not a string")
                continue
        if "\\u" in line and not _encodable(text):
            bad(lineno, "the text holds an unpaired surrogate escape (\\ud800-\\udfff), which is not a character")
            continue
        report.documents += 1
        yield text.replace("\r\n", "\n")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Tokenizing and caching
# ----------------------------------------------------------------------------------------------
@dataclass
class TokenFile:
    """A tokenized file: flat ids and the start offset of every document (len = documents + 1)."""

    tokens: np.ndarray
    doc_offsets: np.ndarray
    num_chars: int | None = None  # characters of the tokenized text (for bits per character)

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class TextSource:
    """How the text of a file is made: key or template, conversion, bad-line policy."""

    def __init__(self, text_key: str = "text", template: str | None = None, convert: str = "none",
                 on_bad_line: str = "error") -> None:
        self.text_key = text_key
        self.template = template or None
        self.convert = convert or "none"
        self.on_bad_line = on_bad_line
        self._converter = make_converter(self.convert)

    def key(self) -> str:
        return json.dumps([self.text_key, self.template, self.convert])

    def texts(self, path: Path, report: ReadReport | None = None) -> Iterator[str]:
        docs = iter_documents(path, self.text_key, self.template, self.on_bad_line, report)
        if self._converter is None:
            return docs
        return (self._converter(t) for t in docs)


def tokenize_file(path: Path, tok: Tokenizer, source: TextSource, chunk_docs: int = 8192) -> TokenFile:
    """Encode every document of `path` as `<bos> text <eos>` into one flat array."""
    dtype = token_dtype(tok.get_vocab_size())
    report = ReadReport()
    pieces: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    batch: list[str] = []
    started = time.perf_counter()
    # A bar in MB/s on a terminal (tqdm turns itself off when stderr is not one); sizes of .gz are uncompressed.
    progress = tqdm(
        total=path.stat().st_size if path.is_file() and path.suffix != ".gz" else None, unit="B", unit_scale=True,
        desc=f"tokenizing {path.name}", disable=None, leave=False, mininterval=0.5,
    )

    def flush() -> None:
        progress.update(report.bytes_read - progress.n)
        encs = tok.encode_batch(batch)
        lens = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        flat = np.fromiter((i for e in encs for i in e.ids), dtype=dtype, count=int(lens.sum()))
        pieces.append(flat)
        lengths.append(lens)
        batch.clear()

    num_chars = 0
    for text in source.texts(path, report):
        batch.append(text)
        num_chars += len(text)
        if len(batch) >= chunk_docs:
            flush()
    if batch:
        flush()
    progress.close()
    _report_skipped(path, report)
    if report.documents == 0:
        raise LingmaoError(f"{path}: no documents (the file is empty or every line was skipped)")
    tokens = np.concatenate(pieces)
    offsets = np.zeros(report.documents + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths), out=offsets[1:])
    seconds = time.perf_counter() - started
    log.info(
        "tokenized %s: %d documents, %d tokens in %.1f s (%.1f MB/s)",
        path, report.documents, len(tokens), seconds, path.stat().st_size / 1e6 / max(seconds, 1e-9),
    )
    return TokenFile(tokens, offsets, num_chars)


def _report_skipped(path: Path, report: ReadReport) -> None:
    if report.skipped:
        log.warning("%s: skipped %d bad line(s), first: %s", path, report.skipped, "; ".join(report.first_skipped))


def load_or_tokenize(path: str | Path, tok: Tokenizer, source: TextSource, cache_dir: str | Path | None) -> TokenFile:
    """Tokenize `path`, or open its cached arrays (memory-mapped) when file and tokenizer match."""
    path = Path(path)
    if cache_dir is None:
        return tokenize_file(path, tok, source)
    if not path.is_file():
        next(iter_documents(path), None)  # raises the precise error (missing, directory, ...)
    key = hashlib.sha256(
        f"{_file_digest(path)}|{tokenizer_fingerprint(tok)}|{source.key()}".encode()
    ).hexdigest()[:20]
    stem = Path(cache_dir) / f"{path.name}.{key}"
    tokens_path, offsets_path = Path(f"{stem}.tokens.npy"), Path(f"{stem}.docs.npy")
    chars_path = Path(f"{stem}.chars")
    if tokens_path.exists() and offsets_path.exists():
        try:
            tokens = np.load(tokens_path, mmap_mode="r")
            offsets = np.load(offsets_path, mmap_mode="r")
            num_chars = int(chars_path.read_text())
            if offsets[-1] == len(tokens):
                log.info("token cache hit for %s: %s (%d tokens)", path, tokens_path, len(tokens))
                return TokenFile(tokens, offsets, num_chars)
        except (ValueError, OSError):
            pass
        log.warning("token cache for %s is unreadable; tokenizing again", path)
    tf = tokenize_file(path, tok, source)
    # Offsets last: their file present means the entry is complete (every write is atomic).
    atomic_write_bytes(chars_path, str(tf.num_chars).encode())
    atomic_write(tokens_path, lambda f: np.save(f, tf.tokens))
    atomic_write(offsets_path, lambda f: np.save(f, tf.doc_offsets))
    return TokenFile(np.load(tokens_path, mmap_mode="r"), np.load(offsets_path, mmap_mode="r"), tf.num_chars)


# ----------------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------------
class WindowDataset(Dataset):
    """(x, y) pairs of `context_length` tokens, y shifted by one, cut from a flat token array.

    packing=True: windows run across document boundaries (documents are separated by <eos>/<bos>),
    so short poems are used. packing=False: windows lie inside single documents, as in the original
    design; documents shorter than context_length + 1 tokens yield none (counted in `too_short`).
    """

    def __init__(self, data: TokenFile, context_length: int, stride: int, packing: bool = True) -> None:
        if context_length < 1 or stride < 1:
            raise ValueError("context_length and stride must be >= 1")
        self.tokens = data.tokens
        self.num_chars = data.num_chars
        self.span = context_length + 1
        self.context_length = context_length
        self.stride = stride
        self.packing = packing
        if packing:
            n = (len(self.tokens) - self.span) // stride + 1 if len(self.tokens) >= self.span else 0
            self._length = max(0, n)
            self._doc_starts = None
            self.too_short = 0
        else:
            offsets = np.asarray(data.doc_offsets, dtype=np.int64)
            lengths = np.diff(offsets)
            counts = np.where(lengths >= self.span, (lengths - self.span) // stride + 1, 0)
            keep = counts > 0
            self.too_short = int((~keep).sum())
            self._doc_starts = offsets[:-1][keep]
            self._cum = np.concatenate([[0], np.cumsum(counts[keep])])
            self._length = int(self._cum[-1])

    def __len__(self) -> int:
        return self._length

    def start(self, index: int) -> int:
        """Offset of window `index` in the flat token array."""
        if not 0 <= index < self._length:
            raise IndexError(index)
        if self._doc_starts is None:
            return index * self.stride
        doc = int(np.searchsorted(self._cum, index, side="right")) - 1
        return int(self._doc_starts[doc]) + (index - int(self._cum[doc])) * self.stride

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.start(index)
        chunk = torch.from_numpy(np.asarray(self.tokens[s : s + self.span], dtype=np.int64))
        return chunk[:-1], chunk[1:]


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch): the same run sees the same order.

    Lightning calls `set_epoch` at every epoch start. Under torch.distributed each rank takes every
    world_size-th index of the permutation (read at iteration time, so the sampler can be built
    before the process group exists; the trainer then needs `use_distributed_sampler=False`).
    `resume_at(epoch, skip)` makes the next iteration start `skip` indices into that epoch's order.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True) -> None:
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, skip: int) -> None:
        self._resume = (epoch, skip)

    @staticmethod
    def _rank_and_world() -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        return self.length // self._rank_and_world()[1]

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for `epoch`."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            indices = torch.randperm(self.length, generator=g).tolist()
        else:
            indices = list(range(self.length))
        rank, world = self._rank_and_world()
        return indices[rank : len(self) * world : world]

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self._resume is not None:
            (self.epoch, skip), self._resume = self._resume, None
        return iter(self.order(self.epoch)[skip:])


class ResumableDataLoader(DataLoader):
    """A DataLoader over an `EpochShuffleSampler` that knows its place in the epoch.

    Lightning stores `state_dict()` of a train loader that has one in every checkpoint and calls
    `load_state_dict()` on resume, so a run stopped mid-epoch continues with exactly the batches it
    would have seen. The position is counted in samples handed out, so it survives a change of batch size.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochShuffleSampler):
            raise TypeError("ResumableDataLoader needs an EpochShuffleSampler")
        self._epoch = 0
        self._position = 0

    def __iter__(self) -> Iterator:
        sampler: EpochShuffleSampler = self.sampler
        resume = sampler._resume
        self._epoch, self._position = resume if resume is not None else (sampler.epoch, 0)
        for batch in super().__iter__():
            self._position += self.batch_size or 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: EpochShuffleSampler = self.sampler
        return {"epoch": self._epoch, "position": self._position, "seed": sampler.seed, "length": sampler.length}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: EpochShuffleSampler = self.sampler
        if state.get("length") != sampler.length:
            log.warning(
                "the training set changed since the checkpoint (%s windows, now %d): the epoch starts over",
                state.get("length"), sampler.length,
            )
            return
        sampler.seed = int(state["seed"])
        epoch, position = int(state["epoch"]), int(state["position"])
        if position + (self.batch_size or 1) > len(sampler):  # the epoch was complete: start the next one
            epoch, position = epoch + 1, 0
        sampler.resume_at(epoch, position)


# ----------------------------------------------------------------------------------------------
# DataModule
# ----------------------------------------------------------------------------------------------
class LMDataModule(L.LightningDataModule):
    """Owns the tokenizer, the token caches and the train / validation / test loaders."""

    def __init__(
        self,
        train_file: str,
        test_file: str | None = None,
        tokenizer_path: str | None = None,
        context_length: int = 256,
        batch_size: int = 16,
        stride: int | None = None,
        eval_stride: int | None = None,
        packing: bool = True,
        text_key: str = "text",
        template: str | None = None,
        convert: str = "none",
        on_bad_line: str = "error",
        min_frequency: int = 1,
        cache_dir: str | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        **_ignored,
    ) -> None:
        super().__init__()
        self.train_file = Path(train_file)
        self.test_file = Path(test_file) if test_file else None
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path else None
        self.context_length = context_length
        self.batch_size = batch_size
        self.stride = stride or context_length
        self.eval_stride = eval_stride or context_length
        self.packing = packing
        self.source = TextSource(text_key, template, convert, on_bad_line)
        self.min_frequency = min_frequency
        self.cache_dir = cache_dir
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.tokenizer: Tokenizer | None = None
        self.train_set: WindowDataset | None = None
        self.val_set: WindowDataset | None = None

    @property
    def has_val(self) -> bool:
        return self.test_file is not None

    @property
    def has_test(self) -> bool:
        return self.test_file is not None

    @property
    def test_set(self) -> WindowDataset | None:
        return self.val_set

    def tokens_per_char(self, split: str) -> float | None:
        """Tokens per character of a split ('train', 'val', 'test'), for bits per character."""
        ds = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        if ds is None or not ds.num_chars:
            return None
        return len(ds.tokens) / ds.num_chars

    def planned_steps(self, trainer_cfg: Any, accumulation: int = 1, world_size: int = 1) -> float:
        """Optimizer steps the run will take at the day batch size (max_steps, or epochs of the training set)."""
        totals = []
        if trainer_cfg.max_steps and trainer_cfg.max_steps > 0:
            totals.append(float(trainer_cfg.max_steps))
        if trainer_cfg.max_epochs and trainer_cfg.max_epochs > 0 and self.train_set is not None:
            per_epoch = len(self.train_set) // (self.batch_size * world_size) // max(1, accumulation)
            totals.append(float(trainer_cfg.max_epochs * per_epoch))
        return min(totals) if totals else float("inf")

    # The tokenizer is needed before the model exists (vocabulary size), so it is public.
    def prepare_tokenizer(self) -> Tokenizer:
        if self.tokenizer is not None:
            return self.tokenizer
        path = self.tokenizer_path
        if path is not None and path.exists():
            self.tokenizer = load_tokenizer(path)
            log.info("tokenizer: %s (%d tokens)", path, self.tokenizer.get_vocab_size())
        else:
            started = time.perf_counter()
            self.tokenizer = train_tokenizer(self.source.texts(self.train_file), self.min_frequency)
            msg = "trained a character tokenizer on %s: %d tokens in %.1f s"
            log.info(msg, self.train_file, self.tokenizer.get_vocab_size(), time.perf_counter() - started)
            if path is not None:
                save_tokenizer(self.tokenizer, path)
                log.info("saved the tokenizer to %s", path)
        return self.tokenizer

    @property
    def special_ids(self) -> dict[str, int]:
        return special_ids(self.prepare_tokenizer())

    def _windows(self, path: Path, stride: int, what: str) -> WindowDataset:
        data = load_or_tokenize(path, self.prepare_tokenizer(), self.source, self.cache_dir)
        ds = WindowDataset(data, self.context_length, stride, self.packing)
        if ds.too_short:
            log.info(
                "%s: %d of %d documents are shorter than context_length + 1 = %d tokens and yield no window "
                "(data.packing=false)", path, ds.too_short, data.num_documents, self.context_length + 1,
            )
        if len(ds) == 0:
            raise LingmaoError(
                f"{path}: the {what} file yields no window of data.context_length + 1 = {self.context_length + 1} "
                f"tokens ({data.num_documents} documents, {len(data.tokens)} tokens, packing={self.packing}); "
                "lower data.context_length or use more text"
            )
        return ds

    def prepare_data(self) -> None:
        # Runs once per node before setup(): fills the token caches so other processes only read them.
        self.setup("fit")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._windows(self.train_file, self.stride, "training")
        if self.val_set is None and self.test_file is not None:
            self.val_set = self._windows(self.test_file, self.eval_stride, "test")

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        if len(self.train_set) < self.batch_size:
            raise LingmaoError(
                f"{self.train_file}: only {len(self.train_set)} training windows, fewer than data.batch_size = "
                f"{self.batch_size}; lower the batch size or the context length"
            )
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(self.train_set), self.seed),
            drop_last=True,
            generator=torch.Generator().manual_seed(self.seed),  # leaves the global RNG (dropout) alone
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self) -> DataLoader:
        if self.val_set is None:
            return []  # Lightning skips validation for an empty list
        return DataLoader(
            self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()


def default_tokenizer_path(data: DataConfig, cache_dir: str | Path) -> Path:
    """Tokenizers are keyed by the training file and the text settings, so two datasets never share one."""
    h = hashlib.sha256()
    train_file = Path(data.train_file)
    h.update(str(train_file.resolve()).encode())
    if train_file.is_file():
        st = train_file.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(f"{data.text_key}|{data.template}|{data.convert}|{data.min_frequency}".encode())
    return Path(cache_dir) / "tokenizers" / f"{train_file.name}.{h.hexdigest()[:12]}.json"


def build_datamodule(data: DataConfig, cache_dir: str | Path, seed: int = 0, pin_memory: bool = False) -> LMDataModule:
    """The datamodule a data config describes; token caches and trained tokenizers go under `cache_dir`."""
    values = dataclasses.asdict(data)
    values["tokenizer_path"] = data.tokenizer_path or str(default_tokenizer_path(data, cache_dir))
    return LMDataModule(**values, cache_dir=str(Path(cache_dir) / "tokens"), pin_memory=pin_memory, seed=seed)
