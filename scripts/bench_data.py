"""Data pipeline figures.

    python scripts/bench_data.py scale                  # 100 MB and 1 GB corpora: tokenizing speed, memory, open time
    python scripts/bench_data.py scale --sizes 20 --hf-cut-mb 5      # a quick look
    python scripts/bench_data.py loader                 # a real file: cache, memory per token, loader stalls

`scale` builds synthetic corpora by repeating the bundled sample with its documents shuffled (a new order each
time), then, each step in a child process of its own (its peak resident memory is the kernel's high-water mark of the
child, VmHWM, imports of torch and Lightning included):

- lingmao's path: read every file into its cache (vectorised) and train the tokenizer from the counts (`--repeat`
  times, into new caches: the fastest run and the median are shown);
- the tokenizers library's path as lingmao used it before (`Tokenizer.encode_batch` of 8,192 documents at a time
  through the per-character regex pre-tokenizer, ids gathered in memory), with the same tokenizer, on the first
  `--hf-cut-mb` MB of the corpus (it runs at a few MB/s) and extrapolated to the whole, said as such;
- opening the cached corpus (hash the files, map the caches, build the windows), and reading every token of
  it as training does (the memory-mapped side).

MB/s are MB of JSONL; "CPU" is MB per CPU-second of the processes doing the work (user + system time, workers
included): with one process, the speed of one core whatever else runs on the machine.

`loader` is the earlier set of figures on one real file: tokenizing, cache open time, resident memory per token
against the original design's lists, and whether the loader keeps up with training.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from lingmao.data import (
    TextSource,
    TokenFile,
    WindowDataset,
    iter_documents,
    load_or_tokenize,
    load_tokenizer,
    open_caches,
    save_tokenizer,
    special_ids,
    tokenize_files,
    train_tokenizer_from_counts,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "lingmao" / "corpus" / "poetry_sample" / "train.jsonl"
FULL_CORPUS = ROOT / "data" / "poetry" / "train.jsonl"


def rss_bytes() -> int:
    """Resident set size of this process now (anonymous and file-backed pages)."""
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
# scale: synthetic corpora, each step in a child process
# ----------------------------------------------------------------------------------------------
def synthetic_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """The bundled sample's lines repeated, shuffled anew each time, up to `megabytes`; its size in bytes."""
    lines = SAMPLE.read_bytes().splitlines(keepends=True)
    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    written = 0
    with open(path, "wb") as f:
        while written < target:
            rng.shuffle(lines)
            for line in lines:
                f.write(line)
                written += len(line)
                if written >= target:
                    break
    return written


def cut(src: Path, dest: Path, megabytes: float) -> int:
    """The first whole lines of `src` up to `megabytes`; their size in bytes."""
    with open(src, "rb") as f, open(dest, "wb") as out:
        data = f.read(int(megabytes * 1e6))
        data = data[: data.rfind(b"\n") + 1]
        out.write(data)
    return len(data)


