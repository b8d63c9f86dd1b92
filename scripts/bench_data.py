"""Data pipeline figures: tokenization throughput, token-cache open time, dataset memory, and whether the
loader keeps up with training. Compared with the original design's approach (every training window kept as
a Python list of token ids), measured on a cut of the corpus and extrapolated (labelled as such).

    python scripts/bench_data.py                              # the full corpus, data/poetry (prepare_corpus.py)
    python scripts/bench_data.py --train-file lingmao/corpus/poetry_sample/train.jsonl --cut-kb 100

lingmao's memory is the growth of this process's resident set (VmRSS, file-backed pages of the memory-mapped
cache included) once every token has been read, per token of the corpus; the design's is the Python heap its
lists hold (tracemalloc), per token of the cut.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from lingmao.config import CONF_DIR
from lingmao.data import TextSource, WindowDataset, iter_documents, load_or_tokenize, tokenize_file
from lingmao.tokenizer import special_ids, train_tokenizer

# The full corpus as scripts/prepare_corpus.py writes it (data=poetry), else the bundled sample.
ROOT = Path(__file__).resolve().parents[1]
FULL_CORPUS = ROOT / "data" / "poetry" / "train.jsonl"
SAMPLE_CORPUS = ROOT / "lingmao" / "corpus" / "poetry_sample" / "train.jsonl"
DEFAULT_CORPUS = FULL_CORPUS if FULL_CORPUS.is_file() else SAMPLE_CORPUS


def rss_bytes() -> int:
    """Resident set size of this process (anonymous and file-backed pages)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


