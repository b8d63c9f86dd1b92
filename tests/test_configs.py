"""Every option of every config group, and the command lines of the README, compose and resolve.

Hydra's compose API: a broken YAML file or a renamed key fails here in seconds, not in a training run.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lingmao import sweep
from lingmao.config import CONF_DIR, SCHEMAS, unknown_keys, validate
from lingmao.distributed import build_strategy
from lingmao.errors import LingmaoError
from lingmao.hardware import FSDPConfig, HardwareConfig


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent namespace package is absent
        return False


OPTUNA = _installed("hydra_plugins.hydra_optuna_sweeper")
# Groups whose options need an optional plugin: composed by their own tests below.
PLUGIN_GROUPS = {"hparams_search"}


def group_options() -> list[tuple[str, str]]:
    return [
        (group.name, option.stem)
        for group in sorted(CONF_DIR.iterdir()) if group.is_dir() and group.name not in PLUGIN_GROUPS
        for option in sorted(group.glob("*.yaml"))
    ]


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


def composed(*overrides: str, hydra_node: bool = False):
    cfg = compose("train", overrides=list(overrides), return_hydra_config=hydra_node)
    job = {k: v for k, v in cfg.items() if k != "hydra"}
    OmegaConf.to_container(OmegaConf.create(job), resolve=True)  # every interpolation resolves
    return cfg


def test_every_group_has_options():
    groups = {g for g, _ in group_options()}
    assert {"model", "optim", "data", "hardware", "night", "experiment"} <= groups
    assert {o for g, o in group_options() if g == "hardware"} >= {"cpu", "ddp", "ddp_spawn", "fsdp", "multinode"}


@pytest.mark.parametrize(("group", "option"), group_options())
def test_group_option_composes(hydra_conf, group, option):
    cfg = composed(f"{group}={option}")
    if group not in ("experiment", "callbacks"):
        assert cfg[group].get("name", option) == option


# What an option may legitimately fail on here: a device this machine lacks, a corpus not prepared yet, the
# training file the user must name (data=jsonl).
NOT_HERE = ("not available on this machine", "file not found", "data.train_file: a value is required")


@pytest.mark.parametrize(("group", "option"), group_options())
def test_every_option_validates_against_its_dataclass(hydra_conf, group, option):
    """Every key of every shipped option is a field of its group's dataclass, of the right type and range."""
    cfg = composed(f"{group}={option}")
    assert unknown_keys(cfg) == []
    try:
        conf = validate(cfg)
    except LingmaoError as exc:
        assert any(reason in str(exc) for reason in NOT_HERE), str(exc)
        return
    if group in SCHEMAS:
        assert isinstance(getattr(conf, group), SCHEMAS[group])


