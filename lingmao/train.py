"""`python -m lingmao.train`: the Hydra entry point. It only wires the pieces together."""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from lingmao import config as _config  # noqa: F401  (registers the config resolvers)
from lingmao.data import LMDataModule
from lingmao.errors import LingmaoError
from lingmao.export import export_model
from lingmao.hardware import resolve_accelerator, resolve_precision
from lingmao.module import LingmaoLM

log = logging.getLogger("lingmao.train")


def run_name(cfg: DictConfig) -> str:
    """The run's stable name: `run_name`, else the command-line overrides, else 'default'."""
    if cfg.get("run_name"):
        return str(cfg.run_name)
    try:
        overrides = HydraConfig.get().job.override_dirname
    except ValueError:  # not under @hydra.main (tests using compose)
        overrides = ""
    return overrides.replace("/", "_") or "default"


def default_tokenizer_path(cfg: DictConfig) -> Path:
    """Tokenizers are keyed by the training file and the text settings, so two datasets never share one."""
    d = cfg.data
    h = hashlib.sha256()
    train_file = Path(d.train_file)
    h.update(str(train_file.resolve()).encode())
    if train_file.is_file():
        st = train_file.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(f"{d.text_key}|{d.template}|{d.convert}|{d.min_frequency}".encode())
    return Path(cfg.paths.cache_dir) / "tokenizers" / f"{train_file.name}.{h.hexdigest()[:12]}.json"


def build_datamodule(cfg: DictConfig, accelerator: str = "cpu") -> LMDataModule:
    d = OmegaConf.to_container(cfg.data, resolve=True)
    d["tokenizer_path"] = d.get("tokenizer_path") or str(default_tokenizer_path(cfg))
    return LMDataModule(
        **d,
        cache_dir=str(Path(cfg.paths.cache_dir) / "tokens"),
        pin_memory=accelerator == "cuda",
        seed=int(cfg.seed),
    )


def unigram_perplexity(train_tokens: np.ndarray, test_tokens: np.ndarray, vocab_size: int) -> float:
    """Perplexity on the test tokens of a model that only knows training-set token frequencies
    (add-one smoothed): the baseline a trained model must beat by far."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[np.asarray(test_tokens)].mean()))


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    ckpt_dir = run_dir / "checkpoints"
    callbacks: list[L.Callback] = [
        ModelCheckpoint(
            dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=cfg.checkpoint_every_n_steps or None,
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    if cfg.checkpoint_every:
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir, filename="epoch{epoch:03d}", auto_insert_metric_name=False, save_top_k=-1,
                every_n_epochs=cfg.checkpoint_every, save_on_train_epoch_end=True,
            )
        )
    return callbacks


def build_trainer(cfg: DictConfig, run_dir: Path, accelerator: str, callbacks: list[L.Callback]) -> L.Trainer:
    hw = cfg.hardware
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    return L.Trainer(
        accelerator=accelerator,
        devices=hw.devices,
        num_nodes=hw.num_nodes,
        strategy=hw.strategy,
        precision=resolve_precision(hw.precision, accelerator),
        accumulate_grad_batches=cfg.optim.accumulation_steps,
        gradient_clip_val=cfg.optim.max_grad_norm,
        callbacks=callbacks,
        logger=CSVLogger(save_dir=str(run_dir), name="", version=""),
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
    return None


def train(cfg: DictConfig) -> float | None:
    """Train, test and export one run; return the best validation loss (for sweepers)."""
    L.seed_everything(cfg.seed, workers=True)
    accelerator = resolve_accelerator(cfg.hardware.accelerator)
    if cfg.hardware.cpu_threads:
        torch.set_num_threads(int(cfg.hardware.cpu_threads))
    if cfg.hardware.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.hardware.matmul_precision)
    run_dir = Path(cfg.paths.runs_dir) / run_name(cfg)
    log.info("run directory: %s", run_dir)

    dm = build_datamodule(cfg, accelerator)
    tokenizer = dm.prepare_tokenizer()
    dm.prepare_data()
    vocab_size = tokenizer.get_vocab_size()
    lm = LingmaoLM(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        vocab_size=vocab_size,
        pad_id=dm.special_ids["pad"],
    )
    log.info(
        "model: %s, %.2f M parameters (%.2f M without the embedding), vocabulary %d",
        cfg.model.name, lm.model.num_parameters() / 1e6, lm.model.num_parameters(True) / 1e6, vocab_size,
    )
    trainer = build_trainer(cfg, run_dir, accelerator, build_callbacks(cfg, run_dir))
    ckpt_path = find_resume_checkpoint(cfg, run_dir)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(lm, datamodule=dm, ckpt_path=ckpt_path)
    if trainer.interrupted:
        return None

    val_loss = trainer.callback_metrics.get("val/loss")
    if cfg.run_test and dm.val_set is not None:
        results = trainer.test(lm, datamodule=dm, verbose=False)
        test_loss = results[0]["test/loss"]
        baseline = unigram_perplexity(dm.train_set.tokens, dm.val_set.tokens, vocab_size)
        log.info(
            "test loss %.4f, perplexity %.1f; unigram baseline perplexity %.1f", test_loss, math.exp(test_loss), baseline,
        )
    if cfg.export and trainer.is_global_zero:
        target = Path(cfg.model_save_dir) if cfg.model_save_dir else run_dir / "export"
        export_model(target, lm.model, tokenizer, OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.data))
        log.info("exported the model to %s", target)
    return float(val_loss) if val_loss is not None else None


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except LingmaoError as exc:
        if cfg.get("debug"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
