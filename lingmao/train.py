"""`python -m lingmao.train`: the Hydra entry point. It wires the parts together and nothing else."""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from lingmao import cli, config, distributed, report, runs, sweep
from lingmao.callbacks import instantiate_callbacks
from lingmao.callbacks.monitoring import TrainingMonitor
from lingmao.checkpointing import AtomicCheckpointIO, TrainingInterrupted, interrupts_exit_cleanly, resume_point
from lingmao.data import LMDataModule
from lingmao.errors import exit_on_user_error
from lingmao.evaluate import test_result
from lingmao.export import export_model
from lingmao.finetune import start_from
from lingmao.fsdp import full_model
from lingmao.hardware import configure_process, resolve_accelerator, resolve_precision
from lingmao.loggers import build_loggers
from lingmao.module import LingmaoLM
from lingmao.verse.lines import LineSet

log = logging.getLogger("lingmao.train")


@dataclass
class TrainResult:
    """What a run leaves: its best and last validation loss, the test figures, where its files are."""

    run_dir: Path
    global_step: int
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    test: report.TestResult | None = None
    checkpoint: Path | None = None
    export_dir: Path | None = None
    finished_before: bool = False


def train(cfg: DictConfig) -> TrainResult:
    """Train, test and export one run (docs/training.md); `cfg` is the composed config of conf/train.yaml.

    A run that stops before its first training step (a bad file, a refused resume, Ctrl-C while tokenizing)
    removes what it made in its run folder, and only that (`lingmao.runs.RunFolder`)."""
    folder = runs.RunFolder()
    try:
        return _train(cfg, folder)
    except BaseException:
        folder.remove_what_this_run_made()
        raise


def _train(cfg: DictConfig, folder: runs.RunFolder) -> TrainResult:
    conf = config.validate(cfg)  # before anything is read or written: a mistake costs milliseconds
    L.seed_everything(conf.seed, workers=True)
    configure_process(conf.hardware)
    accelerator = resolve_accelerator(conf.hardware.accelerator)
    run_dir = Path(conf.paths.run_dir)
    log.info("run directory: %s", run_dir)
    if conf.logger.print_config:  # saved to the run folder once the run is sure to train (runs.record)
        rank_zero_only(log.info)("%s", report.config_tree(cfg))
    if (done := sweep.finished_result(run_dir, cfg)) is not None:
        return TrainResult(run_dir, done.global_step, done.best_val_loss, done.last_val_loss, finished_before=True)
    folder.open(run_dir)

    dm = LMDataModule(conf.data, conf.paths.cache_dir, pin_memory=accelerator == "cuda", seed=conf.seed)
    init = start_from(conf, dm) if conf.init_from else None  # fine-tuning: the source's tokenizer and model shape
    tokenizer = dm.prepare_tokenizer()
    dm.prepare_data()
    schedule = {"max_steps": conf.trainer.max_steps, "max_epochs": conf.trainer.max_epochs}
    lm = LingmaoLM(dataclasses.asdict(conf.model), dataclasses.asdict(conf.optim), tokenizer.get_vocab_size(),
                   dm.special_ids["pad"], schedule)
    if init is not None:
        init.load_into(lm.model)
    lm.val_tokens_per_char = dm.tokens_per_char("val")
    lm.training_config = runs.training_config(cfg)
    folder.watch(lm)
    log.info("model: %s (%s), %.2f M parameters (%.2f M without the embedding), vocabulary %d", conf.model.name,
             getattr(conf.model, "arch", "design"), lm.model.num_parameters() / 1e6,
             lm.model.num_parameters(True) / 1e6, tokenizer.get_vocab_size())

    callbacks = instantiate_callbacks(cfg.callbacks)
    trainer = L.Trainer(
        accelerator=accelerator, devices=conf.hardware.devices, num_nodes=conf.hardware.num_nodes,
        strategy=distributed.build_strategy(conf.hardware, {type(lm.model).block_class}),
        use_distributed_sampler=False,  # the train sampler shards windows across ranks itself (lingmao.data)
        precision=resolve_precision(conf.hardware.precision, accelerator),
        accumulate_grad_batches=conf.optim.accumulation_steps, gradient_clip_val=conf.optim.max_grad_norm,
        callbacks=callbacks, plugins=[AtomicCheckpointIO()], logger=build_loggers(conf.logger, run_dir),
        default_root_dir=str(run_dir),
        **{**dataclasses.asdict(conf.trainer),
           "enable_progress_bar": any(isinstance(c, ProgressBar) for c in callbacks),
           "limit_val_batches": conf.trainer.limit_val_batches if dm.has_val else 0},
    )
    ckpt_path = resume_point(conf, run_dir, lm, tokenizer, trainer.world_size)
    runs.record(cfg, run_dir, lm.training_config)
    trainer.fit(lm, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)

    if dm.has_val and trainer.limit_val_batches and lm.last_val_step != trainer.global_step:
        # Validation always ends a run.
        trainer.validate(lm, datamodule=dm, verbose=False)
    val_loss = trainer.callback_metrics.get("val/loss")
    # The best validation is the monitor's to know; without it (~callbacks.training_monitor), only the last.
    monitor = next((c for c in trainer.callbacks if isinstance(c, TrainingMonitor)), None)
    result = TrainResult(run_dir, trainer.global_step, monitor.best.get("val/loss") if monitor else None,
                         float(val_loss) if val_loss is not None else None,
                         checkpoint=run_dir / "checkpoints" / "last.ckpt")
    if conf.run_test and dm.has_test:
        result.test = test_result(trainer, lm, dm)
    model = full_model(lm.model) if conf.export or conf.show_samples else None  # whole weights (on rank 0)
    condition = dm.condition_record() if trainer.is_global_zero and (conf.export or conf.show_samples) else None
    if init is not None:
        condition = init.with_source_authors(condition)  # and the poets the source model knew
    lines = None
    if (conf.export or conf.show_samples) and trainer.is_global_zero:
        lines = LineSet.from_files(dm.files("train"), dm.source)  # what generation must not copy
        lines = lines.union(init.lines if init is not None else None)  # and what the source model trained on
    if conf.export and trainer.is_global_zero:
        result.export_dir = Path(conf.model_save_dir) if conf.model_save_dir else run_dir / "export"
        export_model(result.export_dir, model, tokenizer, conf.model, dataclasses.asdict(conf.data), condition,
                     lines=lines)
        log.info("exported the model to %s", result.export_dir)
    report.log_summary(trainer, result.checkpoint, result.export_dir, result.test)
    if conf.show_samples and trainer.is_global_zero:
        report.log_samples(model, tokenizer, dataclasses.asdict(conf.data), conf.seed, condition, lines)
    if trainer.is_global_zero:
        sweep.mark_finished(run_dir, cfg, result.best_val_loss, result.last_val_loss, trainer.global_step)
    return result


@cli.report_config_errors(config.TrainConfig)
@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        with exit_on_user_error(cfg.get("debug") is True), interrupts_exit_cleanly(), distributed.single_job_command():
            result = train(cfg)
    except TrainingInterrupted as exc:  # exit 130 (SIGINT) / 143 (SIGTERM): never read as a finished run
        print(exc.message(), file=sys.stderr)
        distributed.outlive(exc.after_pid)
        sys.exit(exc.exit_code)
    return result.best_val_loss if result.best_val_loss is not None else result.last_val_loss


if __name__ == "__main__":
    sys.argv[1:] = cli.quote_unicode_overrides(sys.argv[1:])  # data.template=「{title}」... from a shell
    main()
