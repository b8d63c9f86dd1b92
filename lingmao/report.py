"""What a run tells its user: the composed config at the start, a summary table at the end."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lingmao.callbacks.monitoring import TrainingMonitor
from lingmao.callbacks.night import NightMode
from lingmao.callbacks.progress import format_duration
from lingmao.io import atomic_write_text

log = logging.getLogger("lingmao.train")


def _plain(cfg: DictConfig) -> Any:
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:  # an interpolation that cannot resolve yet: show it unresolved
        return OmegaConf.to_container(cfg, resolve=False)


def config_tree(cfg: DictConfig) -> str:
    """The composed config as an indented tree (resolved where possible)."""
    lines = ["config"]

    def walk(node: Any, prefix: str) -> None:
        items = list(node.items()) if isinstance(node, dict) else []
        for i, (key, value) in enumerate(items):
            last = i == len(items) - 1
            branch, cont = ("└── ", "    ") if last else ("├── ", "│   ")
            if isinstance(value, dict) and value:
                lines.append(f"{prefix}{branch}{key}")
                walk(value, prefix + cont)
            else:
                lines.append(f"{prefix}{branch}{key}: {value}")

    walk(_plain(cfg), "")
    return "\n".join(lines)


@rank_zero_only
def announce_config(cfg: DictConfig, run_dir: Path, print_tree: bool = True) -> None:
    """Save the resolved config to `<run dir>/config.yaml` and print it as a tree."""
    path = run_dir / "config.yaml"
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(_plain(cfg))))
    if print_tree:
        log.info("%s\n(saved to %s)", config_tree(cfg), path)


def format_table(rows: list[tuple[str, str]], title: str = "") -> str:
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    rule = "─" * (width + vwidth + 3)
    out = [title, rule] if title else [rule]
    out += [f"{k:<{width}}   {v}" for k, v in rows]
    out.append(rule)
    return "\n".join(out)


@dataclass
class TestResult:
    """The final test: the model's loss on the test file next to a model that knows only character frequencies."""

    loss: float
    perplexity: float
    bits_per_character: float | None
    unigram_perplexity: float

    @property
    def worse_than_unigram(self) -> bool:
        return self.perplexity >= self.unigram_perplexity

    def describe(self) -> str:
        bpc = f", {self.bits_per_character:.3f} bits/char" if self.bits_per_character is not None else ""
        return f"loss {self.loss:.4f}, perplexity {self.perplexity:,.1f}{bpc}"


def run_summary(
    trainer: L.Trainer, checkpoint: str | Path | None = None, export: str | Path | None = None,
    test: TestResult | None = None,
) -> str:
    """One table: steps, epochs, what night mode changed, times, tokens, best validation, the test against its
    baseline, where files are."""
    monitor = next((c for c in trainer.callbacks if isinstance(c, TrainingMonitor)), None)
    steps = f"{trainer.global_step:,}"
    if trainer.max_steps and trainer.max_steps > 0:
        steps += f" of {trainer.max_steps:,}"
    rows: list[tuple[str, str]] = [("steps", steps)]
    batches = trainer.num_training_batches
    if isinstance(batches, int) and batches > 0:
        rows.append(("epochs", f"{trainer.global_step * trainer.accumulate_grad_batches / batches:.2f}"))
    night = next((c for c in trainer.callbacks if isinstance(c, NightMode)), None)
    for i, line in enumerate(night.summary_rows(trainer.global_step) if night is not None else []):
        rows.append(("night mode" if i == 0 else "", line))
    if monitor is not None:
        sessions = monitor.session
        if sessions > 1:
            rows.append(("wall time", f"{format_duration(monitor.session_wall_seconds)} this session, "
                         f"{format_duration(monitor.wall_seconds)} in all ({sessions} sessions)"))
            rows.append(("training time", f"{format_duration(monitor.session_seconds)} this session, "
                         f"{format_duration(monitor.train_seconds)} in all (without validation and saving)"))
        else:
            rows.append(("wall time", format_duration(monitor.session_wall_seconds)))
            rows.append(("training time", format_duration(monitor.train_seconds) + " (without validation and saving)"))
        rows.append(("tokens seen", f"{monitor.tokens_seen:,}"))
        if monitor.session_seconds > 0:
            rows.append(("mean tokens/s", f"{monitor.session_tokens / monitor.session_seconds:,.0f}"))
        best = monitor.best
        if best:
            parts = [f"loss {best['val/loss']:.4f}"]
            if "val/ppl" in best:
                parts.append(f"ppl {best['val/ppl']:.2f}")
            if "val/bpc" in best:
                parts.append(f"bpc {best['val/bpc']:.3f}")
            rows.append(("best validation", ", ".join(parts) + f" (step {int(best.get('step', 0))})"))
    if test is not None:
        rows.append(("test", test.describe()))
        verdict = f"perplexity {test.unigram_perplexity:,.1f}"
        if test.worse_than_unigram:
            verdict += " - the model is NO BETTER than character frequencies: train longer or check the data"
        rows.append(("unigram baseline", verdict))
    if checkpoint:
        rows.append(("checkpoint", str(checkpoint)))
    if export:
        rows.append(("export", str(export)))
    if trainer.loggers:
        rows.append(("metrics", str(Path(trainer.loggers[0].log_dir or ".") / "metrics.csv")))
    return format_table(rows, "run summary")


@rank_zero_only
def log_summary(trainer: L.Trainer, checkpoint: Path | None = None, export: Path | None = None,
                test: TestResult | None = None) -> None:
    """Print the end-of-run table."""
    log.info("\n%s", run_summary(trainer, checkpoint if checkpoint and checkpoint.exists() else None, export, test))
    if test is not None and test.worse_than_unigram:
        log.warning(
            "the trained model (test perplexity %.1f) is no better than a model that knows only character "
            "frequencies (%.1f)", test.perplexity, test.unigram_perplexity,
        )


SAMPLE_TITLE = "春望"


@rank_zero_only
def log_samples(model: Any, tokenizer: Any, data_cfg: dict[str, Any], seed: int,
                condition: dict[str, Any] | None = None, lines: Any = None) -> None:
    """Print a 五绝 and a 七绝 from the model just trained, so the user sees at once what the run bought; a model
    conditioned on title and author also writes a 七绝 to a title in the manner of its most prolific poet. With
    the training lines (`lines`, what the export keeps) no line is copied, and each poem is the one
    `python -m lingmao.generate` gives from the export with the same seed."""
    from lingmao.errors import LingmaoError
    from lingmao.export import LingmaoModel

    model.eval()
    lm = LingmaoModel(model, tokenizer, {"data": data_cfg, **({"condition": condition} if condition else {})},
                      lines=lines)
    samples = [("wujue", "五绝", {}), ("qijue", "七绝", {})]
    fields, authors = (condition or {}).get("fields") or [], list((condition or {}).get("authors") or {})
    if "title" in fields and "author" in fields and authors:
        samples.append(("qijue", "七绝", {"title": SAMPLE_TITLE, "author": authors[0]}))
    for form, name, header in samples:
        try:
            poem = lm.generate(form=form, seed=seed, **header)[0]
        except LingmaoError as exc:
            log.info("no %s sample: %s", name, exc)
            continue
        given = "".join(f" {k}={v}" for k, v in header.items())
        log.info("a %s from this model (python -m lingmao.generate model_dir=... form=%s%s seed=%d):\n%s",
                 name, form, given, seed, poem)