# ----------------------------------------------------------------------------------------------
# The design's approach: a Python list of token ids for every window
# ----------------------------------------------------------------------------------------------
class NaiveWindows:
    """What a straightforward LMDataset does: encode each document, join them with <bos>/<eos> into one
    Python list, and keep `stream[i : i + L + 1]` for every window start i (a list per sample)."""

    def __init__(self, texts: list[str], tok: Any, context_length: int, stride: int) -> None:
        ids = special_ids(tok)
        stream: list[int] = []
        for text in texts:
            stream.append(ids["bos"])
            stream.extend(tok.encode(text).ids)
            stream.append(ids["eos"])
        self.num_tokens = len(stream)
        span = context_length + 1
        self.samples = [stream[i : i + span] for i in range(0, len(stream) - span + 1, stride)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples[i]
        return torch.tensor(s[:-1]), torch.tensor(s[1:])


def naive_memory(texts: list[str], tok: Any, context_length: int, stride: int) -> dict[str, float]:
    """Python heap the windows hold (tracemalloc: RSS would hide them in arenas freed by an earlier run)."""
    gc.collect()
    ds, seconds = timed(NaiveWindows, texts, tok, context_length, stride)  # the build time, untraced
    del ds
    gc.collect()
    tracemalloc.start()
    ds = NaiveWindows(texts, tok, context_length, stride)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    out = {"tokens": ds.num_tokens, "windows": len(ds), "bytes_per_token": held / ds.num_tokens, "seconds": seconds}
    del ds
    gc.collect()
    return out


# ----------------------------------------------------------------------------------------------
# lingmao's approach: one flat array (memory-mapped cache) + index arithmetic
# ----------------------------------------------------------------------------------------------
def lingmao_memory(tokens_path: Path, offsets_path: Path, context_length: int, stride: int,
                   packing: bool) -> dict[str, float]:
    """Open the cache as `load_or_tokenize` does on a hit, build the windows, read every token once."""
    from lingmao.data import TokenFile

    gc.collect()
    before = rss_bytes()
    tokens = np.load(tokens_path, mmap_mode="r")
    offsets = np.load(offsets_path, mmap_mode="r")
    ds = WindowDataset(TokenFile(tokens, offsets), context_length, stride, packing)
    int(tokens.sum(dtype=np.int64))  # touch every token
    for i in range(0, len(ds), max(1, len(ds) // 1000)):  # and a sample of windows
        ds[i]
    grown = rss_bytes() - before
    out = {"windows": len(ds), "bytes_per_token": grown / len(tokens)}
    del ds, tokens, offsets
    gc.collect()
    return out


# ----------------------------------------------------------------------------------------------
# Does the loader keep up?
# ----------------------------------------------------------------------------------------------
class StallMeter(L.Callback):
    """Time from the end of one training batch to the start of the next (the batch fetch and the hooks in
    between), against the whole step (end to end)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends.append(time.perf_counter())

    def report(self) -> dict[str, float]:
        w = self.warmup
        gaps = [self.starts[i] - self.ends[i - 1] for i in range(w, len(self.ends))]
        steps = [self.ends[i] - self.ends[i - 1] for i in range(w, len(self.ends))]
        return {"gap_ms": 1000 * statistics.median(gaps), "step_ms": 1000 * statistics.median(steps),
                "fraction": sum(gaps) / sum(steps)}


def loader_stall(args: argparse.Namespace, out_dir: Path) -> dict[str, float]:
    """A short real training run of the app's config (DataModule, Trainer, production callbacks)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lingmao.module import LingmaoLM
    from lingmao.train import build_callbacks, build_datamodule, build_trainer

    steps = args.stall_warmup + args.stall_steps
    overrides = [f"model={args.stall_model}", "hardware=cpu", "night=off", "data=jsonl",
                 f"data.train_file={args.train_file}", "data.test_file=null", f"paths.output_dir={out_dir}",
                 f"trainer.max_steps={steps}", "trainer.max_epochs=-1", "logger.plots=false",
                 f"data.num_workers={args.num_workers}", *args.set]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    L.seed_everything(cfg.seed, verbose=False)
    dm = build_datamodule(cfg, "cpu")
    tok = dm.prepare_tokenizer()
    dm.prepare_data()
    lm = LingmaoLM(OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.optim, resolve=True),
                   tok.get_vocab_size(), dm.special_ids["pad"])
    meter = StallMeter(args.stall_warmup)
    run_dir = out_dir / "stall"
    trainer = build_trainer(cfg, run_dir, "cpu", [*build_callbacks(cfg, run_dir), meter])
    trainer.fit(lm, datamodule=dm)
    result = meter.report()
    # The fetch alone: the same loader, no model.
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    fetch = []
    for _ in range(50):
        started = time.perf_counter()
        next(it)
        fetch.append(time.perf_counter() - started)
    result["fetch_ms"] = 1000 * statistics.median(fetch)
    result["batch"], result["context"] = int(cfg.data.batch_size), int(cfg.data.context_length)
    return result


# ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-file", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--context", type=int, default=128, help="window length for the memory figures")
    p.add_argument("--strides", default="1,16,128", help="comma-separated strides for the memory figures")
    p.add_argument("--cut-kb", type=int, default=300, help="text of the corpus for the design's approach (KB)")
    p.add_argument("--opens", type=int, default=5, help="times the cached dataset is opened (median reported)")
    p.add_argument("--stall-model", default="tiny", help="model of the short training run (or 'none' to skip)")
    p.add_argument("--stall-steps", type=int, default=30)
    p.add_argument("--stall-warmup", type=int, default=5)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more Hydra overrides for the run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gc.freeze()  # the imported libraries' objects: leaves each collection below only the benchmark's own
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lingmao"):
        logging.getLogger(name).setLevel(logging.WARNING)
    path: Path = args.train_file
    if not path.is_file():
        print(f"error: {path} not found (pass --train-file)", file=sys.stderr)
        return 2
    strides = [int(s) for s in args.strides.split(",")]
    size = path.stat().st_size
    source = TextSource()
    print(f"corpus {path} ({size / 1e6:.1f} MB), context {args.context}, torch threads {torch.get_num_threads()}")

    tok, seconds = timed(train_tokenizer, source.texts(path))
    print(f"tokenizer: {tok.get_vocab_size()} tokens, trained in {seconds:.2f} s")

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        rss0 = rss_bytes()
        tf, seconds = timed(load_or_tokenize, path, tok, source, cache)  # tokenize and write the cache
        n = len(tf.tokens)
        print(f"tokenize + write cache: {seconds:.2f} s, {size / 1e6 / seconds:.2f} MB/s of JSONL, {n:,} tokens "
              f"({tf.tokens.dtype}), RSS grew {(rss_bytes() - rss0) / 1e6:.0f} MB while tokenizing")
        _, seconds = timed(tokenize_file, path, tok, source)
        print(f"tokenize only (no cache write): {seconds:.2f} s, {size / 1e6 / seconds:.2f} MB/s")
        del tf
        gc.collect()
        opens = []
        for _ in range(args.opens):
            started = time.perf_counter()
            ds = WindowDataset(load_or_tokenize(path, tok, source, cache), args.context, args.context)
            opens.append(time.perf_counter() - started)
            del ds
        print(f"open the cached dataset (hash the file, map the cache, build the windows): median "
              f"{statistics.median(opens):.3f} s (min {min(opens):.3f}, max {max(opens):.3f}) over {args.opens}")

        tokens_path = next(cache.glob("*.tokens.npy"))
        offsets_path = next(cache.glob("*.docs.npy"))
        print("\nresident memory per corpus token once every token has been read:")
        lingmao_memory(tokens_path, offsets_path, args.context, args.context, True)  # one-time allocations
        for packing in (True, False):
            for stride in strides:
                m = lingmao_memory(tokens_path, offsets_path, args.context, stride, packing)
                print(f"  lingmao  stride {stride:4d} packing {str(packing):5s}: {m['bytes_per_token']:.2f} B/token "
                      f"({m['windows']:,} windows)")

        texts: list[str] = []
        kept = 0
        for text in iter_documents(path):
            texts.append(text)
            kept += len(text.encode())
            if kept >= args.cut_kb * 1000:
                break
        for stride in strides:
            m = naive_memory(texts, tok, args.context, stride)
            full_gb = m["bytes_per_token"] * n / 1e9
            print(f"  design's approach stride {stride:4d}: {m['bytes_per_token']:,.1f} B/token on a "
                  f"{kept / 1e3:.0f} KB cut ({m['tokens']:,} tokens, {m['windows']:,} windows, built in "
                  f"{m['seconds']:.2f} s = {kept / 1e6 / m['seconds']:.2f} MB/s); extrapolated to the full corpus: "
                  f"{full_gb:.2f} GB")

        if args.stall_model != "none":
            r = loader_stall(args, Path(tmp) / "run")
            print(f"\nloader in a real run (model={args.stall_model}, batch {r['batch']}, context {r['context']}, "
                  f"num_workers {args.num_workers}): between steps {r['gap_ms']:.2f} ms of a {r['step_ms']:.1f} ms "
                  f"step (median), {100 * r['fraction']:.2f}% of training time; fetching one batch alone "
                  f"{r['fetch_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