# The command lines the README and docs/ show (sweep values aside, see the next test).
COMMANDS = [
    "model=tiny",
    "optim.lr=3e-4 model=small",
    "experiment=smoke",
    "experiment=smoke optim.lr=1e-4 trainer.max_steps=5",
    "experiment=poetry_small",
    "experiment=poetry_large_fsdp hardware.devices=4",
    "hardware=ddp hardware.devices=2",
    "hardware=ddp hardware.accelerator=cpu hardware.devices=2",
    "hardware=ddp_spawn hardware.devices=2",
    "model=large hardware=fsdp hardware.devices=8 hardware.fsdp.activation_checkpointing=false",
    "hardware=multinode hardware.num_nodes=2 hardware.devices=8",
    "hardware=cpu hardware.devices=2 hardware.strategy=ddp",
    "run_name=my_run auto_resume=false",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_composes(hydra_conf, command):
    composed(*command.split(), hydra_node=True)


def test_experiment_applies_over_defaults_and_under_the_command_line(hydra_conf):
    cfg = composed("experiment=smoke")
    assert (cfg.model.name, cfg.hardware.name, cfg.night.enabled, cfg.trainer.max_steps) == ("tiny", "cpu", False, 60)
    assert composed("experiment=smoke", "trainer.max_steps=5", "model.d_model=32").trainer.max_steps == 5
    big = composed("experiment=poetry_large_fsdp")
    assert (big.model.name, big.hardware.strategy) == ("large", "fsdp")
    assert big.optim.name == "adamw"  # Muon, the default optimizer, is refused under FSDP
    assert big.hardware.fsdp.activation_checkpointing is True


@pytest.mark.parametrize(
    "bad", ["model=nope", "experiment=nope", "optim.lrr=1", "hardware=ddp hardware.ddpp.x=1", "optim.lr=1e-3,3e-4"]
)
def test_broken_overrides_fail_at_composition(hydra_conf, bad):
    with pytest.raises(HydraException):
        composed(*bad.split())


@pytest.mark.parametrize(
    "command",
    ["optim.lr=1e-3,3e-4 model=tiny,small", "optim.lr=range(1e-4,1e-3,3e-4)", "model.dropout=0.0,0.1 experiment=smoke",
     "hardware=ddp hardware.devices=2 optim.lr=1e-3,3e-4"],
)
def test_sweep_commands_parse(command):
    overrides = OverridesParser.create().parse_overrides(command.split())
    assert any(o.is_sweep_override() for o in overrides)


def test_hydra_settings_for_sweeps(hydra_conf):
    cfg = composed("model=tiny", hydra_node=True)
    assert isinstance(instantiate(cfg.hydra.callbacks.sweep_summary), sweep.SweepSummary)


def test_strategies_are_built_from_the_hardware_group(hydra_conf):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    def hardware(*overrides: str) -> HardwareConfig:
        return OmegaConf.to_object(composed(*overrides).hardware)

    ddp = build_strategy(hardware("hardware=ddp"))
    assert isinstance(ddp, DDPStrategy) and ddp._ddp_kwargs["find_unused_parameters"] is False
    assert build_strategy(hardware("hardware=ddp_spawn")) == "ddp_spawn"
    assert build_strategy(hardware("hardware=cpu")) == "auto"
    fsdp_cfg = dataclasses.replace(hardware("hardware=fsdp", "hardware.accelerator=cpu"), devices=2, num_nodes=3)
    fsdp = build_strategy(fsdp_cfg, {torch.nn.Linear})  # FSDP2 through Lightning (lingmao/fsdp.py)
    assert isinstance(fsdp, ModelParallelStrategy) and fsdp.block_types == (torch.nn.Linear,)
    assert fsdp.config == FSDPConfig() and fsdp.config.activation_checkpointing
    assert (fsdp._data_parallel_size, fsdp._tensor_parallel_size) == (6, 1)  # one mesh dimension of all ranks
    hybrid = build_strategy(dataclasses.replace(fsdp_cfg, fsdp=FSDPConfig(sharding_strategy="HYBRID_SHARD")))
    assert (hybrid._data_parallel_size, hybrid._tensor_parallel_size) == (3, 2)  # machines x processes
    with pytest.raises(LingmaoError, match="sharding_strategy='HALF'"):
        FSDPConfig(sharding_strategy="HALF")


@pytest.mark.skipif(not OPTUNA, reason="the Optuna sweeper plugin is an optional extra (pip install lingmao[optuna])")
def test_optuna_search_composes(hydra_conf):
    cfg = composed("hparams_search=optuna", "experiment=smoke", hydra_node=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "minimize"
    assert set(cfg.hydra.sweeper.params) == {"optim.lr", "optim.warmup_steps", "model.dropout", "model.d_model"}
    assert cfg.hydra.mode.name == "MULTIRUN"


@pytest.mark.skipif(OPTUNA, reason="checks the message shown when the optional Optuna plugin is missing")
def test_optuna_search_without_the_plugin_names_what_is_missing(hydra_conf):
    with pytest.raises(HydraException, match="hydra/sweeper"):
        composed("hparams_search=optuna", hydra_node=True)


