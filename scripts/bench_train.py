"""Training throughput of lingmao (LightningModule + DataModule + Trainer + production callbacks) against a
plain PyTorch loop over the same model class, batches, optimizer, schedule and clipping, in one process.

    python scripts/bench_train.py --model small --repeat 5
    python scripts/bench_train.py --model tiny --repeat 5 --steps 60
    python scripts/bench_train.py --model small --accelerator cuda --precision bf16-mixed --compile   # on a GPU

Each repeat runs (a) lingmao and (b) the plain loop, alternating which goes first, and times `--steps`
optimizer steps after `--warmup` steps. The window runs from the end of the last warm-up step to the end of
the last timed step, so it includes everything between steps (data loading, callbacks, logging).
Prints tokens/s of each, and the median and range of the per-repeat ratios a/b.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import math
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from lingmao.monitoring import peak_tflops, train_flops_per_token
from lingmao.schema import validate_config
from omegaconf import DictConfig, OmegaConf

from lingmao import monitoring
from lingmao.config import CONF_DIR
from lingmao.data import build_datamodule
from lingmao.hardware import resolve_accelerator, resolve_precision
from lingmao.module import LingmaoLM, build_model
from lingmao.train import build_callbacks, build_trainer

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def compose_config(args: argparse.Namespace, out_dir: Path) -> DictConfig:
    """The app's config for this benchmark: conf/train.yaml plus overrides, as `python -m lingmao.train` sees it."""
    overrides = [
        f"model={args.model}",
        f"hardware={args.hardware}",
        "night=off",  # night mode halves the batch at night: it would change what is measured
        f"data={args.data}",
        *([f"data.batch_size={args.batch}"] if args.batch else []),
        *([f"data.context_length={args.context}"] if args.context else []),
        f"paths.output_dir={out_dir}",
        f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.val_check_interval=100000",  # no validation inside the timed window (the plain loop has none)
        "trainer.limit_val_batches=0",
        "trainer.max_epochs=-1",
        f"hardware.precision={args.precision}",
        f"model.compile={str(args.compile).lower()}",
        "logger.plots=false",  # drawn only after validation and at the end: not a per-step cost
        *args.set,
    ]
    if args.train_file:
        overrides += [f"data.train_file={args.train_file}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    validate_config(cfg)
    args.batch, args.context = int(cfg.data.batch_size), int(cfg.data.context_length)
    return cfg


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """perf_counter at the start and end of every step. The window runs from the end of step `warmup - 1` to
    the end of step `total - 1`; the device is synchronised at both ends only (never inside the window)."""

    warmup: int
    total: int
    device: torch.device
    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    cpu_ends: list[float] = field(default_factory=list)  # process CPU time: what other processes' load leaves out
    losses: list[torch.Tensor] = field(default_factory=list)
    profiler: cProfile.Profile | None = None

    def start(self) -> None:
        self.starts.append(time.perf_counter())

    def end(self, loss: torch.Tensor | None = None) -> None:
        step = len(self.ends)
        if loss is not None and step >= self.warmup:
            self.losses.append(loss.detach())
        if step in (self.warmup - 1, self.total - 1) and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        if self.profiler is not None and step == self.warmup - 1:
            self.profiler.enable()
        if self.profiler is not None and step == self.total - 1:
            self.profiler.disable()

    @property
    def seconds(self) -> float:
        return self.ends[-1] - self.ends[self.warmup - 1]

    @property
    def cpu_seconds(self) -> float:
        return self.cpu_ends[-1] - self.cpu_ends[self.warmup - 1]

    @property
    def steps(self) -> int:
        return len(self.ends) - self.warmup

    @property
    def wait_fraction(self) -> float:
        """Share of the window spent between steps (fetching the batch, hooks before the step starts)."""
        gaps = sum(self.starts[i] - self.ends[i - 1] for i in range(self.warmup, len(self.ends)))
        return gaps / self.seconds

    @property
    def mean_loss(self) -> float:
        return float(torch.stack(self.losses).float().mean()) if self.losses else math.nan


class TimingCallback(L.Callback):
    """The benchmark's own clock inside the Trainer."""

    def __init__(self, timing: Timing) -> None:
        self.timing = timing

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.timing.start()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.timing.end(loss)


# ----------------------------------------------------------------------------------------------
# (a) lingmao, (b) the plain loop
# ----------------------------------------------------------------------------------------------
def run_lingmao(cfg: DictConfig, args: argparse.Namespace, run_dir: Path, profile: bool) -> Timing:
    accelerator = resolve_accelerator(cfg.hardware.accelerator)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg.data, cfg.paths.cache_dir, seed=int(cfg.seed), pin_memory=accelerator == "cuda")
    tokenizer = dm.prepare_tokenizer()
    dm.prepare_data()
    lm = LingmaoLM(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        vocab_size=tokenizer.get_vocab_size(),
        pad_id=dm.special_ids["pad"],
    )
    device = torch.device("cuda:0" if accelerator == "cuda" else accelerator)
    timing = Timing(args.warmup, args.warmup + args.steps, device)
    timing.profiler = cProfile.Profile() if profile else None
    trainer = build_trainer(cfg, run_dir, accelerator, [TimingCallback(timing), *build_callbacks(cfg, run_dir)])
    trainer.fit(lm, datamodule=dm)
    return timing