def child(task: str, **args: Any) -> dict[str, Any]:
    """Run `task` in a new Python process; its JSON result, with its peak RSS (the process's own VmHWM: the
    kernel's high-water mark of its resident memory, imports included)."""
    proc = subprocess.run([sys.executable, __file__, "_child", task, json.dumps(args)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{task} failed with exit code {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM). Not ru_maxrss: after fork and exec that also
    counts the parent's memory at the time of the fork."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the workers of a pool)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def task_lingmao(files: list[str], cache_dir: str, tokenizer: str, workers: int = 0, repeat: int = 1,
                 **_: Any) -> dict[str, Any]:
    """Read the files into new caches `repeat` times (the last ones kept in `cache_dir`); the fastest time."""
    paths = [Path(f) for f in files]
    rss = rss_bytes()
    walls, cpus = [], []
    for i in range(repeat):
        target = Path(cache_dir) if i == repeat - 1 else Path(cache_dir).with_name(f"{Path(cache_dir).name}.{i}")
        wall, cpu = time.perf_counter(), cpu_seconds()
        entries = open_caches(paths, TextSource(), target, None, workers)
        walls.append(time.perf_counter() - wall)
        cpus.append(cpu_seconds() - cpu)
        if target != Path(cache_dir):
            del entries
            import shutil

            shutil.rmtree(target)
    wall, cpu = min(walls), min(cpus)
    started = time.perf_counter()
    counts = sum(e.symbol_counts() for e in entries)
    tok = train_tokenizer_from_counts(counts, sum(int(e.meta["documents"]) for e in entries))
    save_tokenizer(tok, tokenizer)
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if workers else None
    return {"seconds": wall, "cpu_seconds": cpu, "tokens": sum(len(e.symbols) for e in entries), "repeat": repeat,
            "cpu_median_seconds": statistics.median(cpus),
            "train_tokenizer_seconds": time.perf_counter() - started, "rss_before_mb": rss / 2**20,
            "vocabulary": tok.get_vocab_size(), "peak_rss_mb": peak_rss_mb(), "workers_peak_rss_mb": workers_peak}


def task_hf(file: str, tokenizer: str, **_: Any) -> dict[str, Any]:
    """What lingmao did before: lines read one by one with `json`, documents in batches of 8,192 through
    `encode_batch`, ids gathered in memory and joined at the end."""
    tok = load_tokenizer(tokenizer)
    rss = rss_bytes()
    wall, cpu = time.perf_counter(), cpu_seconds()
    pieces, batch = [], []

    def flush() -> None:
        encs = tok.encode_batch(batch)
        lens = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        pieces.append(np.fromiter((t for e in encs for t in e.ids), dtype=np.uint16, count=int(lens.sum())))
        batch.clear()

    with open(file, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8")
            if line.strip():
                batch.append(json.loads(line)["text"].replace("\r\n", "\n"))
                if len(batch) >= 8192:
                    flush()
    if batch:
        flush()
    tokens = np.concatenate(pieces)
    return {"seconds": time.perf_counter() - wall, "cpu_seconds": cpu_seconds() - cpu, "tokens": len(tokens),
            "rss_before_mb": rss / 2**20, "peak_rss_mb": peak_rss_mb()}


def task_open(files: list[str], cache_dir: str, tokenizer: str, opens: int = 3, **_: Any) -> dict[str, Any]:
    """Open the cached corpus as a run does, then read every token (memory-mapped) and some windows."""
    tok = load_tokenizer(tokenizer)
    paths = [Path(f) for f in files]
    times = []
    for _ in range(opens):
        started = time.perf_counter()
        ds = WindowDataset(tokenize_files(paths, tok, TextSource(), cache_dir), 128, 128)
        times.append(time.perf_counter() - started)
    rss = rss_bytes()
    started = time.perf_counter()
    counts = ds.token_counts(tok.get_vocab_size())
    for i in np.random.default_rng(0).integers(0, len(ds), 5000):
        ds[int(i)]
    return {"open_seconds": statistics.median(times), "open_min": min(times), "opens": opens,
            "read_seconds": time.perf_counter() - started, "tokens": int(counts.sum()), "windows": len(ds),
            "rss_before_mb": rss / 2**20, "peak_rss_mb": peak_rss_mb()}


TASKS = {"lingmao": task_lingmao, "hf": task_hf, "open": task_open}


def scale(args: argparse.Namespace) -> int:
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="lingmao-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"corpora from {SAMPLE.name} ({SAMPLE.stat().st_size / 1e6:.2f} MB, repeated with shuffled documents) in "
          f"{work}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    rows = []
    try:
        for mb in args.sizes:
            corpus = work / f"corpus_{mb:g}MB.jsonl"
            size = synthetic_corpus(corpus, mb)
            cache = work / f"cache_{mb:g}MB"
            tok = work / f"tokenizer_{mb:g}MB.json"
            new = child("lingmao", files=[str(corpus)], cache_dir=str(cache), tokenizer=str(tok), repeat=args.repeat)
            rows.append((f"{size / 1e6:,.0f} MB", "lingmao (vectorised, 1 process)", size, new, ""))
            if args.workers > 1:
                parts = split_file(corpus, work / f"parts_{mb:g}MB", args.workers * 2)
                par = child("lingmao", files=[str(p) for p in parts], cache_dir=str(work / f"pcache_{mb:g}MB"),
                            tokenizer=str(work / f"ptok_{mb:g}MB.json"), workers=args.workers)
                rows.append((f"{size / 1e6:,.0f} MB", f"lingmao, {len(parts)} files, {args.workers} processes",
                             size, par, ""))
            hf_file = work / f"cut_{mb:g}MB.jsonl"
            hf_size = cut(corpus, hf_file, min(args.hf_cut_mb, mb))
            hf = child("hf", file=str(hf_file), tokenizer=str(tok))
            note = "" if hf_size == size else (
                f"measured on the first {hf_size / 1e6:.3g} MB: the whole would take about "
                f"{hf['seconds'] * size / hf_size:,.0f} s")
            rows.append((f"{size / 1e6:,.0f} MB", "tokenizers library (before)", hf_size, hf, note))
            opened = child("open", files=[str(corpus)], cache_dir=str(cache), tokenizer=str(tok), opens=args.opens)
            rows.append((f"{size / 1e6:,.0f} MB", "open the cache, read every token", size, opened, ""))
            print_rows(rows[-4 if args.workers > 1 else -3 :])
            for f in (corpus, hf_file):
                f.unlink()
    finally:
        if not args.work_dir:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    print("\nsummary")
    print_rows(rows)
    return 0


def split_file(path: Path, folder: Path, parts: int) -> list[Path]:
    """`path` cut at line ends into `parts` files of about equal size (streamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    share = path.stat().st_size / parts
    out = [folder / f"part{i:03d}.jsonl" for i in range(parts)]
    written = 0
    with open(path, "rb") as src:
        for i, dest in enumerate(out):
            with open(dest, "wb") as f:
                for line in src:
                    f.write(line)
                    written += len(line)
                    if written >= share * (i + 1) and i < parts - 1:
                        break
    return out


def print_rows(rows: list[tuple[str, str, int, dict[str, Any], str]]) -> None:
    for corpus, what, size, r, note in rows:
        if "open_seconds" in r:
            print(f"  {corpus:>8s}  {what:38s} open {r['open_seconds']:.2f} s (median of {r['opens']}), then every "
                  f"token read in {r['read_seconds']:.1f} s; peak RSS {r['peak_rss_mb']:,.0f} MB "
                  f"({r['rss_before_mb']:,.0f} MB after imports and opening)")
            continue
        extra = (f"; tokenizer trained from the counts in {r['train_tokenizer_seconds']:.2f} s"
                 if "train_tokenizer_seconds" in r else "")
        if r.get("repeat", 1) > 1:
            extra += (f"; fastest of {r['repeat']} (median {size / 1e6 / r['cpu_median_seconds']:.1f} MB/s CPU)")
        if r.get("workers_peak_rss_mb"):
            extra += (f"; the pool's processes at most {r['workers_peak_rss_mb']:,.0f} MB each (pages shared with "
                      "the process that forked them included)")
        print(f"  {corpus:>8s}  {what:38s} {size / 1e6 / r['seconds']:7.1f} MB/s wall, "
              f"{size / 1e6 / r['cpu_seconds']:7.1f} MB/s CPU ({r['seconds']:,.1f} s, {r['tokens']:,} tokens); "
              f"peak RSS {r['peak_rss_mb']:,.0f} MB ({r['rss_before_mb']:,.0f} MB after imports){extra}"
              + (f"\n{'':50s}{note}" if note else ""))


# ----------------------------------------------------------------------------------------------
# loader: one real file; memory per token against the design's lists; does the loader keep up?
# ----------------------------------------------------------------------------------------------
class NaiveWindows:
    """What a straightforward LMDataset does: encode each document, join them with <bos>/<eos> into one
    Python list, and keep `stream[i : i + L + 1]` for every window start i (a list per sample)."""

    def __init__(self, texts: list[str], tok: Any, context_length: int, stride: int) -> None:
        ids = special_ids(tok)
        stream: list[int] = []
        for text in texts:
            stream.append(ids["bos"])
            stream.extend(tok.encode(text, add_special_tokens=False).ids)
            stream.append(ids["eos"])
        self.num_tokens = len(stream)
        span = context_length + 1
        self.samples = [stream[i : i + span] for i in range(0, len(stream) - span + 1, stride)]

    def __len__(self) -> int:
        return len(self.samples)


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


def lingmao_memory(data: TokenFile, context_length: int, stride: int, packing: bool) -> dict[str, float]:
    """Resident growth, per token, of building the windows and reading every token once."""
    gc.collect()
    before = rss_bytes()
    ds = WindowDataset(data, context_length, stride, packing)
    ds.token_counts()  # touch every token
    for i in range(0, len(ds), max(1, len(ds) // 1000)):  # and a sample of windows
        ds[i]
    grown = rss_bytes() - before
    out = {"windows": len(ds), "bytes_per_token": grown / data.num_tokens}
    del ds
    gc.collect()
    return out


class StallMeter(L.Callback):
    """Time from the end of one training batch to the start of the next (the batch fetch and the hooks in
    between), against the whole step (end to end)."""

    def __init__(self, warmup: int, path: str) -> None:
        self.warmup, self.path = warmup, path
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends.append(time.perf_counter())

    def on_train_end(self, *args: Any) -> None:
        Path(self.path).write_text(json.dumps(self.report()))

    def report(self) -> dict[str, float]:
        w = self.warmup
        gaps = [self.starts[i] - self.ends[i - 1] for i in range(w, len(self.ends))]
        steps = [self.ends[i] - self.ends[i - 1] for i in range(w, len(self.ends))]
        return {"gap_ms": 1000 * statistics.median(gaps), "step_ms": 1000 * statistics.median(steps),
                "fraction": sum(gaps) / sum(steps)}


def loader_stall(args: argparse.Namespace, out_dir: Path) -> dict[str, float]:
    """A short real training run of the app (`lingmao.train.train`: DataModule, Trainer, the default callbacks),
    with the meter as one more callback."""
    from omegaconf import OmegaConf

    from lingmao.config import compose_config, validate
    from lingmao.data import LMDataModule
    from lingmao.train import train

    steps = args.stall_warmup + args.stall_steps
    report = out_dir / "stall.json"
    overrides = [f"model={args.stall_model}", "hardware=cpu", "night=off", "data=jsonl",
                 f"data.train_file={args.train_file}", "data.test_file=null", "data.val_fraction=0",
                 f"paths.output_dir={out_dir}", f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
                 "logger.plots=false", "export=false", "show_samples=false", "run_test=false",
                 f"data.num_workers={args.num_workers}", *args.set]
    cfg = compose_config(overrides)
    meter = {"_target_": f"{StallMeter.__module__}.StallMeter", "warmup": args.stall_warmup, "path": str(report)}
    cfg.callbacks = OmegaConf.merge({"stall_meter": meter}, cfg.callbacks)
    train(cfg)
    result = json.loads(report.read_text())
    # The fetch alone: the same loader, no model.
    conf = validate(cfg)
    dm = LMDataModule(conf.data, conf.paths.cache_dir, seed=conf.seed)
    dm.prepare_tokenizer()
    dm.prepare_data()
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)
    fetch = []
    for _ in range(50):
        started = time.perf_counter()
        next(it)
        fetch.append(time.perf_counter() - started)
    result["fetch_ms"] = 1000 * statistics.median(fetch)
    result["batch"], result["context"] = int(cfg.data.batch_size), int(cfg.data.context_length)
    return result


def loader(args: argparse.Namespace) -> int:
    path: Path = args.train_file
    if not path.is_file():
        print(f"error: {path} not found (pass --train-file)", file=sys.stderr)
        return 2
    strides = [int(s) for s in args.strides.split(",")]
    size = path.stat().st_size
    source = TextSource()
    print(f"corpus {path} ({size / 1e6:.1f} MB), context {args.context}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        (entry,), seconds = timed(open_caches, [path], source, cache)
        tok = train_tokenizer_from_counts(entry.symbol_counts(), int(entry.meta["documents"]))
        print(f"tokenize + write cache: {seconds:.2f} s, {size / 1e6 / seconds:.2f} MB/s of JSONL, "
              f"{len(entry.symbols):,} tokens; tokenizer of {tok.get_vocab_size()} tokens from the counts")
        opens = []
        for _ in range(args.opens):
            started = time.perf_counter()
            ds = WindowDataset(load_or_tokenize(path, tok, source, cache), args.context, args.context)
            opens.append(time.perf_counter() - started)
            del ds
        print(f"open the cached dataset (hash the file, map the cache, build the windows): median "
              f"{statistics.median(opens):.3f} s (min {min(opens):.3f}, max {max(opens):.3f}) over {args.opens}")
        data = load_or_tokenize(path, tok, source, cache)
        print("\nresident memory per corpus token once every token has been read:")
        lingmao_memory(data, args.context, args.context, True)  # one-time allocations
        for packing in (True, False):
            for stride in strides:
                m = lingmao_memory(data, args.context, stride, packing)
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
            full_gb = m["bytes_per_token"] * data.num_tokens / 1e9
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


# ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scale", help="synthetic 100 MB and 1 GB corpora: lingmao against the tokenizers library")
    s.add_argument("--sizes", type=lambda v: [float(x) for x in v.split(",")], default=[100, 1000],
                   help="corpus sizes in MB, comma-separated (default 100,1000)")
    s.add_argument("--hf-cut-mb", type=float, default=20, help="MB the library's path is measured on (default 20)")
    s.add_argument("--workers", type=int, default=0, help="also tokenize the corpus split into files with N processes")
    s.add_argument("--opens", type=int, default=3, help="times the cached corpus is opened (median reported)")
    s.add_argument("--repeat", type=int, default=3, help="times lingmao's path runs (the fastest and the median "
                   "reported: on a shared machine other work slows a run down)")
    s.add_argument("--work-dir", help="keep the corpora, caches and tokenizers here (default: a temporary folder)")
    o = sub.add_parser("loader", help="one real file: cache, memory per token, loader stalls in a real run")
    o.add_argument("--train-file", type=Path, default=FULL_CORPUS if FULL_CORPUS.is_file() else SAMPLE)
    o.add_argument("--context", type=int, default=128, help="window length for the memory figures")
    o.add_argument("--strides", default="1,16,128", help="comma-separated strides for the memory figures")
    o.add_argument("--cut-kb", type=int, default=300, help="text of the corpus for the design's approach (KB)")
    o.add_argument("--opens", type=int, default=5, help="times the cached dataset is opened (median reported)")
    o.add_argument("--stall-model", default="tiny", help="model of the short training run (or 'none' to skip)")
    o.add_argument("--stall-steps", type=int, default=30)
    o.add_argument("--stall-warmup", type=int, default=5)
    o.add_argument("--num-workers", type=int, default=0)
    o.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more Hydra overrides for the run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:  # a step of `scale`, run in its own process
        print(json.dumps(TASKS[argv[1]](**json.loads(argv[2]))))
        return 0
    args = parse_args(argv)
    gc.freeze()  # the imported libraries' objects: leaves each collection below only the benchmark's own
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lingmao"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return scale(args) if args.command == "scale" else loader(args)


if __name__ == "__main__":
    sys.exit(main())
