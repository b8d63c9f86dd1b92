"""LMDataModule: tokenizer, token caches, the train / validation / test split and their loaders.

- Training: the documents of `train_file` (one path, a list, a directory or a glob).
- Validation: `val_file`; when it is null, `val_fraction` of the training documents, chosen by a stable hash of
  their text (`lingmao.data.cache.document_hashes`, stored in the caches) and taken out of training. Equal
  texts hash alike, so no text is in both. The split is a document mask per file over the same caches:
  nothing is read twice.
- Test: `test_file`, opened only by `setup("test")`: fitting never reads it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from lingmao.data.cache import CacheEntry, TokenFile, conversion_version, open_caches
from lingmao.data.condition import conditioning, document_frequencies, header_values, ranked_authors
from lingmao.data.config import DataConfig
from lingmao.data.reading import TextSource, input_files, is_txt
from lingmao.data.tokenizer import (
    FastEncoder,
    load_tokenizer,
    save_tokenizer,
    special_ids,
    train_tokenizer_from_counts,
)
from lingmao.data.windows import EpochShuffleSampler, ResumableDataLoader, WindowDataset
from lingmao.errors import LingmaoError
from lingmao.io import file_lock

log = logging.getLogger(__name__)


def validation_masks(files: list[TokenFile], fraction: float) -> list[np.ndarray]:
    """Per file, which documents are validation documents: those whose text hash (32 bits) falls in the first
    `fraction` of its range. The same text is always on the same side, in any run and any file."""
    threshold = int(fraction * 2**32)
    return [np.asarray(tf.doc_hashes, dtype=np.int64) < threshold for tf in files]


class LMDataModule(L.LightningDataModule):
    """Owns the tokenizer, the token caches and the train / validation / test loaders."""

    def __init__(self, cfg: DataConfig, cache_dir: str | Path | None = None, pin_memory: bool = False,
                 seed: int = 0) -> None:
        """`cfg`: the `data` keys (checked when it was made). `cache_dir` is `paths.cache_dir`: token caches go
        to its `tokens/`, a tokenizer trained here to its `tokenizers/` (unless `cfg.tokenizer_path`); None keeps
        the tokens in memory and saves a trained tokenizer only to `cfg.tokenizer_path`. `seed` orders the
        training windows."""
        super().__init__()
        self.cfg = cfg
        self.inputs = {"train": cfg.train_file, "val": cfg.val_file, "test": cfg.test_file}
        tokenizer_path = cfg.tokenizer_path or (default_tokenizer_path(cfg, cache_dir) if cache_dir else None)
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path else None
        self.token_dir = Path(cache_dir) / "tokens" if cache_dir else None
        self.batch_size = cfg.batch_size  # what the train loader uses; night mode changes it between epochs
        self.stride = cfg.stride or cfg.context_length
        self.eval_stride = cfg.eval_stride or cfg.context_length
        self.source = TextSource(cfg.text_key, cfg.template, cfg.convert, cfg.on_bad_line, cfg.txt_mode,
                                 conditioning(cfg.condition, cfg.condition_keywords, cfg.condition_dropout))
        self.pin_memory = pin_memory
        self.seed = seed
        self.tokenizer: Tokenizer | None = None
        self.train_set: WindowDataset | None = None
        self.val_set: WindowDataset | None = None
        self.test_set: WindowDataset | None = None
        self._encoder: FastEncoder | None = None
        self._files: dict[str, list[Path]] = {}
        self._entries: dict[str, list[CacheEntry]] = {}
        self._token_files: dict[str, list[TokenFile]] = {}
        self._validation_ready = False

    @property
    def context_length(self) -> int:
        return self.cfg.context_length

    # ------------------------------------------------------------------------------------------
    # Files and tokens
    # ------------------------------------------------------------------------------------------
    def files(self, which: str) -> list[Path]:
        """The files of input `which` ('train', 'val' or 'test'); [] when it is not set."""
        if which not in self._files:
            value = self.inputs[which]
            self._files[which] = input_files(value, f"data.{which}_file") if value not in (None, "") else []
        return self._files[which]

    def label(self, which: str) -> str:
        """How messages name an input: its file, or its first file and how many more."""
        files = self.files(which)
        return str(files[0]) if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more files)"

    def _char_entries(self, which: str) -> list[CacheEntry]:
        if which not in self._entries:
            self._count_keywords()
            self._entries[which] = open_caches(self.files(which), self.source, self.token_dir, None,
                                               self.cfg.num_workers)
        return self._entries[which]

    def _count_keywords(self) -> None:
        """Keywords are chosen by TF-IDF over the training texts: count them (plain texts, cached) first."""
        cond = self.source.condition
        if cond is None or not cond.needs_frequencies:
            return
        entries = open_caches(self.files("train"), self.source.plain(), self.token_dir, None, self.cfg.num_workers)
        self.source.condition = cond.with_frequencies(*document_frequencies(entries))

    def use_keyword_statistics(self, record: dict[str, Any] | None) -> None:
        """Choose keywords by the document frequencies of another model's training set (its export's record), so
        that a fine-tuned model's keywords mean what its source's meant; without them, by this training set's."""
        cond = self.source.condition
        if cond is not None and "keywords" in cond.fields and (record or {}).get("frequencies"):
            self.source.condition = cond.with_frequencies(record["frequencies"], record.get("documents", 0))
            self._entries.clear()
            self._token_files.clear()

    def condition_record(self) -> dict[str, Any] | None:
        """What an export records of the conditioning: the `data.condition*` settings, the keyword statistics
        and the authors of the training documents' headers (the validation documents left out) with their
        counts, most frequent first."""
        cond = self.source.condition
        if cond is None:
            return None
        self._count_keywords()
        record = self.source.condition.record()
        if "author" in cond.fields:
            entries = self._char_entries("train")
            masks = validation_masks(self.token_files("train"), self.cfg.val_fraction) if (
                not self.files("val") and self.cfg.val_fraction > 0) else [None] * len(entries)
            authors: Counter[str] = Counter()
            for entry, mask in zip(entries, masks, strict=True):
                authors.update(header_values(entry, "author", None if mask is None else ~mask))
            record["authors"] = ranked_authors(authors)
        return record

    def use_tokenizer(self, tok: Tokenizer) -> None:
        """Train and test with `tok` (e.g. the tokenizer of the model a run starts from) instead of
        `data.tokenizer_path` or a new one."""
        self.tokenizer = tok
        self._encoder = FastEncoder.for_tokenizer(tok)
        self._token_files.clear()

    def symbol_counts(self, which: str = "train") -> np.ndarray:
        """How often each symbol (character or marker, `lingmao.data.tokenizer`) occurs in input `which`."""
        return sum(e.symbol_counts() for e in self._char_entries(which))

    def token_files(self, which: str) -> list[TokenFile]:
        """The tokens of every file of input `which` (read and cached on first use)."""
        if which not in self._token_files:
            tok = self.prepare_tokenizer()
            if self._encoder is not None:
                files = [e.token_file(self._encoder) for e in self._char_entries(which)]
            else:  # a tokenizer the vectorised encoder does not reproduce: caches of its own ids
                entries = open_caches(self.files(which), self.source, self.token_dir, tok, self.cfg.num_workers)
                files = [e.token_file(None) for e in entries]
            self._token_files[which] = files
        return self._token_files[which]

    # The tokenizer is needed before the model exists (vocabulary size), so it is public.
    def prepare_tokenizer(self) -> Tokenizer:
        if self.tokenizer is not None:
            return self.tokenizer
        path = self.tokenizer_path
        with file_lock(path.with_name(path.name + ".lock")) if path is not None else nullcontext():
            tok = self._load_or_train_tokenizer(path)  # the ranks of a run: one trains, the others load it
        self.tokenizer = tok
        self._encoder = FastEncoder.for_tokenizer(tok)
        return tok

    def _load_or_train_tokenizer(self, path: Path | None) -> Tokenizer:
        if path is not None and path.exists():
            tok = load_tokenizer(path)
            log.info("tokenizer: %s (%d tokens)", path, tok.get_vocab_size())
        else:
            entries = self._char_entries("train")
            started = time.perf_counter()
            counts = self.symbol_counts("train")
            documents = sum(int(e.meta["documents"]) for e in entries)
            tok = train_tokenizer_from_counts(counts, documents, self.cfg.min_frequency)
            log.info("trained a character tokenizer on %s: %d tokens in %.1f s", self.label("train"),
                     tok.get_vocab_size(), time.perf_counter() - started)
            if path is not None:
                save_tokenizer(tok, path)
                log.info("saved the tokenizer to %s", path)
        return tok

    @property
    def special_ids(self) -> dict[str, int]:
        return special_ids(self.prepare_tokenizer())

    @property
    def has_val(self) -> bool:
        """Whether there is a validation set (known once `prepare_data` or `setup('fit')` has run)."""
        return self.val_set is not None

    @property
    def has_test(self) -> bool:
        """Whether a test file is given (it is not opened before `setup('test')`)."""
        return self.inputs["test"] not in (None, "")

    def tokens_per_char(self, split: str) -> float | None:
        """Tokens per character of a split ('train', 'val', 'test'), for bits per character; None before it
        is set up."""
        ds = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        return ds.tokens_per_char if ds is not None else None

    # ------------------------------------------------------------------------------------------
    # Datasets
    # ------------------------------------------------------------------------------------------
    def _windows(self, which: str, stride: int, select: list[np.ndarray] | None = None) -> WindowDataset:
        ds = WindowDataset(self.token_files(which), self.context_length, stride, self.cfg.packing, select)
        if ds.too_short:
            log.info(
                "%s: %d of %d documents are shorter than context_length + 1 = %d tokens and yield no window "
                "(data.packing=false)", self.label(which), ds.too_short, ds.num_documents, self.context_length + 1,
            )
        return ds

    def _no_window(self, which: str, what: str, ds: WindowDataset) -> LingmaoError:
        return LingmaoError(
            f"{self.label(which)}: the {what} file yields no window of data.context_length + 1 = "
            f"{self.context_length + 1} tokens ({ds.num_documents} documents, {ds.num_tokens} tokens, "
            f"packing={self.cfg.packing}); lower data.context_length or use more text"
        )

    def _setup_fit(self) -> None:
        files = self.token_files("train")
        val_masks = None
        if not self.files("val") and self.cfg.val_fraction > 0:
            val_masks = validation_masks(files, self.cfg.val_fraction)
        train_select = [~m for m in val_masks] if val_masks is not None else None
        train = self._windows("train", self.stride, train_select)
        if train.num_documents == 0:
            raise LingmaoError(
                f"{self.label('train')}: all {sum(tf.num_documents for tf in files)} documents fell into the "
                f"validation split (data.val_fraction={self.cfg.val_fraction}); lower it or give data.val_file"
            )
        if len(train) == 0:
            raise self._no_window("train", "training", train)
        self.train_set = train
        if val_masks is not None:
            self.val_set = self._split_validation(files, val_masks)
            self._validation_ready = True

    def _split_validation(self, files: list[TokenFile], masks: list[np.ndarray]) -> WindowDataset | None:
        total = sum(tf.num_documents for tf in files)
        chosen = int(sum(m.sum() for m in masks))
        fraction = f"data.val_fraction={self.cfg.val_fraction}"
        instead = "no validation (give data.val_file or raise data.val_fraction)"
        if chosen == 0:
            log.warning("validation: %s of the %d training documents chose none; %s", fraction, total, instead)
            return None
        val = self._windows("train", self.eval_stride, masks)
        if len(val) == 0:
            log.warning("validation: %s of the %d training documents chose %d documents, %d tokens: not one window "
                        "of data.context_length + 1 = %d tokens; %s", fraction, total, chosen, val.num_tokens,
                        self.context_length + 1, instead)
            return None
        log.info("validation: %d of %d training documents (%s, chosen by a hash of their text and not trained on): "
                 "%d tokens, %d windows", chosen, total, fraction, val.num_tokens, len(val))
        return val

    def _setup_validation(self) -> None:
        if self.files("val"):
            val = self._windows("val", self.eval_stride)
            if len(val) == 0:
                raise self._no_window("val", "validation", val)
            self.val_set = val
            self._validation_ready = True
        elif self.cfg.val_fraction > 0:
            self._setup_fit()
        else:
            log.info("no validation: data.val_file is null and data.val_fraction=0")
            self._validation_ready = True

    def prepare_data(self) -> None:
        # Runs once per node before setup(): fills the token caches of training and validation (not test) so
        # other processes only read them.
        self.setup("fit")

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_set is None:
            self._setup_fit()
        if stage in ("fit", "validate", None) and not self._validation_ready:
            self._setup_validation()
        if stage == "test" and self.test_set is None and self.files("test"):
            test = self._windows("test", self.eval_stride)
            if len(test) == 0:
                raise self._no_window("test", "test", test)
            self.test_set = test

    # ------------------------------------------------------------------------------------------
    # Loaders
    # ------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        if len(self.train_set) < self.batch_size:
            raise LingmaoError(
                f"{self.label('train')}: only {len(self.train_set)} training windows, fewer than data.batch_size = "
                f"{self.batch_size}; lower the batch size or the context length"
            )
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(self.train_set), self.seed),
            drop_last=True,
            generator=torch.Generator().manual_seed(self.seed),  # leaves the global RNG (dropout) alone
            num_workers=self.cfg.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def _eval_loader(self, dataset: WindowDataset | None) -> DataLoader | list:
        if dataset is None:
            return []  # Lightning skips validation for an empty list
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.cfg.num_workers,
            pin_memory=self.pin_memory,
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.test_set)


# ----------------------------------------------------------------------------------------------
# Where a trained tokenizer is kept
# ----------------------------------------------------------------------------------------------
def default_tokenizer_path(d: DataConfig, cache_dir: str | Path) -> Path:
    """Tokenizers are keyed by the training files (path, size, time) and the text settings, so two datasets
    never share one. `cache_dir` is `paths.cache_dir`; tokenizers live in its `tokenizers/`."""
    files = input_files(d.train_file, "data.train_file")
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.resolve()).encode())
        st = path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(f"{d.text_key}|{d.template}|{d.convert}|{d.min_frequency}".encode())
    if d.convert != "none":  # another OpenCC release may convert (and so count) characters otherwise
        h.update(f"|{conversion_version(d.convert)}".encode())
    if d.condition:  # the header tokens are in the vocabulary
        h.update(f"|condition:{sorted(d.condition)}".encode())
    if any(is_txt(p) for p in files):
        h.update(f"|txt:{d.txt_mode}".encode())
    name = files[0].name if len(files) == 1 else f"{files[0].name}+{len(files) - 1}"
    return Path(cache_dir) / "tokenizers" / f"{name}.{h.hexdigest()[:12]}.json"