def app_optimizer(model: torch.nn.Module, cfg: DictConfig, total_steps: int) -> tuple[Any, Any]:
    """The AdamW parameter groups and warm-up + cosine schedule of `LingmaoLM.configure_optimizers`, for `model`
    (asked of the module itself, so the comparison follows any change there)."""
    lm = LingmaoLM(
        OmegaConf.to_container(cfg.model, resolve=True) | {"compile": False},
        OmegaConf.to_container(cfg.optim, resolve=True), model.vocab_size,
    )
    lm.model = model
    lm.trainer = SimpleNamespace(estimated_stepping_batches=total_steps)
    configured = lm.configure_optimizers()
    return configured["optimizer"], configured["lr_scheduler"]["scheduler"]


def run_plain(cfg: DictConfig, args: argparse.Namespace, profile: bool) -> Timing:
    """The same model class, batches (the DataModule's own loader), AdamW groups, schedule and clipping."""
    accelerator = resolve_accelerator(cfg.hardware.accelerator)
    device = torch.device("cuda:0" if accelerator == "cuda" else accelerator)
    precision = resolve_precision(cfg.hardware.precision, accelerator)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg.data, cfg.paths.cache_dir, seed=int(cfg.seed), pin_memory=accelerator == "cuda")
    tokenizer = dm.prepare_tokenizer()
    dm.prepare_data()
    pad = dm.special_ids["pad"]
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = build_model(tokenizer.get_vocab_size(), model_cfg).to(device)
    model.train()
    step_model = torch.compile(model) if model_cfg.get("compile") else model
    total = args.warmup + args.steps
    with torch.random.fork_rng(devices=[]):  # building the module draws random numbers; dropout must not see it
        optimizer, scheduler = app_optimizer(model, cfg, total)
    o = cfg.optim
    autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    timing = Timing(args.warmup, total, device)
    timing.profiler = cProfile.Profile() if profile else None

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # A function, so the logits (the largest activation) are freed before backward, as in training_step.
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = step_model(x)
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=pad)

    loader = dm.train_dataloader()
    step = 0
    while step < total:
        for x, y in loader:
            timing.start()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = forward_loss(x, y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if o.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            timing.end(loss)
            del x, y, loss
            step += 1
            if step >= total:
                break
    return timing


# ----------------------------------------------------------------------------------------------
# Checks and reports
# ----------------------------------------------------------------------------------------------
def attention_kernels(cfg: DictConfig, args: argparse.Namespace) -> list[str]:
    """The attention ops one training step (forward + backward) dispatches to, read from torch.profiler."""
    accelerator = resolve_accelerator(cfg.hardware.accelerator)
    device = torch.device("cuda:0" if accelerator == "cuda" else accelerator)
    precision = resolve_precision(cfg.hardware.precision, accelerator)
    model = build_model(100, OmegaConf.to_container(cfg.model, resolve=True)).to(device).train()
    idx = torch.randint(0, 100, (2, args.context), device=device)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model(idx).float().sum().backward()
    names = {e.key for e in prof.key_averages()}
    wanted = ("attention", "sdpa", "flash", "efficient", "softmax", "baddbmm", "bmm")
    return sorted(n for n in names if any(w in n.lower() for w in wanted))


def cpu_matmul_gflops(seconds: float = 0.5) -> float:
    """Achieved fp32 GFLOP/s of a 1024^3 matrix multiply on this CPU: the 'peak' MFU is measured against."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - started) / 1e9


def print_profile(title: str, prof: cProfile.Profile, top: int, dump: str | None = None) -> None:
    if dump:
        prof.dump_stats(f"{dump}.{title}.prof")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    print(f"\n--- cProfile, timed window of {title} (by own time) ---")
    print("\n".join(s.getvalue().splitlines()[4:]))


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):,.3f} (min {min(values):,.3f}, max {max(values):,.3f})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="conf/model option: tiny, small, base, large")
    p.add_argument("--batch", type=int, default=None, help="data.batch_size (default: the data config's)")
    p.add_argument("--context", type=int, default=None, help="data.context_length (default: the data config's)")
    p.add_argument("--precision", default="auto", help="auto, 32-true, bf16-mixed, 16-mixed")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (model.compile=true)")
    p.add_argument("--accelerator", default="cpu", choices=("cpu", "cuda", "auto"), help="hardware group")
    p.add_argument("--data", default="poetry_sample", help="conf/data option")
    p.add_argument("--train-file", default=None, help="JSONL training file (with --data jsonl)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before the window")
    p.add_argument("--repeat", type=int, default=3, help="interleaved (a, b) pairs")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--only", choices=("lingmao", "plain"), default=None, help="run one side only")
    p.add_argument("--tty", action="store_true", help="act as if stdout were a terminal (the tqdm progress bar)")
    p.add_argument("--profile", action="store_true", help="cProfile the timed window of the last repeat")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--profile-dump", default=None, metavar="PREFIX", help="also write PREFIX.<side>.prof (pstats)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more Hydra overrides")
    p.add_argument("--output-dir", default=None, help="run directories (default: a temporary directory)")
    args = p.parse_args(argv)
    args.hardware = {"auto": "auto", "cpu": "cpu", "cuda": "cuda"}[args.accelerator]
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tty:  # the app chooses its progress output by whether stdout is a terminal
        monitoring.is_terminal = lambda: True
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lingmao"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
    with contextlib.ExitStack() as stack:
        out = Path(args.output_dir) if args.output_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        cfg = compose_config(args, out)
        accelerator = resolve_accelerator(cfg.hardware.accelerator)
        precision = resolve_precision(cfg.hardware.precision, accelerator)
        m = cfg.model
        vocab = build_datamodule(cfg.data, cfg.paths.cache_dir).prepare_tokenizer().get_vocab_size()
        params = build_model(vocab, OmegaConf.to_container(m, resolve=True)).num_parameters()
        print(
            f"model={m.name} (d_model {m.d_model}, {m.num_layers} layers, ff {m.dim_feedforward}, tied "
            f"{m.tie_weights}, vocabulary {vocab}, {params / 1e6:.2f} M parameters = {16 * params / 2**20:.0f} MiB "
            f"with gradients and AdamW state in fp32), batch {args.batch}, context {args.context}, {accelerator}, "
            f"{precision}, compile {bool(m.compile)}, torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
        print("attention ops:", ", ".join(attention_kernels(cfg, args)) or "none found")
        rates: dict[str, list[float]] = {"lingmao": [], "plain": []}
        cpu_rates: dict[str, list[float]] = {"lingmao": [], "plain": []}
        waits: dict[str, list[float]] = {"lingmao": [], "plain": []}
        losses: dict[str, list[float]] = {"lingmao": [], "plain": []}
        ratios: list[float] = []
        cpu_ratios: list[float] = []
        sides = [args.only] if args.only else ["lingmao", "plain"]
        tokens_per_step = args.batch * args.context
        for r in range(args.repeat):
            order = sides if r % 2 == 0 else sides[::-1]
            last = r == args.repeat - 1
            got: dict[str, float] = {}
            for side in order:
                if side == "lingmao":
                    t = run_lingmao(cfg, args, out / "runs" / f"r{r}", profile=args.profile and last)
                else:
                    t = run_plain(cfg, args, profile=args.profile and last)
                got[side] = tokens_per_step * t.steps / t.seconds
                rates[side].append(got[side])
                cpu_rates[side].append(tokens_per_step * t.steps / t.cpu_seconds)
                waits[side].append(t.wait_fraction)
                losses[side].append(t.mean_loss)
                if t.profiler is not None:
                    print_profile(side, t.profiler, args.profile_top, args.profile_dump)
            line = ", ".join(f"{s} {got[s]:,.0f} tok/s" for s in sides)
            if len(got) == 2:
                ratios.append(got["lingmao"] / got["plain"])
                cpu_ratios.append(cpu_rates["lingmao"][-1] / cpu_rates["plain"][-1])
                line += f", ratio {ratios[-1]:.3f} (by CPU time {cpu_ratios[-1]:.3f})"
            print(f"repeat {r + 1}/{args.repeat} ({' then '.join(order)}): {line}", flush=True)
        flops = train_flops_per_token(m.d_model, m.num_layers, m.dim_feedforward, vocab, args.context)
        print(f"\nsummary over {args.repeat} repeats of {args.steps} timed steps ({tokens_per_step} tokens/step):")
        for side in sides:
            med = statistics.median(rates[side])
            achieved = flops * med / 1e9
            print(
                f"  {side:8s} tokens/s {spread(rates[side])}; per CPU-second {spread(cpu_rates[side])}; time between "
                f"steps {100 * statistics.median(waits[side]):.2f}% of the window; mean train loss "
                f"{statistics.median(losses[side]):.4f}; {achieved:,.1f} GFLOP/s"
            )
        if accelerator == "cuda":
            peak = peak_tflops(torch.cuda.get_device_name(0))
            med = statistics.median(rates[sides[0]])
            if peak:
                print(f"  MFU ({sides[0]}): {flops * med / (peak * 1e12):.1%} of {peak:g} TFLOP/s (bf16 peak)")
        elif accelerator == "cpu":
            peak = cpu_matmul_gflops()
            for side in sides:
                med = statistics.median(rates[side])
                print(f"  {side:8s} MFU vs this CPU's measured fp32 matmul rate ({peak:.1f} GFLOP/s): "
                      f"{flops * med / 1e9 / peak:.1%}")
        if ratios:
            print(f"RATIO lingmao/plain: {spread(ratios)} over {len(ratios)} interleaved repeats")
            print(f"RATIO by CPU time (tokens per CPU-second of this process): {spread(cpu_ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
