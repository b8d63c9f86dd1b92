"""`python -m lingmao.train`: the Hydra entry point. It only wires the pieces together."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from lingmao import config as _config  # noqa: F401  (registers the config resolvers)
from lingmao import distributed, monitoring, sweep
from lingmao.callbacks import build_hardware_callbacks
from lingmao.checkpointing import (
    AtomicCheckpointIO,
    TrainingInterrupted,
    check_resume_compatible,
    fault_tolerance_callbacks,
    interrupts_exit_cleanly,
)
from lingmao.data import build_datamodule
from lingmao.errors import LingmaoError, exit_on_user_error
from lingmao.export import export_model
from lingmao.hardware import resolve_accelerator, resolve_precision
from lingmao.module import LingmaoLM
from lingmao.night import build_night_mode
from lingmao.schema import report_config_errors, validate_config

log = logging.getLogger("lingmao.train")


def run_name(cfg: DictConfig) -> str:
    """The run's stable name: `run_name`, else the command-line overrides, else 'default'."""
    if cfg.get("run_name"):
        return str(cfg.run_name)
    try:
        overrides = HydraConfig.get().job.override_dirname
    except ValueError:  # not under @hydra.main (tests using compose)
        overrides = ""
    return sweep.short_dirname(overrides) or "default"


def unigram_perplexity(train_counts: np.ndarray, test_counts: np.ndarray) -> float:
    """Perplexity on the test tokens of a model that only knows training-set token frequencies
    (add-one smoothed): the baseline a trained model must beat by far. Arguments: counts per token id."""
    counts = np.asarray(train_counts, dtype=np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    test = np.asarray(test_counts, dtype=np.float64)
    return float(math.exp(-(test * logp[: len(test)]).sum() / test.sum()))


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    ckpt_dir = run_dir / "checkpoints"
    callbacks: list[L.Callback] = [
        ModelCheckpoint(
            dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=cfg.checkpoint_every_n_steps or None,
        ),
    ]
    if cfg.checkpoint_every:
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir, filename="epoch{epoch:03d}", auto_insert_metric_name=False, save_top_k=-1,
                every_n_epochs=cfg.checkpoint_every, save_on_train_epoch_end=True,
            )
        )
    callbacks += [*build_hardware_callbacks(cfg.hardware), build_night_mode(cfg.night, cfg.hardware)]
    callbacks += fault_tolerance_callbacks(ckpt_dir, save_on_interrupt=bool(cfg.save_on_interrupt))
    callbacks += monitoring.build_monitoring(cfg, run_dir)
    return callbacks


def build_trainer(cfg: DictConfig, run_dir: Path, accelerator: str, callbacks: list[L.Callback],
                  validate: bool = True) -> L.Trainer:
    hw = cfg.hardware
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    t["enable_progress_bar"] = bool(t.get("enable_progress_bar", True)) and monitoring.is_terminal()
    if not validate:
        t["limit_val_batches"] = 0  # nothing to validate on
    return L.Trainer(
        accelerator=accelerator,
        devices=hw.devices,
        num_nodes=hw.num_nodes,
        strategy=distributed.build_strategy(hw),
        use_distributed_sampler=False,  # the train sampler shards windows across ranks itself (data/windows.py)
        precision=resolve_precision(hw.precision, accelerator),
        accumulate_grad_batches=cfg.optim.accumulation_steps,
        gradient_clip_val=cfg.optim.max_grad_norm,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        logger=monitoring.build_loggers(cfg.get("logger") or {}, run_dir),
        default_root_dir=str(run_dir),
        **t,
    )


def find_resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    if cfg.resume_from:
        path = Path(cfg.resume_from)
        if not path.is_file():
            raise LingmaoError(f"resume_from: checkpoint {path} not found")
        return str(path)
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.auto_resume and last.is_file():
        return str(last)
    if last.is_file():
        log.info("auto_resume=false: starting afresh; %s stays until this run saves its own", last)
    return None


def train(cfg: DictConfig) -> float | None:
    """Train, test and export one run; return the best validation loss (for sweepers)."""
    validate_config(cfg)  # before anything is read or written: a mistake costs milliseconds
    L.seed_everything(cfg.seed, workers=True)
    accelerator = resolve_accelerator(cfg.hardware.accelerator)
    if cfg.hardware.cpu_threads:
        torch.set_num_threads(int(cfg.hardware.cpu_threads))
    if cfg.hardware.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.hardware.matmul_precision)
    run_dir = Path(cfg.paths.runs_dir) / run_name(cfg)
    log.info("run directory: %s", run_dir)
    monitoring.announce_config(cfg, run_dir)
    if (done := sweep.finished_result(run_dir, cfg)) is not None:
        return done.best_val_loss

    dm = build_datamodule(cfg.data, cfg.paths.cache_dir, seed=int(cfg.seed), pin_memory=accelerator == "cuda")
    tokenizer = dm.prepare_tokenizer()
    dm.prepare_data()
    vocab_size = tokenizer.get_vocab_size()
    lm = LingmaoLM(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        vocab_size=vocab_size,
        pad_id=dm.special_ids["pad"],
    )
    lm.tokens_per_char = dm.tokens_per_char("val")  # for val/bpc
    log.info(
        "model: %s, %.2f M parameters (%.2f M without the embedding), vocabulary %d",
        cfg.model.name, lm.model.num_parameters() / 1e6, lm.model.num_parameters(True) / 1e6, vocab_size,
    )
    trainer = build_trainer(cfg, run_dir, accelerator, build_callbacks(cfg, run_dir), validate=dm.has_val)
    ckpt_path = find_resume_checkpoint(cfg, run_dir)
    if ckpt_path:
        at = check_resume_compatible(ckpt_path, lm, tokenizer)
        log.info("resuming from %s: epoch %s, step %s", ckpt_path, at["epoch"], at["global_step"])
    trainer.fit(lm, datamodule=dm, ckpt_path=ckpt_path)
    if trainer.interrupted:
        return None

    val_loss = trainer.callback_metrics.get("val/loss")
    if cfg.run_test and dm.has_test:
        results = trainer.test(lm, datamodule=dm, verbose=False)
        test_loss = results[0]["test/loss"]
        baseline = unigram_perplexity(dm.train_set.token_counts(vocab_size), dm.test_set.token_counts(vocab_size))
        log.info(
            "test loss %.4f, perplexity %.1f; unigram baseline perplexity %.1f",
            test_loss, math.exp(test_loss), baseline,
        )
    target = None
    if cfg.export and trainer.is_global_zero:
        target = Path(cfg.model_save_dir) if cfg.model_save_dir else run_dir / "export"
        export_model(target, lm.model, tokenizer, OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.data))
        log.info("exported the model to %s", target)
    monitoring.log_summary(trainer, target)
    monitor = next(c for c in trainer.callbacks if isinstance(c, monitoring.TrainingMonitor))
    best = monitor.best.get("val/loss")
    last = float(val_loss) if val_loss is not None else None
    if trainer.is_global_zero:
        sweep.mark_finished(run_dir, cfg, best, last, trainer.global_step)
    return best if best is not None else last


@report_config_errors
@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        with exit_on_user_error(cfg.get("debug") is True), interrupts_exit_cleanly(), distributed.single_job_command():
            return train(cfg)
    except TrainingInterrupted as exc:  # exit 130 (SIGINT) / 143 (SIGTERM): never read as a finished run
        print(exc.message(), file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    sys.argv[1:] = _config.quote_unicode_overrides(sys.argv[1:])  # data.template=「{title}」... from a shell
    main()
