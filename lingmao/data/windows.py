"""Fixed-length training windows over token files, and the sampler and loader that resume mid-epoch.

A window is index arithmetic over the memory-mapped token files: no per-sample Python lists, whatever
the stride. The tokens a dataset sees are the selected documents of its files, in order, joined (many
input files, or a training set with the validation documents taken out, read like one file).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lingmao.data.cache import TokenFile

log = logging.getLogger(__name__)


class WindowDataset(Dataset):
    """(x, y) pairs of `context_length` tokens, y shifted by one, cut from the documents of token files.

    `select[k]` (a boolean per document of file k, or None for all) chooses the documents; the chosen
    documents of all files, in order, are the dataset's token stream.
    packing=True: windows run across document boundaries (documents are separated by <eos>/<bos>), so
    short poems are used. packing=False: windows lie inside single documents, as in the original design;
    documents shorter than context_length + 1 tokens yield none (counted in `too_short`).
    """

    def __init__(self, data: TokenFile | Sequence[TokenFile], context_length: int, stride: int,
                 packing: bool = True, select: Sequence[np.ndarray | None] | None = None) -> None:
        if context_length < 1 or stride < 1:
            raise ValueError("context_length and stride must be >= 1")
        self.files = [data] if isinstance(data, TokenFile) else list(data)
        select = list(select) if select is not None else [None] * len(self.files)
        self.span = context_length + 1
        self.context_length = context_length
        self.stride = stride
        self.packing = packing

        seg_file, seg_start, seg_end = [], [], []  # runs of chosen documents, in file offsets
        doc_lengths, self.num_documents, self.num_chars = [], 0, 0
        for k, (tf, mask) in enumerate(zip(self.files, select, strict=True)):
            offsets = np.asarray(tf.doc_offsets, dtype=np.int64)
            chosen = np.ones(tf.num_documents, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
            edges = np.diff(np.concatenate([[0], chosen.astype(np.int8), [0]]))
            first, last = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
            seg_file.append(np.full(len(first), k, dtype=np.int64))
            seg_start.append(offsets[first])
            seg_end.append(offsets[last])
            doc_lengths.append(np.diff(offsets)[chosen])
            self.num_documents += int(chosen.sum())
            self.num_chars += int(np.asarray(tf.doc_chars, dtype=np.int64)[chosen].sum())
        self._seg_file = np.concatenate(seg_file) if seg_file else np.zeros(0, dtype=np.int64)
        self._seg_start = np.concatenate(seg_start) if seg_start else np.zeros(0, dtype=np.int64)
        seg_len = (np.concatenate(seg_end) if seg_end else np.zeros(0, dtype=np.int64)) - self._seg_start
        self._seg_pos = np.concatenate([[0], np.cumsum(seg_len)])  # where each run starts in the token stream
        self.num_tokens = int(self._seg_pos[-1])

        if packing:
            self._length = (self.num_tokens - self.span) // stride + 1 if self.num_tokens >= self.span else 0
            self._doc_starts = None
            self.too_short = 0
        else:
            lengths = np.concatenate(doc_lengths) if doc_lengths else np.zeros(0, dtype=np.int64)
            counts = np.where(lengths >= self.span, (lengths - self.span) // stride + 1, 0)
            keep = counts > 0
            self.too_short = int((~keep).sum())
            stream_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
            self._doc_starts = stream_starts[keep]
            self._cum = np.concatenate([[0], np.cumsum(counts[keep])])
            self._length = int(self._cum[-1])

    def __len__(self) -> int:
        return self._length

    @property
    def tokens_per_char(self) -> float | None:
        """Tokens per character of the chosen documents (validation bits per character use it)."""
        return self.num_tokens / self.num_chars if self.num_chars else None

    def start(self, index: int) -> int:
        """Where window `index` starts in the dataset's token stream."""
        if not 0 <= index < self._length:
            raise IndexError(index)
        if self._doc_starts is None:
            return index * self.stride
        doc = int(np.searchsorted(self._cum, index, side="right")) - 1
        return int(self._doc_starts[doc]) + (index - int(self._cum[doc])) * self.stride

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Token ids `start:stop` of the dataset's token stream (int64)."""
        out = []
        seg = int(np.searchsorted(self._seg_pos, start, side="right")) - 1
        while start < stop:
            tf = self.files[int(self._seg_file[seg])]
            at = int(self._seg_start[seg]) + start - int(self._seg_pos[seg])
            n = min(stop, int(self._seg_pos[seg + 1])) - start
            out.append(np.asarray(tf.ids(at, at + n), dtype=np.int64))
            start += n
            seg += 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.start(index)
        chunk = torch.from_numpy(self.tokens(s, s + self.span))
        return chunk[:-1], chunk[1:]

    def token_counts(self, minlength: int = 0, block: int = 1 << 24) -> np.ndarray:
        """How often each token id occurs in the dataset's tokens (read in blocks: memory stays small)."""
        counts = np.zeros(minlength, dtype=np.int64)
        for seg in range(len(self._seg_start)):
            tf = self.files[int(self._seg_file[seg])]
            local = np.zeros(len(tf.table), dtype=np.int64)
            first = int(self._seg_start[seg])
            last = first + int(self._seg_pos[seg + 1] - self._seg_pos[seg])
            for at in range(first, last, block):
                local += np.bincount(np.asarray(tf.symbols[at : min(at + block, last)]), minlength=len(local))
            ids = np.bincount(np.asarray(tf.table, dtype=np.int64), weights=local, minlength=minlength)
            if len(ids) > len(counts):
                counts = np.concatenate([counts, np.zeros(len(ids) - len(counts), dtype=np.int64)])
            counts[: len(ids)] += ids.astype(np.int64)
        return counts


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch): the same run sees the same order.

    Lightning calls `set_epoch` at every epoch start. Under torch.distributed each rank takes every
    world_size-th index of the permutation (read at iteration time, so the sampler can be built
    before the process group exists; the trainer then needs `use_distributed_sampler=False`).
    `resume_at(epoch, done)` makes the next iteration start after the first `done` indices of that epoch's
    order (counted over all ranks), whatever the number of ranks that consumed them.
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

    def next_start(self) -> tuple[int, int]:
        """(epoch, done): where the next iteration begins (after `resume_at`, else at the start of `epoch`)."""
        return self._resume if self._resume is not None else (self.epoch, 0)

    def __len__(self) -> int:
        return self.length // rank_and_world()[1]

    def order(self, epoch: int, done: int = 0) -> list[int]:
        """This rank's indices for `epoch`, after the first `done` of the epoch's order."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            indices = torch.randperm(self.length, generator=g).tolist()
        else:
            indices = list(range(self.length))
        rank, world = rank_and_world()
        rest = indices[done:]
        return rest[rank : len(rest) // world * world : world]

    def __iter__(self) -> Iterator[int]:
        done = 0
        if self._resume is not None:
            (self.epoch, done), self._resume = self._resume, None
        return iter(self.order(self.epoch, done))


class ResumableDataLoader(DataLoader):
    """A DataLoader over an `EpochShuffleSampler` that knows its place in the epoch.

    Lightning stores `state_dict()` of a train loader that has one in every checkpoint and calls
    `load_state_dict()` on resume (`lingmao.compat.saves_loader_state`), so a run stopped mid-epoch continues
    with exactly the batches it would have seen. The place is counted in samples of the epoch handed out over
    all ranks (`done`), so it survives a change of batch size and of the number of processes: a 2-process run
    resumed on 1 (or 1 on 2) sees the rest of the epoch, each window once.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochShuffleSampler):
            raise TypeError("ResumableDataLoader needs an EpochShuffleSampler")
        self._epoch = 0
        self._start = 0  # samples of the epoch done (all ranks) when this iteration began
        self._position = 0  # samples this rank has handed out since
        self._world = 1

    def __iter__(self) -> Iterator:
        sampler: EpochShuffleSampler = self.sampler
        self._epoch, self._start = sampler.next_start()
        self._position, self._world = 0, rank_and_world()[1]
        for batch in super().__iter__():
            self._position += self.batch_size or 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: EpochShuffleSampler = self.sampler
        return {"epoch": self._epoch, "done": self._start + self._position * self._world,
                "world_size": self._world, "seed": sampler.seed, "length": sampler.length}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: EpochShuffleSampler = self.sampler
        if state.get("length") != sampler.length:
            log.warning(
                "the training set changed since the checkpoint (%s windows, now %d): the epoch starts over",
                state.get("length"), sampler.length,
            )
            return
        sampler.seed = int(state["seed"])
        epoch = int(state["epoch"])
        done = int(state["done"]) if "done" in state else int(state["position"])  # checkpoints of one process
        world = rank_and_world()[1]
        if done + (self.batch_size or 1) * world > sampler.length:  # the epoch was complete: start the next one
            epoch, done = epoch + 1, 0
        sampler.resume_at(epoch, done)
