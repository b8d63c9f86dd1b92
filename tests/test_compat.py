"""The private and version-bound APIs of lingmao.compat: each still there, and still doing what lingmao needs."""

from __future__ import annotations

import importlib.metadata
import inspect
import sys

import pytest
import torch

from lingmao import compat


def installed(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def gone(entry: compat.Upstream, what: str) -> str:
    return (f"{entry.symbol} {what} in {entry.package} {installed(entry.package)} (lingmao.compat was written "
            f"against {entry.written_against}): {entry.used_by} needs another way; see lingmao/compat.py")


@pytest.mark.parametrize("entry", compat.UPSTREAM, ids=[e.symbol for e in compat.UPSTREAM])
def test_every_private_symbol_is_still_there(entry):
    try:
        compat.resolve(entry.symbol)
    except (ImportError, AttributeError) as exc:
        pytest.fail(gone(entry, f"is gone ({type(exc).__name__}: {exc})"))


def entry(symbol_part: str) -> compat.Upstream:
    (found,) = [e for e in compat.UPSTREAM if symbol_part in e.symbol]
    return found


def test_the_message_names_the_symbol_the_versions_and_the_user():
    fake = compat.Upstream("lightning.pytorch:NoSuchThing", "lightning", "2.6.6", "someone")
    with pytest.raises(AttributeError):
        compat.resolve(fake.symbol)
    assert gone(fake, "is gone") == (
        f"lightning.pytorch:NoSuchThing is gone in lightning {installed('lightning')} (lingmao.compat was written "
        "against 2.6.6): someone needs another way; see lingmao/compat.py"
    )


def test_hydra_reports_through_the_function_that_is_swapped(capsys):
    from hydra._internal import utils as hydra_utils

    e = entry("run_and_report")
    if "run_and_report(" not in inspect.getsource(hydra_utils._run_hydra):
        pytest.fail(gone(e, "is no longer what _run_hydra reports through"))
    original = hydra_utils.run_and_report
    with compat.hydra_error_reporter(lambda exc: f"described {exc}" if isinstance(exc, KeyError) else None, 2):
        assert hydra_utils.run_and_report is not original

        def fail() -> None:
            raise KeyError("x")

        with pytest.raises(SystemExit) as info:
            hydra_utils.run_and_report(fail)
        assert info.value.code == 2
        assert hydra_utils.run_and_report(lambda: 7) == 7
    assert hydra_utils.run_and_report is original
    assert capsys.readouterr().err == "error: described 'x'\n"


def test_lightning_relaunches_ranks_with_this_command_line_and_the_hydra_run_dir(monkeypatch, tmp_path):
    """What lingmao.distributed.single_job_command rewrites: sys.argv and HydraConfig's run.dir."""
    from hydra.conf import HydraConf
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    e = entry("_hydra_subprocess_cmd")
    cfg = OmegaConf.create({"hydra": OmegaConf.structured(HydraConf)})
    cfg.hydra.run.dir, cfg.hydra.runtime.cwd = str(tmp_path / "job"), str(tmp_path)
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr(sys, "argv", ["train.py", "model=tiny", "optim.lr=1e-3"])
    try:
        command, cwd = compat.resolve(e.symbol)(local_rank=1)
    finally:
        HydraConfig.instance().cfg = saved
    if not (list(command[-5:-3]) == ["model=tiny", "optim.lr=1e-3"] and f'hydra.run.dir="{tmp_path / "job"}"'
            in command and cwd == str(tmp_path)):
        pytest.fail(gone(e, f"no longer re-runs sys.argv with hydra.run.dir (it ran {command})"))


def test_lightning_keeps_the_train_loaders_place_and_the_batches_done(tmp_path):
    """One tiny fit: the checkpoint holds ResumableDataLoader's state and the fit loop's batch count where
    lingmao.compat reads them."""
    import lightning as L

    from lingmao.data import EpochShuffleSampler, ResumableDataLoader

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.w - batch.float().mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = ResumableDataLoader(torch.arange(12), batch_size=4, sampler=EpochShuffleSampler(12))
    if not compat.saves_loader_state(loader):
        pytest.fail(gone(entry("_Stateful"), "no longer matches ResumableDataLoader"))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(), loader)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    checkpoint = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert compat.batches_completed(checkpoint) == 2
    states = list(loader_states(checkpoint))
    if states != [{"epoch": 0, "done": 8, "world_size": 1, "seed": 0, "length": 12}]:
        pytest.fail(gone(entry("_Stateful"), f"no longer puts the loader's state in checkpoints (found {states})"))


def loader_states(node):
    """Every dict in a checkpoint that is a ResumableDataLoader state."""
    if isinstance(node, dict):
        if {"epoch", "done", "world_size", "seed", "length"} <= set(node):
            yield node
        for value in node.values():
            yield from loader_states(value)
    elif isinstance(node, list | tuple):
        for value in node:
            yield from loader_states(value)


def test_muon_copies_agree_with_torchs_private_functions():
    from torch.optim import _muon

    g = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    coefficients, eps = (3.4445, -4.775, 2.0315), 1e-7
    ours = compat.orthogonalize(g, 5, coefficients, eps, torch.bfloat16)
    theirs = _muon._zeropower_via_newtonschulz(g, coefficients, 5, eps)
    if not torch.equal(ours, theirs):
        pytest.fail(gone(entry("_zeropower_via_newtonschulz"), "computes otherwise now"))
    for adjust in (None, "original", "match_rms_adamw"):
        for shape in (torch.Size([48, 32]), torch.Size([32, 48])):
            if compat.muon_lr(0.02, adjust, shape) != pytest.approx(_muon._adjust_lr(0.02, adjust, shape)):
                pytest.fail(gone(entry("_adjust_lr"), f"computes otherwise now ({adjust}, {tuple(shape)})"))
