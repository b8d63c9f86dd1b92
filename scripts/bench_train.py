"""Training throughput: lingmao against a plain-PyTorch GPT, thread choice beside a busy neighbour, GPU MFU.

    python scripts/bench_train.py --model small --repeat 3          # lingmao vs the plain GPT, 2 threads each
    python scripts/bench_train.py --neighbour --repeat 2            # default threads vs fixed, one busy neighbour
    python scripts/bench_train.py --accelerator cuda --precision bf16-mixed --model base --context 512 --compile

The default mode trains, one after the other and alternating which goes first, (a) lingmao as
`python -m lingmao.train` runs it (`lingmao.train.train` on the config composed from conf/ with the overrides
below: LightningModule, DataModule, Trainer and every default callback) and (b) a plain PyTorch GPT written
here (nanoGPT's structure: learned positions, pre-LayerNorm blocks, causal `scaled_dot_product_attention` with
dropout, GELU MLP, tied head, AdamW, a plain loop) of the same shape on the same batches (the DataModule's own
loader). Each run times `--steps` optimizer steps after `--warmup` steps; the window runs from the end of the last
warm-up step to the end of the last timed step, so it holds everything between steps (loading, callbacks,
logging). Prints tokens/s of each and the median and range of the per-repeat ratio lingmao / plain.

`--neighbour` starts one CPU-bound process (a Python busy loop) for the whole invocation and trains lingmao
with its default thread setting (the ThreadTuner callback) and with each fixed `hardware.cpu_threads` from 1 to
the usable cores, interleaved; the window starts when training starts (`--warmup 0`), so the tuner's trials are
paid inside it. Prints tokens/s of each and the ratio default / best fixed.

On CUDA it also prints MFU: model FLOPs per token (6 N + 12 L T d, `flops_per_token`) times tokens/s over the
GPU's dense peak at the run's precision (`lingmao.peak_flops`, the table the app's logged MFU uses, or
`--peak-tflops`).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import logging
import math
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from lingmao import config as lingmao_config
from lingmao.callbacks.threads import usable_cores
from lingmao.data import LMDataModule
from lingmao.hardware import resolve_accelerator, resolve_precision
from lingmao.model import train_flops_per_token
from lingmao.peak_flops import peak_tflops
from lingmao.train import train

# A Python busy loop that ends with its parent, should the benchmark itself be killed.
NEIGHBOUR = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"


# ----------------------------------------------------------------------------------------------
# The clock both sides run
# ----------------------------------------------------------------------------------------------
class Clock:
    """Wall and process CPU time when training starts and at the end of every optimizer step, the torch thread
    count of each step, and over the timed steps a checksum of the batches' token ids and the mean loss.

    Step k (1-based) is timed when k > warmup; the device is synchronised at the ends of the window only."""

    def __init__(self, warmup: int, total: int, device: torch.device) -> None:
        self.warmup, self.total, self.device = warmup, total, device
        self.marks: list[float] = []
        self.cpu: list[float] = []
        self.threads: list[int] = []
        self._checksum = torch.zeros((), dtype=torch.int64, device=device)
        self._loss = torch.zeros((), dtype=torch.float32, device=device)
        self.checksum = 0
        self.mean_loss = math.nan

    def _mark(self) -> None:
        self.marks.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin(self) -> None:
        if self.warmup == 0:
            self._sync()
        self._mark()

    def batch(self, x: torch.Tensor) -> None:
        self.threads.append(torch.get_num_threads())
        if len(self.marks) > self.warmup:
            self._checksum += x.sum()

    def end(self, loss: torch.Tensor) -> None:
        step = len(self.marks)
        if step > self.warmup:
            self._loss += loss.detach().float()
        if step in (self.warmup, self.total):
            self._sync()
        self._mark()

    def finish(self) -> Clock:
        self.checksum = int(self._checksum)
        self.mean_loss = float(self._loss) / max(1, self.steps)
        return self

    @property
    def steps(self) -> int:
        return len(self.marks) - 1 - self.warmup

    @property
    def seconds(self) -> float:
        return self.marks[-1] - self.marks[self.warmup]

    @property
    def cpu_seconds(self) -> float:
        return self.cpu[-1] - self.cpu[self.warmup]

    def threads_text(self) -> str:
        """Thread counts step by step, run-length coded: '2x5 1x25' = 5 steps at 2 threads, then 25 at 1."""
        runs: list[list[int]] = []
        for n in self.threads:
            if runs and runs[-1][0] == n:
                runs[-1][1] += 1
            else:
                runs.append([n, 1])
        return " ".join(f"{n}x{count}" for n, count in runs)

    def to_json(self) -> dict[str, Any]:
        return {"warmup": self.warmup, "total": self.total, "marks": self.marks, "cpu": self.cpu,
                "threads": self.threads, "checksum": self.checksum, "mean_loss": self.mean_loss}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Clock:
        clock = cls(data["warmup"], data["total"], torch.device("cpu"))
        clock.marks, clock.cpu, clock.threads = data["marks"], data["cpu"], data["threads"]
        clock.checksum, clock.mean_loss = data["checksum"], data["mean_loss"]
        return clock


class StepClock(L.Callback):
    """The clock inside lingmao's Trainer, added to the run's callbacks as `callbacks.step_clock`; writes the
    clock to `path` when training ends, and with `profile` a cProfile of the timed window to `path` + '.prof'."""

    def __init__(self, path: str, warmup: int, total: int, profile: bool = False) -> None:
        self.path, self.warmup, self.total = Path(path), warmup, total
        self.profiler = cProfile.Profile() if profile else None
        self.clock: Clock | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock = Clock(self.warmup, self.total, trainer.strategy.root_device)
        self.clock.begin()
        if self.profiler is not None and self.warmup == 0:
            self.profiler.enable()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.clock.batch(batch[0])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        self.clock.end(outputs["loss"] if isinstance(outputs, dict) else outputs)
        if self.profiler is not None and len(self.clock.marks) - 1 in (self.warmup, self.total):
            (self.profiler.enable if len(self.clock.marks) - 1 == self.warmup else self.profiler.disable)()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.profiler is not None:
            self.profiler.dump_stats(f"{self.path}.prof")
        self.path.write_text(json.dumps(self.clock.finish().to_json()))


# ----------------------------------------------------------------------------------------------
# The plain-PyTorch GPT
# ----------------------------------------------------------------------------------------------
class PlainAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.out_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.out_dropout(self.out(y.transpose(1, 2).reshape(b, t, d)))


class PlainBlock(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = PlainAttention(d, heads, dropout)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, ff, bias=False), nn.GELU(), nn.Linear(ff, d, bias=False),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PlainGPT(nn.Module):
    """GPT-2's layout as nanoGPT writes it: token + learned position embeddings, pre-LN blocks, final LayerNorm,
    head tied to the token embedding; N(0, 0.02) weights, residual projections scaled by 1/sqrt(2 layers)."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, ff: int, context: int, dropout: float) -> None:
        super().__init__()
        self.vocab, self.d, self.layers, self.ff = vocab, d, layers, ff
        self.tokens = nn.Embedding(vocab, d)
        self.positions = nn.Embedding(context, d)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PlainBlock(d, heads, ff, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tokens.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn.out.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        x = self.dropout(self.tokens(idx) + self.positions(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied head is one tensor: counted once

    def flops_per_token(self, seq_len: int) -> int:
        """6 N + 12 L T d (PaLM, appendix B), N = the weights of the matrix multiplies, head included."""
        n = self.layers * (4 * self.d * self.d + 2 * self.d * self.ff) + self.d * self.vocab
        return 6 * n + 12 * self.layers * seq_len * self.d


def plain_lr(step: int, peak: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """nanoGPT's schedule: linear warm-up, cosine to floor * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    q = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * q)))


def run_plain(conf: lingmao_config.TrainConfig, args: argparse.Namespace, warmup: int, steps: int,
              profile: bool) -> tuple[Clock, cProfile.Profile | None]:
    """The plain GPT trained by a plain loop on the batches of lingmao's own DataModule (same config, same seed)."""
    accelerator = resolve_accelerator(conf.hardware.accelerator)
    device = torch.device("cuda", 0) if accelerator == "cuda" else torch.device(accelerator)
    precision = resolve_precision(conf.hardware.precision, accelerator)
    if args.threads:
        torch.set_num_threads(args.threads)
    L.seed_everything(conf.seed, verbose=False)
    dm = LMDataModule(conf.data, conf.paths.cache_dir, pin_memory=device.type == "cuda", seed=conf.seed)
    vocab = dm.prepare_tokenizer().get_vocab_size()
    dm.prepare_data()
    pad = dm.special_ids["pad"]
    m = conf.model
    model = PlainGPT(vocab, m.d_model, m.nhead, m.num_layers, m.dim_feedforward, conf.data.context_length,
                     args.plain_dropout).to(device).train()
    step_model = torch.compile(model) if m.compile else model
    o = conf.optim
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=device.type == "cuda",
    )
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    total = warmup + steps
    clock = Clock(warmup, total, device)
    profiler = cProfile.Profile() if profile else None

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            logits = step_model(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=pad)

    loader = dm.train_dataloader()
    step, epoch = 0, 0
    clock.begin()
    if profiler is not None and warmup == 0:
        profiler.enable()
    while step < total:
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            clock.batch(x)
            for group in optimizer.param_groups:
                group["lr"] = plain_lr(step, o.lr, min(o.warmup_steps, max(1, total // 10)), total)
            loss = forward_loss(x, y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if o.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clock.end(loss)
            step += 1
            if profiler is not None and step == warmup:
                profiler.enable()
            if step >= total:
                break
        epoch += 1
    if profiler is not None:
        profiler.disable()
    return clock.finish(), profiler


# ----------------------------------------------------------------------------------------------
# lingmao, as `python -m lingmao.train` runs it
# ----------------------------------------------------------------------------------------------
def base_overrides(args: argparse.Namespace, out: Path) -> list[str]:
    """The config of every run here: the app's defaults with the benchmark's shape, no validation inside the
    window, and nothing after training that the benchmark does not time (test, export, samples, plots)."""
    overrides = [
        f"model={args.model}", f"hardware={args.accelerator}", "night=off", f"data={args.data}",
        f"hardware.precision={args.precision}", f"model.compile={str(args.compile).lower()}",
        f"paths.output_dir={out}", "trainer.max_epochs=-1", "trainer.limit_val_batches=0",
        "run_test=false", "export=false", "show_samples=false", "logger.plots=false", "logger.print_config=false",
    ]
    if args.batch:
        overrides.append(f"data.batch_size={args.batch}")
    if args.context:
        overrides.append(f"data.context_length={args.context}")
    if args.train_file:
        overrides.append(f"data.train_file={args.train_file}")
    return overrides + list(args.set)


def run_lingmao(args: argparse.Namespace, out: Path, name: str, warmup: int, steps: int, extra: list[str],
                profile: bool) -> tuple[Clock, str | None]:
    """One training run through `lingmao.train.train`, with the benchmark's clock as one more callback."""
    run_dir = out / "runs" / name
    clock_file = out / f"{name}.clock.json"
    cfg = lingmao_config.compose_config(
        [*base_overrides(args, out), *extra, f"trainer.max_steps={warmup + steps}", f"paths.run_dir={run_dir}"]
    )
    clock_callback = {"_target_": f"{StepClock.__module__}.{StepClock.__qualname__}", "path": str(clock_file),
             "warmup": warmup, "total": warmup + steps, "profile": profile}
    # First of the callbacks: a step ends before the others' end-of-step work, so the checkpoint written at the
    # end of the final step (once per run) falls outside the window; every other step's is inside it.
    cfg.callbacks = OmegaConf.merge({"step_clock": clock_callback}, cfg.callbacks)
    train(cfg)
    clock = Clock.from_json(json.loads(clock_file.read_text()))
    return clock, f"{clock_file}.prof" if profile else None


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------
def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def spread(values: list[float], fmt: str = ",.3f") -> str:
    return f"median {statistics.median(values):{fmt}} (min {min(values):{fmt}}, max {max(values):{fmt}})"


def print_profile(title: str, stats: str | cProfile.Profile, top: int) -> None:
    """The `top` functions by own time of a profile (a cProfile.Profile or a file it wrote)."""
    s = io.StringIO()
    pstats.Stats(stats, stream=s).sort_stats("tottime").print_stats(top)
    print(f"\n--- cProfile of the timed window, {title} (by own time) ---")
    print("\n".join(s.getvalue().splitlines()[4:]))


@contextlib.contextmanager
def neighbour_process() -> Iterator[subprocess.Popen]:
    """One CPU-bound process (a Python busy loop) for the duration; stopped by its id."""
    proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR])
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (Linux /proc), or None where not readable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------------------------
# The modes
# ----------------------------------------------------------------------------------------------
def compare_with_plain(args: argparse.Namespace, out: Path, conf: lingmao_config.TrainConfig) -> None:
    accelerator = resolve_accelerator(conf.hardware.accelerator)
    precision = resolve_precision(conf.hardware.precision, accelerator)
    device = torch.device("cuda", 0) if accelerator == "cuda" else torch.device(accelerator)
    m, d = conf.model, conf.data
    vocab = LMDataModule(d, conf.paths.cache_dir).prepare_tokenizer().get_vocab_size()
    plain = PlainGPT(vocab, m.d_model, m.nhead, m.num_layers, m.dim_feedforward, d.context_length, args.plain_dropout)
    lingmao_flops = train_flops_per_token(m, vocab, d.context_length)
    flops = {"lingmao": lingmao_flops, "plain": plain.flops_per_token(d.context_length)}
    threads = str(args.threads) if args.threads else "lingmao's choice / torch's default"
    print(f"lingmao: model={m.name} (arch {m.arch}, d {m.d_model}, {m.num_layers} layers, ff {m.dim_feedforward}, "
          f"{m.nhead} heads, {m.activation}, tied head {m.tie_weights}, dropout {m.dropout})")
    print(f"plain:   GPT (learned positions, LayerNorm, GELU, tied head, dropout {args.plain_dropout}), "
          f"{plain.num_parameters() / 1e6:.2f} M parameters")
    print(f"batch {d.batch_size} x context {d.context_length} = {d.batch_size * d.context_length} tokens/step, "
          f"vocabulary {vocab}, {accelerator}, {precision}, compile {m.compile}, threads {threads}, "
          f"torch {torch.__version__}; {args.steps} timed steps after {args.warmup}")
    print(f"load average before: {load_average()}", flush=True)
    del plain
    sides = ["lingmao", "plain"]
    rates: dict[str, list[float]] = {s: [] for s in sides}
    cpu_rates: dict[str, list[float]] = {s: [] for s in sides}
    losses: dict[str, list[float]] = {s: [] for s in sides}
    checksums: dict[str, set[int]] = {s: set() for s in sides}
    ratios: list[float] = []
    tokens_per_step = d.batch_size * d.context_length
    fixed = [f"hardware.cpu_threads={args.threads}"] if args.threads else []
    for r in range(args.repeat):
        order = sides if r % 2 == 0 else sides[::-1]
        profile = args.profile and r == args.repeat - 1
        got: dict[str, float] = {}
        for side in order:
            torch.set_num_threads(args.initial_threads)
            if side == "lingmao":
                clock, prof = run_lingmao(args, out, f"lingmao-{r}", args.warmup, args.steps, fixed, profile)
            else:
                clock, prof = run_plain(conf, args, args.warmup, args.steps, profile)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            got[side] = tokens_per_step * clock.steps / clock.seconds
            rates[side].append(got[side])
            cpu_rates[side].append(tokens_per_step * clock.steps / clock.cpu_seconds)
            losses[side].append(clock.mean_loss)
            checksums[side].add(clock.checksum)
            if prof is not None:
                print_profile(side, prof, args.profile_top)
        ratios.append(got["lingmao"] / got["plain"])
        print(f"repeat {r + 1}/{args.repeat} ({' then '.join(order)}): lingmao {got['lingmao']:,.0f} tok/s, "
              f"plain {got['plain']:,.0f} tok/s, ratio {ratios[-1]:.3f}; load average {load_average()}", flush=True)
    peak = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device), precision,
                                            torch.get_float32_matmul_precision()) if device.type == "cuda" else None)
    print(f"\n| side | tokens/s, median (min-max) over {args.repeat} | tokens per CPU-second | mean train loss "
          f"| GFLOP/s |{' MFU |' if device.type == 'cuda' else ''}")
    print(f"| --- | --- | --- | --- | --- |{' --- |' if device.type == 'cuda' else ''}")
    for side in sides:
        med = statistics.median(rates[side])
        achieved = flops[side] * med
        mfu = f" {achieved / (peak * 1e12):.1%} |" if peak else (" n/a |" if device.type == "cuda" else "")
        print(f"| {side} | {med:,.0f} ({min(rates[side]):,.0f}-{max(rates[side]):,.0f}) | "
              f"{statistics.median(cpu_rates[side]):,.0f} | {statistics.median(losses[side]):.3f} | "
              f"{achieved / 1e9:,.1f} |{mfu}")
    if peak:
        print(f"MFU: model FLOPs per token (lingmao {flops['lingmao'] / 1e9:.3f} G, plain {flops['plain'] / 1e9:.3f} G)"
              f" x tokens/s over {peak:g} TFLOP/s ({torch.cuda.get_device_name(device)}, dense {precision})")
    same = checksums["lingmao"] == checksums["plain"] and len(checksums["lingmao"]) == 1
    print(f"same batches on both sides: {'yes' if same else 'NO'} (token-id checksums: lingmao "
          f"{sorted(checksums['lingmao'])}, plain {sorted(checksums['plain'])})")
    print(f"RATIO lingmao/plain: {spread(ratios)} over {len(ratios)} interleaved repeats")
    cpu_ratios = [a / b for a, b in zip(cpu_rates["lingmao"], cpu_rates["plain"], strict=True)]
    print(f"ratio of tokens per CPU-second of this process (what other processes' load leaves out): "
          f"{spread(cpu_ratios)}")
    print(f"load average after: {load_average()}")


def compare_threads(args: argparse.Namespace, out: Path) -> None:
    cores = usable_cores()
    settings = {"default": [], **{f"threads={n}": [f"hardware.cpu_threads={n}"] for n in range(1, cores + 1)}}
    rates: dict[str, list[float]] = {s: [] for s in settings}
    ratios: list[float] = []
    print(f"load average before: {load_average()}", flush=True)
    with neighbour_process() as proc:
        print(f"model={args.model}, batch {args.tokens_per_step // args.context_length} x context "
              f"{args.context_length}, {cores} usable cores, one neighbour process (pid {proc.pid}, a busy loop); "
              f"{args.steps} timed steps after {args.warmup} (0: timed from the start of training), "
              f"torch {torch.__version__}", flush=True)
        time.sleep(1.0)
        neighbour_before, started = process_cpu_seconds(proc.pid), time.perf_counter()
        for r in range(args.repeat):
            names = list(settings)
            order = names[r % len(names):] + names[: r % len(names)]
            got: dict[str, float] = {}
            parts = []
            for name in order:
                torch.set_num_threads(args.initial_threads)
                run = f"{name.replace('=', '')}-{r}"  # threads=1 -> threads1: a plain directory name
                clock, _ = run_lingmao(args, out, run, args.warmup, args.steps, settings[name], False)
                gc.collect()
                got[name] = args.tokens_per_step * clock.steps / clock.seconds
                rates[name].append(got[name])
                parts.append(f"{name} {got[name]:,.0f} tok/s (threads per step {clock.threads_text()})")
            best = max((n for n in got if n != "default"), key=got.get)
            ratios.append(got["default"] / got[best])
            print(f"repeat {r + 1}/{args.repeat}: " + "; ".join(parts) +
                  f"; default / {best} {ratios[-1]:.3f}; load average {load_average()}", flush=True)
        neighbour_after, ended = process_cpu_seconds(proc.pid), time.perf_counter()
    if neighbour_before is not None and neighbour_after is not None:
        print(f"the neighbour used {(neighbour_after - neighbour_before) / (ended - started):.0%} of a core")
    print(f"\n| setting | tokens/s, median (min-max) over {args.repeat} |")
    print("| --- | --- |")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f}) |")
    best = max((n for n in rates if n != "default"), key=lambda n: statistics.median(rates[n]))
    print(f"RATIO default / best fixed: {spread(ratios)} over {len(ratios)} interleaved repeats (best fixed by "
          f"median: {best})")
    print(f"load average after: {load_average()}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="conf/model option: tiny, small, base, large")
    p.add_argument("--batch", type=int, default=None, help="data.batch_size (default: the data config's)")
    p.add_argument("--context", type=int, default=None, help="data.context_length (default: the data config's)")
    p.add_argument("--precision", default="auto", help="hardware.precision: auto, 32-true, bf16-mixed, 16-mixed")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (model.compile=true)")
    p.add_argument("--accelerator", default="cpu", choices=("cpu", "cuda", "auto"), help="the hardware group")
    p.add_argument("--data", default="poetry_sample", help="conf/data option")
    p.add_argument("--train-file", default=None, help="data.train_file (with --data jsonl)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps before the window (default 5; 0 with --neighbour: timed from the start)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of both sides (hardware.cpu_threads, torch.set_num_threads); default: the "
                        "usable cores; 0: lingmao's own choice (ThreadTuner) against torch's default")
    p.add_argument("--plain-dropout", type=float, default=0.1, help="dropout of the plain GPT")
    p.add_argument("--neighbour", action="store_true",
                   help="lingmao's default threads against fixed counts, beside one CPU-bound process")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak for MFU (default: the table)")
    p.add_argument("--profile", action="store_true", help="cProfile the timed window of the last repeat")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides of lingmao's config")
    p.add_argument("--output-dir", default=None, help="where the runs write (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 0 if args.neighbour else 5
    if args.warmup < 0 or args.steps < 1 or args.repeat < 1:
        p.error("--warmup must be >= 0, --steps and --repeat >= 1")
    if args.threads is None:
        args.threads = usable_cores()
    if args.neighbour and args.accelerator != "cpu":
        p.error("--neighbour compares CPU thread settings: use --accelerator cpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.initial_threads = torch.get_num_threads()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lingmao"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    with contextlib.ExitStack() as stack:
        out = Path(args.output_dir) if args.output_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        conf = lingmao_config.validate(lingmao_config.compose_config(base_overrides(args, out)))
        args.tokens_per_step = conf.data.batch_size * conf.data.context_length
        args.context_length = conf.data.context_length
        if args.neighbour:
            compare_threads(args, out)
        else:
            compare_with_plain(args, out, conf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
